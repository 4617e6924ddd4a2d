// Winograd F(4x4,3x3) and F(2x2,3x3) convolution stages and their ggml graph nodes (see winograd.h).
#include "winograd.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>
#include <vector>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gemm.h"
#include "pack.h"
#include "simd.h"
#include "ggml_helpers.h"
#include "work_items.h"


namespace pysdcpp {

namespace {

// Transform matrices (Lavin & Gray). F(4x4,3x3) uses the interpolation points 0, +-1, +-2 and infinity; the
// filter transforms' G is written out in the two g_1d below.
constexpr float BT4[6][6] = {{4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                             {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr float AT4[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};

constexpr float BT2[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
constexpr float AT2[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};

template <int M>
struct Mats;
template <>
struct Mats<4> {
    static constexpr int A = 6;
    static constexpr const float (&BT)[6][6] = BT4;
    static constexpr const float (&AT)[4][6] = AT4;
};
template <>
struct Mats<2> {
    static constexpr int A = 4;
    static constexpr const float (&BT)[4][4] = BT2;
    static constexpr const float (&AT)[2][4] = AT2;
};

// Channels (input transform) or output channels (output transform) handled together: the inner loops run
// over this block so the compiler vectorises them.
constexpr int CB = 16;

// The three transforms are the same two small products, over a block of CB channels at once so the innermost
// loops vectorise: out = L * in (L applied to the rows) and out = in * R^T (R applied to the columns).
template <int R, int K, int N>
inline void mul_rows(const float (&L)[R][K], const float (&in)[K][N][CB], float (&out)[R][N][CB]) {
    for (int i = 0; i < R; i++) {
        for (int j = 0; j < N; j++) {
            for (int q = 0; q < CB; q++) {
                float s = 0.f;
                for (int l = 0; l < K; l++) {
                    s += L[i][l] * in[l][j][q];
                }
                out[i][j][q] = s;
            }
        }
    }
}

template <int N, int K, int R>
inline void mul_cols(const float (&in)[N][K][CB], const float (&Rm)[R][K], float (&out)[N][R][CB]) {
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < R; j++) {
            for (int q = 0; q < CB; q++) {
                float s = 0.f;
                for (int l = 0; l < K; l++) {
                    s += in[i][l][q] * Rm[j][l];
                }
                out[i][j][q] = s;
            }
        }
    }
}

// n <= CB floats; a whole block is a fixed-size copy the compiler turns into vector moves (a variable-size
// memcpy became `rep movs`, 18% of the input transform in a profile).
inline void copy_block(float* dst, const float* src, int n) {
    if (n == CB) {
        std::memcpy(dst, src, sizeof(float) * CB);
    } else {
        std::memcpy(dst, src, sizeof(float) * n);
    }
}

// F(4x4)'s input and output transforms written out: B^T and A^T are mostly 0, +-1 and powers of two, so the
// products above spend two thirds of their multiply-adds on zeros. One 1-D pass over a block of CB channels:
// d (six rows of CB floats, ds apart) -> r (six or four rows, rs apart). Profile at 512 px (VAE decoder, F(4x4)):
// the two transforms took 47% of the layer time with the generic products.
inline void bt4_1d(const float* d, int64_t ds, float* r, int64_t rs) {
    for (int q = 0; q < CB; q++) {
        const float d0 = d[q], d1 = d[ds + q], d2 = d[2 * ds + q], d3 = d[3 * ds + q], d4 = d[4 * ds + q],
                    d5 = d[5 * ds + q];
        const float a = d4 - 4.f * d2, b = d3 - 4.f * d1, c = d4 - d2, e = 2.f * (d3 - d1);
        r[q]          = 4.f * d0 - 5.f * d2 + d4;
        r[rs + q]     = a + b;
        r[2 * rs + q] = a - b;
        r[3 * rs + q] = c + e;
        r[4 * rs + q] = c - e;
        r[5 * rs + q] = 4.f * d1 - 5.f * d3 + d5;
    }
}

inline void at4_1d(const float* m, int64_t ms, float* o, int64_t os) {
    for (int q = 0; q < CB; q++) {
        const float m0 = m[q], m1 = m[ms + q], m2 = m[2 * ms + q], m3 = m[3 * ms + q], m4 = m[4 * ms + q],
                    m5 = m[5 * ms + q];
        const float a = m1 + m2, b = m1 - m2, c = m3 + m4, e = m3 - m4;
        o[q]          = m0 + a + c;
        o[os + q]     = b + 2.f * e;
        o[2 * os + q] = a + 4.f * c;
        o[3 * os + q] = b + 8.f * e + m5;
    }
}

// v = B^T d B and out = A^T m A for F(4x4), through the 1-D passes (rows, then columns).
inline void input_tile4(const float (&d)[6][6][CB], float (&v)[6][6][CB]) {
    float tmp[6][6][CB];
    for (int j = 0; j < 6; j++) {
        bt4_1d(&d[0][j][0], 6 * CB, &tmp[0][j][0], 6 * CB);
    }
    for (int i = 0; i < 6; i++) {
        bt4_1d(&tmp[i][0][0], CB, &v[i][0][0], CB);
    }
}

inline void output_tile4(const float (&m)[6][6][CB], float (&out)[4][4][CB]) {
    float tmp[4][6][CB];
    for (int j = 0; j < 6; j++) {
        at4_1d(&m[0][j][0], 6 * CB, &tmp[0][j][0], 6 * CB);
    }
    for (int i = 0; i < 4; i++) {
        at4_1d(&tmp[i][0][0], CB, &out[i][0][0], CB);
    }
}

// G's 1-D passes written out (as bt4_1d), on 8 lanes: (g0, g1, g2) -> r[alpha].
inline void g_1d(const simd::v8f& g0, const simd::v8f& g1, const simd::v8f& g2, simd::v8f (&r)[6]) {
    const simd::v8f a = g0 * (1.f / 24) + g2 * (1.f / 6), b = (g0 + g2) * (-1.f / 6);
    const simd::v8f h = g1 * (1.f / 6), e = g1 * (1.f / 12);
    r[0]              = g0 * 0.25f;
    r[1]              = b - h;
    r[2]              = b + h;
    r[3]              = a + e;
    r[4]              = a - e;
    r[5]              = g2;
}

inline void g_1d(const simd::v8f& g0, const simd::v8f& g1, const simd::v8f& g2, simd::v8f (&r)[4]) {
    const simd::v8f s = (g0 + g2) * 0.5f, h = g1 * 0.5f;
    r[0]              = g0;
    r[1]              = s + h;
    r[2]              = s - h;
    r[3]              = g2;
}

// u = G g G^T over CB lanes (columns, then rows): g holds [3][3][CB] floats, position p = i * alpha + j goes to
// u + p * pos_stride. The lanes are input channels in the plain layout and output channels in the packed one:
// the same code per lane, so both give the same U.
template <int M>
inline void filter_tile(const float* g, float* u, int64_t pos_stride) {
    using simd::v8f;
    constexpr int A = Mats<M>::A;
    for (int h = 0; h < CB; h += 8) {
        v8f cols[3][A];  // G applied down each column of g
        for (int j = 0; j < 3; j++) {
            g_1d(simd::load<v8f>(g + j * CB + h), simd::load<v8f>(g + (3 + j) * CB + h),
                 simd::load<v8f>(g + (6 + j) * CB + h), cols[j]);
        }
        for (int i = 0; i < A; i++) {
            v8f r[A];
            g_1d(cols[0][i], cols[1][i], cols[2][i], r);
            for (int j = 0; j < A; j++) {
                simd::store(u + (i * A + j) * pos_stride + h, r[j]);
            }
        }
    }
}

// The plain layout U [alpha^2][K][C] (ggml's GEMM) for output channels [k0, k1) from F32 weights w [K][C][3][3]
// (w points at channel k0's).
template <int M>
void filter_transform_plain(const float* w, int64_t C, float* U, int64_t K, int64_t k0, int64_t k1) {
    constexpr int A = Mats<M>::A;
    for (int64_t k = k0; k < k1; k++) {
        for (int64_t c0 = 0; c0 < C; c0 += CB) {
            const int cb = (int)std::min<int64_t>(CB, C - c0);
            float g[3][3][CB];
            if (cb < CB) {  // lanes past the last channel feed nothing, but must not hold garbage
                std::memset(g, 0, sizeof(g));
            }
            for (int q = 0; q < cb; q++) {
                const float* src = w + ((k - k0) * C + c0 + q) * 9;
                for (int i = 0; i < 9; i++) {
                    g[i / 3][i % 3][q] = src[i];
                }
            }
            float u[A * A][CB];
            filter_tile<M>(&g[0][0][0], &u[0][0], CB);
            for (int p = 0; p < A * A; p++) {
                std::memcpy(U + ((int64_t)p * K + k) * C + c0, u[p], sizeof(float) * cb);
            }
        }
    }
}

// Floats from one position's packed matrix to the next in a packed U: one cache line more than the matrix, so
// that the transform's 36 (or 16) stores per filter, one per position, fall into different cache sets (at
// power-of-two strides they all met in one set of L1 and the transform ran ~3x slower).
inline int64_t position_floats(int64_t C, int64_t K) {
    return gemm_packed_floats(C, K) + kGemmPanel;
}

// Input channels per block of the packed transform (prefetched one block ahead).
constexpr int64_t kFilterDepth = 64;

// Input channels packed at once inside transform_panels, and the scratch floats it needs.
constexpr int64_t kPackChannels  = 16;
constexpr int64_t kFilterScratch = 2 * kGemmPanel * 9 * kPackChannels;

// Asks for the weights of output channels [k0, k1), input channels [c0, c0 + kd), to be brought into the caches:
// issued one block ahead, the block's rows (one stream per output channel, 18 bytes per F16 filter) arrive while
// the current block is transformed and multiplied, instead of stalling the F16 conversion (11% of a 1280-channel
// layer's time in a profile without it).
void prefetch_weights(const ggml_tensor* w, int64_t k0, int64_t k1, int64_t c0, int64_t kd) {
    const int64_t C    = w->ne[2];
    const size_t esize = ggml_type_size(w->type);
    for (int64_t k = k0; k < k1; k++) {
        const char* row = (const char*)w->data + (k * C + c0) * 9 * esize;
        for (size_t off = 0; off < (size_t)kd * 9 * esize; off += 64) {
            __builtin_prefetch(row + off, 0, 2);
        }
    }
}

// The packed layout of our GEMM: the filters of output channels [k0, k1) (k0 on a panel boundary), input channels
// [c0, c0 + kd) with kd <= kFilterDepth, go to
//   U + p * pos_stride + ((k - k0) / kGemmPanel) * panel_stride + (c - c0) * kGemmPanel + (k - k0) % kGemmPanel
// (lanes past k1 are zeros). Each panel's weights are first packed (pack.h: converted to F32 and transposed so
// that one element of 16 filters is one 16-lane row), then transformed 16 filters at a time.
template <int M>
void transform_panels(const ggml_tensor* w, int64_t k0, int64_t k1, int64_t c0, int64_t kd, float* U,
                      int64_t pos_stride, int64_t panel_stride, float* scratch) {
    static_assert(CB == kGemmPanel, "the packed transform's lanes are one panel of output channels");
    const int64_t C = w->ne[2];
    float* g_all    = scratch;
    float* rows     = scratch + kGemmPanel * 9 * kPackChannels;
    for (int64_t j0 = k0; j0 < k1; j0 += kGemmPanel) {
        float* Uj = U + (j0 - k0) / kGemmPanel * panel_stride;
        // 16 input channels at a time: the packed weights and their F32 rows (9 KB each) stay in L1.
        for (int64_t cs = 0; cs < kd; cs += kPackChannels) {
            const int64_t n = std::min(kPackChannels, kd - cs);
            pack_panels(w->data, w->type == GGML_TYPE_F16, C * 9, j0, std::min(k1, j0 + kGemmPanel), (c0 + cs) * 9,
                        n * 9, g_all, 0, rows);
            for (int64_t c = 0; c < n; c++) {
                filter_tile<M>(g_all + c * 9 * kGemmPanel, Uj + (cs + c) * kGemmPanel, pos_stride);
            }
        }
    }
}

// One block of input channels [c0, c0 + kd) of transform_panels, for callers walking C in blocks of
// kFilterDepth: the next block's weights are prefetched first.
void transform_block(const ggml_tensor* w, int m, int64_t k0, int64_t k1, int64_t c0, int64_t kd, float* U,
                     int64_t pos_stride, int64_t panel_stride, float* scratch) {
    const int64_t C = w->ne[2];
    if (c0 + kd < C) {
        prefetch_weights(w, k0, k1, c0 + kd, std::min(kFilterDepth, C - c0 - kd));
    }
    if (m == 4) {
        transform_panels<4>(w, k0, k1, c0, kd, U, pos_stride, panel_stride, scratch);
    } else {
        transform_panels<2>(w, k0, k1, c0, kd, U, pos_stride, panel_stride, scratch);
    }
}

// U of weight w for output channels [k0, k1) (on panel boundaries when packed) in the layout `packed` names:
// packed per position (gemm.h, [packed C x K] each), or plain [alpha^2][K][C]. w is F16 or F32 [3, 3, C, K].
void transform_filters(const ggml_tensor* w, int m, bool packed, float* U, int64_t k0, int64_t k1) {
    const int64_t C = w->ne[2], K = w->ne[3];
    if (packed) {
        thread_local std::vector<float> scratch;
        scratch.resize((size_t)kFilterScratch);
        for (int64_t c0 = 0; c0 < C; c0 += kFilterDepth) {
            transform_block(w, m, k0, k1, c0, std::min(kFilterDepth, C - c0), U + gemm_packed_index(C, c0, k0),
                            position_floats(C, K), C * kGemmPanel, scratch.data());
        }
        return;
    }
    const float* wf = nullptr;
    std::vector<float> buf;
    if (w->type == GGML_TYPE_F32) {
        wf = (const float*)w->data + k0 * C * 9;
    } else {
        buf.resize((size_t)((k1 - k0) * C * 9));
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t*)w->data + k0 * C * 9, buf.data(), (int64_t)buf.size());
        wf = buf.data();
    }
    if (m == 4) {
        filter_transform_plain<4>(wf, C, U, K, k0, k1);
    } else {
        filter_transform_plain<2>(wf, C, U, K, k0, k1);
    }
}

// V = B^T d B for tiles [t0, t1); d is the (zero-padded) input patch of each tile.
// V holds the tiles [t_base, t_base + g.T) (a chunk of the map, or all of it).
template <int M>
void input_transform(const float* x, const ConvGeometry& g, float* V, int64_t t0, int64_t t1, int64_t t_base) {
    constexpr int A               = Mats<M>::A;
    const int64_t HW              = g.H * g.W;
    const int64_t tiles_per_image = g.tiles_h * g.tiles_w;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t n   = t / tiles_per_image;
        const int64_t r   = t % tiles_per_image;
        const int64_t iy  = (r / g.tiles_w) * M - g.pad;
        const int64_t ix  = (r % g.tiles_w) * M - g.pad;
        const bool inside = iy >= 0 && ix >= 0 && iy + A <= g.H && ix + A <= g.W;
        for (int64_t c0 = 0; c0 < g.C; c0 += CB) {
            const int cb        = (int)std::min<int64_t>(CB, g.C - c0);
            float d[A][A][CB];
            if (cb < CB) {
                std::memset(d, 0, sizeof(d));
            }
            if (inside) {  // most tiles: no bounds to check
                for (int q = 0; q < cb; q++) {
                    const float* xc = x + (n * g.C + c0 + q) * HW + iy * g.W + ix;
                    for (int i = 0; i < A; i++) {
                        for (int j = 0; j < A; j++) {
                            d[i][j][q] = xc[i * g.W + j];
                        }
                    }
                }
            } else {
                for (int q = 0; q < cb; q++) {
                    const float* xc = x + (n * g.C + c0 + q) * HW;
                    for (int i = 0; i < A; i++) {
                        for (int j = 0; j < A; j++) {
                            const int64_t yy = iy + i, xx = ix + j;
                            const bool ok    = yy >= 0 && yy < g.H && xx >= 0 && xx < g.W;
                            d[i][j][q]       = ok ? xc[yy * g.W + xx] : 0.f;
                        }
                    }
                }
            }
            float v[A][A][CB];
            if constexpr (M == 4) {
                input_tile4(d, v);
            } else {
                float tmp[A][A][CB];
                mul_rows(Mats<M>::BT, d, tmp);
                mul_cols(tmp, Mats<M>::BT, v);
            }
            for (int p = 0; p < A * A; p++) {
                copy_block(V + ((int64_t)p * g.T + t - t_base) * g.C + c0, v[p / A][p % A], cb);
            }
        }
    }
}

// y = A^T M A (+ bias) for tiles [t0, t1), clipped at the map's right and bottom edges.
// Mt holds the tiles [t_base, t_base + g.T); bias [K] or nullptr (the conv's bias, fused here).
template <int M>
void output_transform(const float* Mt, const ConvGeometry& g, const float* bias, float* y, int64_t t0, int64_t t1,
                      int64_t t_base) {
    constexpr int A               = Mats<M>::A;
    const int64_t tiles_per_image = g.tiles_h * g.tiles_w;
    const int64_t OHW             = g.OH * g.OW;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t n  = t / tiles_per_image;
        const int64_t r  = t % tiles_per_image;
        const int64_t oy = (r / g.tiles_w) * M;
        const int64_t ox = (r % g.tiles_w) * M;
        const int rows   = (int)std::min<int64_t>(M, g.OH - oy);
        const int cols   = (int)std::min<int64_t>(M, g.OW - ox);
        for (int64_t k0 = 0; k0 < g.K; k0 += CB) {
            const int kb      = (int)std::min<int64_t>(CB, g.K - k0);
            float m[A][A][CB];
            if (kb < CB) {
                std::memset(m, 0, sizeof(m));
            }
            for (int p = 0; p < A * A; p++) {
                copy_block(m[p / A][p % A], Mt + ((int64_t)p * g.T + t - t_base) * g.K + k0, kb);
            }
            float out[M][M][CB];
            if constexpr (M == 4) {
                output_tile4(m, out);
            } else {
                float tmp[M][A][CB];
                mul_rows(Mats<M>::AT, m, tmp);
                mul_cols(tmp, Mats<M>::AT, out);
            }
            for (int q = 0; q < kb; q++) {
                float* yk       = y + (n * g.K + k0 + q) * OHW;
                const float add = bias != nullptr ? bias[k0 + q] : 0.f;
                for (int i = 0; i < rows; i++) {
                    for (int j = 0; j < cols; j++) {
                        yk[(oy + i) * g.OW + ox + j] = out[i][j][q] + add;
                    }
                }
            }
        }
    }
}

