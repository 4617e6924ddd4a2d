// Winograd convolution as ggml graph nodes (see winograd.h): the custom-op bodies (filter transform, input transform,
// products with ours or ggml's GEMM, or with the filter transform fused in, output transform) and winograd_conv2d.
#include "winograd.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include "gemm.h"
#include "ggml_helpers.h"
#include "winograd_cache.h"
#include "winograd_transforms.h"
#include "work_items.h"
#include "profile.h"

namespace pysdcpp {

namespace {

// ---- ggml custom-op bodies -----------------------------------------------------------------------------

// Node userdata that marks U as packed for our GEMM (no userdata: the [alpha^2][K][C] layout ggml's GEMM takes).
const bool kPackedU = true;

// dst U (see kPackedU) F32, alpha^2 positions in ne[2]; src[0] = w [3, 3, C, K] (F16 or F32, contiguous).
// Work items: panels of output channels, claimed dynamically.
void filter_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const ggml_tensor* w = dst->src[0];
    const int64_t K      = w->ne[3];
    WorkItems items(dst, nth, (K + kGemmPanel - 1) / kGemmPanel);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t k0 = item * kGemmPanel;
        transform_filters(w, tile_of(dst->ne[2]), userdata != nullptr, (float*)dst->data, k0,
                          std::min(K, k0 + kGemmPanel));
    }
}

std::atomic<int64_t> g_chunk_bytes{kChunkBytes};

}  // namespace

void set_winograd_chunk_bytes(int64_t bytes) {
    g_chunk_bytes.store(bytes > 0 ? bytes : kChunkBytes);  // any positive size: kMaxChunks bounds the node count
}

ConvGeometry ConvGeometry::make(int64_t W, int64_t H, int64_t C, int64_t N, int64_t K, int pad, int m) {
    ConvGeometry g{};
    g.W = W, g.H = H, g.C = C, g.N = N, g.K = K, g.pad = pad, g.m = m;
    g.OW      = W + 2 * pad - 2;
    g.OH      = H + 2 * pad - 2;
    g.tiles_w = (g.OW + m - 1) / m;
    g.tiles_h = (g.OH + m - 1) / m;
    g.T       = N * g.tiles_w * g.tiles_h;
    return g;
}

namespace {

// Tile range and padding of one chunk of a convolution (node userdata: interned, so the pointers outlive every
// graph that uses them).
struct ChunkArgs {
    int pad;
    int64_t t0, t1;
    bool operator<(const ChunkArgs& o) const { return std::tie(pad, t0, t1) < std::tie(o.pad, o.t0, o.t1); }
};

const ChunkArgs* intern_chunk(int pad, int64_t t0, int64_t t1) {
    static std::mutex mutex;
    static std::set<ChunkArgs> chunks;
    std::lock_guard<std::mutex> lock(mutex);
    return &*chunks.insert(ChunkArgs{pad, t0, t1}).first;
}

// Tiles per work item of the input and output transforms (claimed dynamically, as the products' items): small,
// so that even a 16-tile map has an item for each thread to balance with.
constexpr int64_t kTransformItemTiles = 4;

// dst V [C, t1 - t0, alpha^2] F32 for the chunk's tiles; src[0] = x [W, H, C, N] F32 contiguous.
void input_chunk_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    if (ith == 0) {
        set_winograd_threads(nth);  // the count later cache inserts use, where no caller has set it
    }
    const ggml_tensor* x = dst->src[0];
    const auto* a        = (const ChunkArgs*)userdata;
    const int m          = tile_of(dst->ne[2]);
    ConvGeometry g       = ConvGeometry::make(x->ne[0], x->ne[1], x->ne[2], x->ne[3], 0, a->pad, m);
    g.T                  = a->t1 - a->t0;  // V's tile count (the tiles' positions come from tiles_w, tiles_h)
    WorkItems items(dst, nth, (g.T + kTransformItemTiles - 1) / kTransformItemTiles);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t b = a->t0 + item * kTransformItemTiles, e = std::min(a->t1, b + kTransformItemTiles);
        if (m == 4) {
            input_transform<4>((const float*)x->data, g, (float*)dst->data, b, e, a->t0);
        } else {
            input_transform<2>((const float*)x->data, g, (float*)dst->data, b, e, a->t0);
        }
    }
}

