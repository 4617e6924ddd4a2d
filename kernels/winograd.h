// Winograd convolution for 3x3, stride-1, dilation-1 convolutions, as ggml graph nodes.
//
// y = A^T [ (G g G^T) (.) (B^T d B) ] A per output tile, split into stages:
//   filter transform  U[p][k][c]  (depends only on the weights: the "dependent" stage)
//   input transform   V[p][t][c]  (per tile t, all channels: independent)
//   36 (or 16) GEMMs  M[p] = U[p] V[p]^T  (our packed GEMM, gemm.h; or ggml_mul_mat)
//   output transform  y[n][k][oh][ow] = A^T M A  (per tile: independent)
// F(4x4,3x3): 6x6 input tiles, 36 multiplies per 16 outputs; F(2x2,3x3): 4x4 tiles, 16 per 4.
#pragma once

#include <cstdint>

#include "ggml.h"

namespace pysdcpp {

// What the conv hook does: keep upstream's path, or Winograd where the cost model picks it.
enum class ConvAlgorithm : int { im2col = 0, winograd = 2 };

// Which Winograd variant a layer uses; `none` keeps upstream's path for it.
enum class WinogradVariant : int { none = 0, f2x2 = 2, f4x4 = 4 };

// Geometry of one convolution in ggml order (x: [W, H, C, N], y: [OW, OH, K, N]).
struct ConvGeometry {
    int64_t W, H, C, N, K;
    int pad;
    int m;  // output tile size: 2 or 4
    int64_t OW, OH, tiles_w, tiles_h, T;

    static ConvGeometry make(int64_t W, int64_t H, int64_t C, int64_t N, int64_t K, int pad, int m);
};

// Memory policy of the transformed filters (the cost model's memory half; measured, docs/benchmarks.md).
constexpr size_t kDefaultCacheBudget = (size_t)1536 << 20;  // keeps a 512 px SD1.5 generation under upstream's peak
constexpr int64_t kMinTilesHoisted   = 64;                  // from here on the filter transform is hoisted (cached
                                                            // or in the graph); below, fused into the products
constexpr size_t kMaxInGraphBytes    = (size_t)48 << 20;    // largest U transformed inside a graph (VAE: 38 MB)
constexpr int64_t kChunkBytes        = (int64_t)64 << 20;   // V + M of one chunk of tiles
constexpr int64_t kMaxChunks         = 8;                   // chunks per conv, at most: 3 graph nodes each, and
                                                            // the VAE's graph holds ggml's default 2048 nodes

// Where the graph's transformed filters U come from: the process-wide cache (computed now if absent), a
// filter-transform node inside the graph (its U lives in the compute buffer only while the layer runs), or
// nowhere: `fused` transforms them block by block inside the products (our GEMM), never holding a whole U.
enum class FilterSource : int { cached = 0, in_graph = 1, fused = 2 };

// Which GEMM computes the products: ours on the packed filters (SIMD, or its portable scalar build), or ggml's
// mul_mat on the plain layout (kept as the measured alternative: `pysdcpp bench --layers`).
enum class WinogradGemm : int { own = 0, own_scalar = 1, ggml = 2 };

// Graph builder: the Winograd convolution of x [W, H, C, N] with w [3, 3, C, K] (F16 or F32) and padding 0
// or 1, returning y [OW, OH, K, N] in F32, plus bias (F32 [K], or nullptr) added in the output transform.
// `variant` must not be `none`; w must be in host memory (the hook declines other weights).
ggml_tensor* winograd_conv2d(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, int pad, WinogradVariant variant,
                             FilterSource source = FilterSource::cached, ggml_tensor* bias = nullptr,
                             WinogradGemm gemm = WinogradGemm::own);

// Cache of transformed filters (the hoisted dependent stage), bounded by a byte budget. winograd_release drops
// the filters (and the use records) of the weights in one backend buffer: the end of a component's scope.
void winograd_cache_clear();
void winograd_release(const void* weight_buffer);
size_t winograd_cache_bytes();
size_t winograd_cache_peak_bytes(bool reset);
void set_winograd_cache_budget(size_t bytes);
void set_winograd_chunk_bytes(int64_t bytes);  // tests and tuning; <= 0 restores kChunkBytes
// Threads a cache insert (at graph build) transforms filters on, at most 16: the thread count of the compute the
// graphs are built for. Set by the callers that know it before the graph is built (the component API, the conv
// harness) and by every Winograd compute (its nth, for the graphs built after it); n < 1 or never set: 1.
void set_winograd_threads(int n);

// The per-layer choice (cost model) for x [W, H, C, N] and K output channels: which variant (none keeps im2col),
// and whether its filter transform is hoisted (cached, or in the graph: plan_filter decides at graph build) or
// fused into the products (maps with few tiles, where a hoisted U does not pay).
struct LayerPlan {
    WinogradVariant variant;
    bool hoisted;
};
LayerPlan winograd_plan(int64_t W, int64_t H, int64_t C, int64_t N, int64_t K, int pad);

// What the hook did with the eligible 3x3 stride-1 convs of the graphs built since the last reset: kept im2col,
// or Winograd with cached filters, filters transformed in the graph, or transformed inside the products.
enum class ConvRoute : int { im2col = 0, cached = 1, in_graph = 2, fused = 3 };
void count_route(ConvRoute r);
int64_t conv_routes(ConvRoute r, bool reset);

// Process-wide algorithm the hook applies (the binding sets it per call from the context's setting).
ConvAlgorithm conv_algorithm();
void set_conv_algorithm(ConvAlgorithm a);

}  // namespace pysdcpp

// The hook patch 0005 calls from GGMLRunner::free_compute_buffer with the runner's weight buffer: the component
// is done computing for now, its cached filters are released.
void pysdcpp_weights_released(const void* buffer);

// The hook patch 0002 calls from ggml_ext_conv_2d: a replacement for ggml_conv_2d, or nullptr to keep it. b (may
// be nullptr) is the conv's bias: *bias_done says whether the replacement added it.
ggml_tensor* pysdcpp_conv2d_hook(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, ggml_tensor* b, bool* bias_done,
                                 int s0, int s1, int p0, int p1, int d0, int d1);