void split(int64_t n, int ith, int nth, int64_t* b, int64_t* e) {
    const int64_t per = (n + nth - 1) / nth;
    *b                = std::min<int64_t>(n, per * ith);
    *e                = std::min<int64_t>(n, *b + per);
}

int tile_of(int64_t positions) {
    return positions == 36 ? 4 : 2;
}

// ---- ggml custom-op bodies -----------------------------------------------------------------------------

// Output channels [k0, k1) of thread ith: whole panels of the packed layout (no two threads share one).
void split_channels(int64_t K, bool packed, int ith, int nth, int64_t* k0, int64_t* k1) {
    if (!packed) {
        split(K, ith, nth, k0, k1);
        return;
    }
    split((K + kGemmPanel - 1) / kGemmPanel, ith, nth, k0, k1);
    *k0 = std::min(K, *k0 * kGemmPanel);
    *k1 = std::min(K, *k1 * kGemmPanel);
}

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

std::atomic<int> g_algorithm{(int)ConvAlgorithm::im2col};

// Graph builds per outcome of the hook since the last reset (ConvRoute order).
std::atomic<int64_t> g_routes[4];

// ---- the dependent stage, hoisted: transformed filters cached per weight tensor ----------------------------
//
// Graphs are rebuilt at every evaluation, but the weights do not change: the filter transform runs once per
// weight and scope, and later graphs read the cached U as a leaf tensor. A scope is the life of a model
// component's compute buffer in stable-diffusion.cpp (a whole sampling loop for the UNet, one decode for the
// VAE): patch 0005 reports the end of it (pysdcpp_weights_released) and the component's filters go with it, so
// the memory they take is only held while that component runs (per-generation hoisting).
// Key: the weight's address, shape and type, the tile size and U's layout, plus a fingerprint of its first and last bytes (a guard against a
// freed model's address being reused; the binding also clears the cache whenever a context closes).