// The chunk's output tiles into y [OW, OH, K, N] from its M [K, t1 - t0, alpha^2], plus the bias if any.
void output_chunk(ggml_tensor* y, const ggml_tensor* Mt, const ggml_tensor* b, const ChunkArgs* a, int nth) {
    const int m = tile_of(Mt->ne[2]);
    // Recover the input size from the output size: OH = H + 2 pad - 2.
    ConvGeometry g = ConvGeometry::make(y->ne[0] - 2 * a->pad + 2, y->ne[1] - 2 * a->pad + 2, 0, y->ne[3],
                                        y->ne[2], a->pad, m);
    g.T = a->t1 - a->t0;
    const float* bias = b != nullptr ? (const float*)b->data : nullptr;
    WorkItems items(y, nth, (g.T + kTransformItemTiles - 1) / kTransformItemTiles);  // y: this node's dst
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t lo = a->t0 + item * kTransformItemTiles, hi = std::min(a->t1, lo + kTransformItemTiles);
        if (m == 4) {
            output_transform<4>((const float*)Mt->data, g, bias, (float*)y->data, lo, hi, a->t0);
        } else {
            output_transform<2>((const float*)Mt->data, g, bias, (float*)y->data, lo, hi, a->t0);
        }
    }
}

// First chunk: dst y is a new tensor, src[0] = M, src[1] = bias or none.
void output_first_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    output_chunk(dst, dst->src[0], dst->src[1], (const ChunkArgs*)userdata, nth);
}

// Later chunks: dst is a view of src[0] (the output so far, written in place), src[1] = M, src[2] = bias.
void output_next_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    output_chunk(dst, dst->src[1], dst->src[2], (const ChunkArgs*)userdata, nth);
}

// Tiles per work item of the GEMM node: the item's slice of V (kGemmDepth channels) stays in L2 next to the
// block of packed filters it meets.
constexpr int64_t kGemmItemTiles = 96;

// Node userdata selecting the GEMM's build (gemm.h): the SIMD kernel, or the portable scalar one (tests).
const bool kGemmVector = true, kGemmScalar = false;

// dst M [K, T, alpha^2] = per position p: V_p [T][C] times U_p^T (packed); src[0] = U, src[1] = V [C, T, alpha^2].
// Work items are (position, block of kGemmItemTiles tiles), claimed dynamically in position order (consecutive
// items mostly share their filters).
void gemm_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const ggml_tensor* U = dst->src[0];
    const ggml_tensor* V = dst->src[1];
    const int64_t C = V->ne[0], T = V->ne[1], P = V->ne[2], K = dst->ne[0];
    const int64_t blocks = (T + kGemmItemTiles - 1) / kGemmItemTiles;
    const bool vector    = *(const bool*)userdata;
    WorkItems items(dst, nth, P * blocks);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t p = item / blocks, t0 = (item % blocks) * kGemmItemTiles;
        const int64_t t1 = std::min(T, t0 + kGemmItemTiles);
        const float* Vp  = (const float*)V->data + p * T * C;
        const float* Up  = (const float*)U->data + p * position_floats(C, K);
        float* Mp        = (float*)dst->data + p * T * K;
        gemm_packed_b(Vp, C, Up, C, K, Mp, K, t0, t1, vector);
    }
}

// ---- the dependent stage fused into the products (layers whose U is not cached) ----------------------------
//
// Each work item transforms the filters of its output channels block by block of input channels, straight into
// the packed panels the GEMM reads, and multiplies them while they are in L2: U is never materialised, and the
// products read the 3x3 weights (F16: 18 bytes per filter) instead of a cached U (144 bytes per filter with
// F(4x4)). The transform costs ~C*K work per item against ~T*C*K for the products, so the item's tiles amortise
// it; the tile blocks are large enough that a big map pays ~1% for it.
constexpr int64_t kFusedDepth = kFilterDepth;   // input channels per block: U block of 36 x 64 x 32 floats (295 KB)
constexpr int64_t kFusedCols  = 2 * kGemmPanel;  // output channels per item
constexpr int64_t kFusedTiles = 96;   // tiles per item: its products (36 x 96 x 32 floats, 442 KB) stay in L2

