// The conv hook's side of Winograd: the per-layer cost model (winograd_plan), the process-wide algorithm, the route
// counters, and pysdcpp_conv2d_hook, which routes stable-diffusion.cpp's eligible 3x3 and 1x1 convs.
#include "winograd.h"

#include <atomic>

#include "gemm.h"
#include "ggml_helpers.h"
#include "pointwise.h"
#include "winograd_cache.h"

namespace pysdcpp {

namespace {

std::atomic<int> g_algorithm{(int)ConvAlgorithm::im2col};

// Graph builds per outcome of the hook since the last reset (ConvRoute order).
std::atomic<int64_t> g_routes[4];

}  // namespace

LayerPlan winograd_plan(int64_t W, int64_t H, int64_t C, int64_t N, int64_t K, int pad) {
    // Measured (docs/benchmarks.md, 2-core AVX2, 2 threads): F(4x4) beats im2col on every SD conv whose output
    // map is larger than 8x8, whatever the channel counts (3 and 4 input channels included); on 8x8 maps F(2x2)
    // wins by 1.1-1.4x and F(4x4) by less (4 tiles per image); at 4x4 both lose.
    const int64_t OW = W + 2 * pad - 2, OH = H + 2 * pad - 2;
    if (OW * OH <= 16) {
        return LayerPlan{WinogradVariant::none, false};
    }
    const WinogradVariant v = OW * OH <= 64 ? WinogradVariant::f2x2 : WinogradVariant::f4x4;
    // Few tiles: the products are short and a hoisted U (8x the F16 weights with F(4x4)) is read from memory
    // once per evaluation for little work; transforming inside the products reads the weights instead, and
    // measured as fast as a cached U at the UNet's 16x16 maps (layer table), with no memory held.
    const int64_t tiles = ConvGeometry::make(W, H, C, N, K, pad, (int)v).T;
    return LayerPlan{v, tiles >= kMinTilesHoisted};
}

void count_route(ConvRoute r) {
    g_routes[(int)r].fetch_add(1, std::memory_order_relaxed);
}

int64_t conv_routes(ConvRoute r, bool reset) {
    return reset ? g_routes[(int)r].exchange(0) : g_routes[(int)r].load();
}

ConvAlgorithm conv_algorithm() {
    return (ConvAlgorithm)g_algorithm.load(std::memory_order_relaxed);
}

void set_conv_algorithm(ConvAlgorithm a) {
    g_algorithm.store((int)a, std::memory_order_relaxed);
}

}  // namespace pysdcpp

ggml_tensor* pysdcpp_conv2d_hook(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, ggml_tensor* b, bool* bias_done,
                                 int s0, int s1, int p0, int p1, int d0, int d1) {
    using namespace pysdcpp;
    if (conv_algorithm() != ConvAlgorithm::winograd) {
        return nullptr;
    }
    if (pointwise_eligible(w, x, s0, s1, p0, p1, d0, d1)) {  // 1x1: one GEMM per image (pointwise.h)
        const bool fuse = fusable_bias(b, w->ne[3]);
        if (bias_done != nullptr) {
            *bias_done = fuse;
        }
        return conv2d_1x1(ctx, w, x, fuse ? b : nullptr);
    }
    const bool eligible = w->ne[0] == 3 && w->ne[1] == 3 && s0 == 1 && s1 == 1 && d0 == 1 && d1 == 1 && p0 == p1 &&
                          (p0 == 0 || p0 == 1) && x->type == GGML_TYPE_F32 &&
                          (w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_F32) && ggml_is_contiguous(w) &&
                          ggml_is_contiguous(x) && w->ne[2] == x->ne[2];
    if (!eligible) {
        return nullptr;
    }
    const LayerPlan lp = winograd_plan(x->ne[0], x->ne[1], x->ne[2], x->ne[3], w->ne[3], p0);
    if (lp.variant == WinogradVariant::none || !host_weights(w)) {
        count_route(ConvRoute::im2col);
        return nullptr;
    }
    // Our GEMM works on whole panels of 16 output channels: hoisted layers with fewer (the UNet's and the VAE
    // decoder's output convs, 4 and 3 channels) run ggml's GEMM on their filters, measured faster there (layer
    // table); the fused route has only ours (a partial panel).
    const bool own_gemm       = w->ne[3] >= kGemmPanel;
    const FilterSource source = lp.hoisted ? plan_filter(w, (int)lp.variant, own_gemm) : FilterSource::fused;
    // The bias goes into the output transform (one pass over the output less) when it is a plain F32 vector.
    const bool fuse = fusable_bias(b, w->ne[3]);
    if (bias_done != nullptr) {
        *bias_done = fuse;
    }
    count_route(source == FilterSource::cached     ? ConvRoute::cached
                : source == FilterSource::in_graph ? ConvRoute::in_graph
                                                   : ConvRoute::fused);
    return winograd_conv2d(ctx, w, x, p0, lp.variant, source, fuse ? b : nullptr,
                           own_gemm ? WinogradGemm::own : WinogradGemm::ggml);
}