struct FilterKey {
    const void* data;
    int64_t C, K;
    int type, m;
    bool packed;
    bool operator<(const FilterKey& o) const {
        return std::tie(data, C, K, type, m, packed) < std::tie(o.data, o.C, o.K, o.type, o.m, o.packed);
    }
};

struct CachedFilter {
    std::vector<float> U;  // [alpha^2][K][C], or packed per position (FilterKey::packed)
    uint64_t fingerprint;
    const void* owner;  // the weight's backend buffer: the scope it belongs to
};

std::mutex g_cache_mutex;
std::map<FilterKey, std::unique_ptr<CachedFilter>> g_cache;
std::map<FilterKey, const void*> g_seen;  // weights a graph of the current scope has used, not cached (-> owner)
size_t g_cache_bytes  = 0;
size_t g_cache_peak   = 0;  // most bytes cached at once since the last reset
size_t g_cache_budget = kDefaultCacheBudget;
std::atomic<int64_t> g_chunk_bytes{kChunkBytes};

uint64_t weight_fingerprint(const ggml_tensor* w) {
    const size_t n     = ggml_nbytes(w);
    const size_t probe = std::min<size_t>(n, 256);
    uint64_t h         = 1469598103934665603ull;
    const auto* bytes  = (const unsigned char*)w->data;
    for (size_t i = 0; i < probe; i++) {
        h = (h ^ bytes[i]) * 1099511628211ull;
        h = (h ^ bytes[n - 1 - i]) * 1099511628211ull;
    }
    return h;
}