// dst M [K, T, alpha^2] as gemm_node's, with the filter transform fused in; src[0] = w [3, 3, C, K] (F16 or F32),
// src[1] = V [C, T, alpha^2]. Work items are (block of kFusedCols output channels, block of kFusedTiles tiles).
void fused_gemm_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const ggml_tensor* w = dst->src[0];
    const ggml_tensor* V = dst->src[1];
    const int64_t C = V->ne[0], T = V->ne[1], P = V->ne[2], K = dst->ne[0];
    const int m           = tile_of(P);
    const int64_t n_cols  = (K + kFusedCols - 1) / kFusedCols;
    const int64_t n_tiles = (T + kFusedTiles - 1) / kFusedTiles;
    const bool vector     = *(const bool*)userdata;
    thread_local std::vector<float> scratch, Ub, Mb;
    scratch.resize((size_t)kFilterScratch);
    Ub.resize((size_t)(P * (kFusedCols * kFusedDepth + kGemmPanel)));
    Mb.resize((size_t)(P * kFusedTiles * kFusedCols));
    WorkItems items(dst, nth, n_cols * n_tiles);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t k0 = (item / n_tiles) * kFusedCols, k1 = std::min(K, k0 + kFusedCols);
        const int64_t t0 = (item % n_tiles) * kFusedTiles, t1 = std::min(T, t0 + kFusedTiles);
        const int64_t panels = (k1 - k0 + kGemmPanel - 1) / kGemmPanel;
        for (int64_t c0 = 0; c0 < C; c0 += kFusedDepth) {
            const int64_t kd = std::min(kFusedDepth, C - c0);
            const int64_t ps = (panels * kd + 1) * kGemmPanel;  // floats per position, padded as position_floats
            transform_block(w, m, k0, k1, c0, kd, Ub.data(), ps, kd * kGemmPanel, scratch.data());
            for (int64_t p = 0; p < P; p++) {
                // The item's products accumulate in Mb (rows of kFusedCols floats: the tiles' slices stay in L2
                // across the blocks of channels) and go to dst when the item is done.
                gemm_block((const float*)V->data + (p * T + t0) * C + c0, C, Ub.data() + p * ps, kd * kGemmPanel,
                           kd, k1 - k0, Mb.data() + p * kFusedTiles * kFusedCols, kFusedCols, 0, t1 - t0, c0 > 0,
                           vector);
            }
        }
        for (int64_t p = 0; p < P; p++) {
            for (int64_t t = t0; t < t1; t++) {
                std::memcpy((float*)dst->data + (p * T + t) * K + k0,
                            Mb.data() + (p * kFusedTiles + t - t0) * kFusedCols, sizeof(float) * (k1 - k0));
            }
        }
    }
}

}  // namespace

