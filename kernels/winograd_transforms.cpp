// The Winograd transforms (see winograd_transforms.h): the F(4x4,3x3) and F(2x2,3x3) matrices, their 1-D passes
// written out, and the filter, input and output transforms over blocks of channels, plain or packed for our GEMM.
#include "winograd_transforms.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "ggml-cpu.h"
#include "pack.h"
#include "simd.h"

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

}  // namespace

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

template void input_transform<4>(const float*, const ConvGeometry&, float*, int64_t, int64_t, int64_t);
template void input_transform<2>(const float*, const ConvGeometry&, float*, int64_t, int64_t, int64_t);
template void output_transform<4>(const float*, const ConvGeometry&, const float*, float*, int64_t, int64_t,
                                  int64_t);
template void output_transform<2>(const float*, const ConvGeometry&, const float*, float*, int64_t, int64_t,
                                  int64_t);

}  // namespace pysdcpp