FilterKey key_of(const ggml_tensor* w, int m, bool packed) {
    return FilterKey{w->data, w->ne[2], w->ne[3], (int)w->type, m, packed};
}

// Floats of U: alpha^2 positions of K x C (packed: K rounded up to whole panels, positions position_floats apart).
int64_t filter_floats(int64_t C, int64_t K, int m, bool packed) {
    return (m + 2) * (m + 2) * (packed ? position_floats(C, K) : C * K);
}

size_t filter_bytes(const ggml_tensor* w, int m, bool packed) {
    return (size_t)filter_floats(w->ne[2], w->ne[3], m, packed) * sizeof(float);
}

// The cached U of w, or nullptr. Call with g_cache_mutex held.
const float* lookup_locked(const ggml_tensor* w, int m, bool packed) {
    auto it = g_cache.find(key_of(w, m, packed));
    if (it == g_cache.end()) {
        return nullptr;
    }
    if (it->second->fingerprint == weight_fingerprint(w)) {
        return it->second->U.data();
    }
    g_cache_bytes -= it->second->U.size() * sizeof(float);
    g_cache.erase(it);
    return nullptr;
}

// Computes U for w on all cores (once per weight and scope) and caches it. Call with g_cache_mutex held.
const float* insert_locked(const ggml_tensor* w, int m, bool packed) {
    const int64_t C = w->ne[2], K = w->ne[3];
    auto entry         = std::make_unique<CachedFilter>();
    entry->fingerprint = weight_fingerprint(w);
    entry->owner       = w->buffer;
    entry->U.resize((size_t)filter_floats(C, K, m, packed));
    ggml_cpu_init();  // F16 conversion tables where the CPU has no conversion instructions (idempotent)
    const int nth = std::max(1, std::min<int>((int)std::thread::hardware_concurrency(), 16));
    std::vector<std::thread> pool;
    for (int i = 0; i < nth; i++) {
        pool.emplace_back([&, i]() {
            int64_t k0, k1;
            split_channels(K, packed, i, nth, &k0, &k1);
            if (k0 < k1) {
                transform_filters(w, m, packed, entry->U.data(), k0, k1);
            }
        });
    }
    for (auto& t : pool) {
        t.join();
    }
    g_cache_bytes += entry->U.size() * sizeof(float);
    g_cache_peak = std::max(g_cache_peak, g_cache_bytes);
    g_seen.erase(key_of(w, m, packed));
    const float* U = entry->U.data();
    g_cache[key_of(w, m, packed)] = std::move(entry);
    return U;
}