ggml_tensor* winograd_conv2d(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, int pad, WinogradVariant variant,
                             FilterSource source, ggml_tensor* bias, WinogradGemm gemm) {
    const int m         = (int)variant;
    const int64_t alpha = m + 2;
    ConvGeometry g      = ConvGeometry::make(x->ne[0], x->ne[1], x->ne[2], x->ne[3], w->ne[3], pad, m);
    const int64_t P     = alpha * alpha;
    const bool fused    = source == FilterSource::fused;
    const bool packed   = gemm != WinogradGemm::ggml || fused;  // the fused transform feeds our GEMM only
    // U's shape: [C, K, P] for ggml's GEMM, [packed floats of one position, 1, P] for ours.
    const int64_t u0 = packed ? position_floats(g.C, g.K) : g.C, u1 = packed ? 1 : g.K;
    ggml_tensor* U   = nullptr;
    if (fused) {
        // no U: the products transform the filters themselves
    } else if (source == FilterSource::cached && host_weights(w)) {
        U       = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, u0, u1, P);
        U->data = (void*)cached_filter(w, m, packed);  // a leaf outside every backend buffer: the allocator leaves it alone
        ggml_set_name(U, "winograd_U_cached");
    } else {
        // x is a source only for the order: ggml lists a node after its sources in order, so without it the
        // transform (which needs only the weights) would run at the start of the graph and every in-graph U of
        // the model would be alive at once; after x, it runs just before its layer and is freed right after.
        ggml_tensor* wargs[2] = {w, x};
        U = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, u0, u1, P, 1, wargs, 2, filter_node, GGML_N_TASKS_MAX,
                                    packed ? (void*)&kPackedU : nullptr),
                     "winograd.filters");
    }
    // The tiles go through in chunks whose V and M together stay under kChunkBytes: the working memory of a big
    // map (the VAE's last blocks: 2 x 302 MB at 512 px in one piece) shrinks to one chunk's, at no cost in speed
    // (each chunk's GEMMs are still ~1800 columns wide there).
    const int64_t per_tile = (g.C + g.K) * P * (int64_t)sizeof(float);
    // At most kMaxChunks chunks (3 graph nodes each), whatever the map and the chunk size: graphs have a fixed
    // node capacity (stable-diffusion.cpp builds the VAE's with ggml's default of 2048; 33 convs x 8 chunks x 3
    // nodes stay well inside it).
    int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(g.T, g_chunk_bytes.load() / per_tile));
    chunk         = std::max<int64_t>(chunk, (g.T + kMaxChunks - 1) / kMaxChunks);
    ggml_tensor* y         = nullptr;
    for (int64_t t0 = 0; t0 < g.T; t0 += chunk) {
        const int64_t t1      = std::min(g.T, t0 + chunk);
        const ChunkArgs* args = intern_chunk(pad, t0, t1);
        ggml_tensor* xargs[1] = {x};
        ggml_tensor* V = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, g.C, t1 - t0, P, 1, xargs, 1, input_chunk_node,
                                                 GGML_N_TASKS_MAX, (void*)args),
                                  "winograd.input");
        // F32 x F32. Ours reads the packed U as it is; ggml's GEMM (kept as a measured alternative) packs nothing
        // either, with tinyBLAS's 4x3 dot-product tiles. (An F16 U would make ggml round V to F16 too, and
        // F(4x4)'s output transform amplifies those roundings to ~4e-3 normalised error; measured, see
        // docs/benchmarks.md.)
        ggml_tensor* Mt = nullptr;  // [K, t1 - t0, P]
        const void* build = gemm == WinogradGemm::own_scalar ? &kGemmScalar : &kGemmVector;
        if (fused) {
            ggml_tensor* gargs[2] = {w, V};
            Mt = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, g.K, t1 - t0, P, 1, gargs, 2, fused_gemm_node,
                                         GGML_N_TASKS_MAX, (void*)build),
                          "winograd.fused_gemm");
        } else if (packed) {
            ggml_tensor* gargs[2] = {U, V};
            Mt = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, g.K, t1 - t0, P, 1, gargs, 2, gemm_node,
                                         GGML_N_TASKS_MAX, (void*)build),
                          "winograd.gemm");
        } else {
            Mt = labelled(ggml_mul_mat(ctx, U, V), "winograd.gemm_ggml");
        }
        ggml_tensor* margs[2] = {Mt, bias};
        const int n_margs     = bias != nullptr ? 2 : 1;
        if (y == nullptr) {
            // First chunk: a fresh output tensor (the other chunks' tiles are written by the nodes after it).
            y = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, g.OW, g.OH, g.K, g.N, margs, n_margs, output_first_node,
                                        GGML_N_TASKS_MAX, (void*)args),
                         "winograd.output");
        } else {
            y = labelled(ggml_custom_inplace(ctx, y, margs, n_margs, output_next_node, GGML_N_TASKS_MAX, (void*)args),
                         "winograd.output");
        }
    }
    return y;
}

}  // namespace pysdcpp