// U for weight w from the cache, computed now if absent (no budget check: the caller decided).
const float* cached_filter(const ggml_tensor* w, int m, bool packed) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    if (const float* U = lookup_locked(w, m, packed)) {
        return U;
    }
    return insert_locked(w, m, packed);
}

// Where the transformed filters of a layer whose transform is hoisted (winograd_plan) come from at this graph
// build (the cost model's memory half); a `cached` answer has put them in the cache.
FilterSource plan_filter(const ggml_tensor* w, int m, bool packed) {
    const size_t bytes = filter_bytes(w, m, packed);
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    if (lookup_locked(w, m, packed) != nullptr) {
        return FilterSource::cached;
    }
    const FilterKey key  = key_of(w, m, packed);
    const bool first_use = g_seen.emplace(key, w->buffer).second;
    // A U transformed in the graph lives in the compute buffer, which keeps its peak size for the whole scope:
    // small filters only.
    const bool in_graph_ok = bytes <= kMaxInGraphBytes;
    // The first use of a small filter transforms in the graph: a component evaluated once per scope (the VAE
    // decode) then never holds its transformed filters beyond the layer that uses them.
    if (first_use && in_graph_ok) {
        return FilterSource::in_graph;
    }
    if (g_cache_bytes + bytes <= g_cache_budget) {
        insert_locked(w, m, packed);
        return FilterSource::cached;
    }
    // Over budget: a whole U per evaluation where it is small, else the transform inside the products (on these
    // maps the in-graph U measured faster: its products run as one GEMM over all tiles).
    return in_graph_ok ? FilterSource::in_graph : FilterSource::fused;
}

}  // namespace

void winograd_cache_clear() {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache.clear();
    g_seen.clear();
    g_cache_bytes = 0;
}

void winograd_release(const void* owner) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    for (auto it = g_cache.begin(); it != g_cache.end();) {
        if (it->second->owner == owner) {
            g_cache_bytes -= it->second->U.size() * sizeof(float);
            it = g_cache.erase(it);
        } else {
            ++it;
        }
    }
    for (auto it = g_seen.begin(); it != g_seen.end();) {
        it = it->second == owner ? g_seen.erase(it) : std::next(it);
    }
}

size_t winograd_cache_bytes() {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    return g_cache_bytes;
}

size_t winograd_cache_peak_bytes(bool reset) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    const size_t peak = g_cache_peak;
    if (reset) {
        g_cache_peak = g_cache_bytes;
    }
    return peak;
}

void set_winograd_chunk_bytes(int64_t bytes) {
    g_chunk_bytes.store(bytes > 0 ? bytes : kChunkBytes);  // any positive size: kMaxChunks bounds the node count
}

void set_winograd_cache_budget(size_t bytes) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_cache_budget = bytes;
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
    (void)ith;
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
        U = ggml_custom_4d(ctx, GGML_TYPE_F32, u0, u1, P, 1, wargs, 2, filter_node, GGML_N_TASKS_MAX,
                           packed ? (void*)&kPackedU : nullptr);
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
        ggml_tensor* V = ggml_custom_4d(ctx, GGML_TYPE_F32, g.C, t1 - t0, P, 1, xargs, 1, input_chunk_node,
                                        GGML_N_TASKS_MAX, (void*)args);
        // F32 x F32. Ours reads the packed U as it is; ggml's GEMM (kept as a measured alternative) packs nothing
        // either, with tinyBLAS's 4x3 dot-product tiles. (An F16 U would make ggml round V to F16 too, and
        // F(4x4)'s output transform amplifies those roundings to ~4e-3 normalised error; measured, see
        // docs/benchmarks.md.)
        ggml_tensor* Mt = nullptr;  // [K, t1 - t0, P]
        const void* build = gemm == WinogradGemm::own_scalar ? &kGemmScalar : &kGemmVector;
        if (fused) {
            ggml_tensor* gargs[2] = {w, V};
            Mt = ggml_custom_4d(ctx, GGML_TYPE_F32, g.K, t1 - t0, P, 1, gargs, 2, fused_gemm_node,
                                GGML_N_TASKS_MAX, (void*)build);
        } else if (packed) {
            ggml_tensor* gargs[2] = {U, V};
            Mt = ggml_custom_4d(ctx, GGML_TYPE_F32, g.K, t1 - t0, P, 1, gargs, 2, gemm_node, GGML_N_TASKS_MAX,
                                (void*)build);
        } else {
            Mt = ggml_mul_mat(ctx, U, V);
        }
        ggml_tensor* margs[2] = {Mt, bias};
        const int n_margs     = bias != nullptr ? 2 : 1;
        if (y == nullptr) {
            // First chunk: a fresh output tensor (the other chunks' tiles are written by the nodes after it).
            y = ggml_custom_4d(ctx, GGML_TYPE_F32, g.OW, g.OH, g.K, g.N, margs, n_margs, output_first_node,
                               GGML_N_TASKS_MAX, (void*)args);
        } else {
            y = ggml_custom_inplace(ctx, y, margs, n_margs, output_next_node, GGML_N_TASKS_MAX, (void*)args);
        }
    }
    return y;
}

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

void pysdcpp_weights_released(const void* buffer) {
    if (buffer != nullptr) {
        pysdcpp::winograd_release(buffer);
    }
}
