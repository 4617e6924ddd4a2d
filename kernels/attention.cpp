// Fused and GEMM-arranged attention nodes (see attention.h).
#include "attention.h"
#include "gemm_tile.h"
#include "simd.h"
#include "profile.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace pysdcpp {
namespace {

std::atomic<int> g_mode{(int)AttentionMode::fast};

// Tiling of the fused kernel. A task is (batch, head, BQ query rows); it walks the keys in blocks of bk (BK, or
// fewer for large heads so that a block's keys and values stay in L2).
// Working set per task at d = 80: Q 20 KB, K^T and V blocks 40 KB each, scores 32 KB, output 20 KB: L2-resident.
// The keys and values are packed once per call (pack_node), block by block, shared by all query blocks.
constexpr int64_t BQ = 64;  // query rows per task
constexpr int64_t BK = 128;  // keys per block (a multiple of NR), at most
constexpr int MR_QK  = 6;   // query rows per register tile of Q K^T
constexpr int MR_PV  = 4;   // query rows per register tile of P V
constexpr int64_t BQR = (BQ + 11) / 12 * 12;  // rows of the per-thread buffers (whole tiles of either kind)
constexpr int NR     = 16;  // key columns per register tile of Q K^T
constexpr int DP     = 8;   // head size padded to a multiple of this in the packed buffers

// The kernels are written once over a "vector" type V (simd.h): v8f or plain float (the portable scalar build,
// same algorithm and blocking).
using namespace simd;

template <class V>
inline V vmax(V a, V b);

template <>
inline float vmax<float>(float a, float b) {
    return a > b ? a : b;
}

template <>
inline v8f vmax<v8f>(v8f a, v8f b) {
    return a > b ? a : b;
}

template <class V>
inline float hmax(V a);

template <>
inline float hmax<float>(float a) {
    return a;
}

template <>
inline float hmax<v8f>(v8f a) {
    float m = a[0];
    for (int i = 1; i < 8; i++) {
        m = a[i] > m ? a[i] : m;
    }
    return m;
}

template <class V>
inline float hsum(V a);

template <>
inline float hsum<float>(float a) {
    return a;
}

template <>
inline float hsum<v8f>(v8f a) {
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

struct Scratch {
    std::vector<float> q, s, o, m, l;
};

// Geometry shared by the packing node and the attention node.
struct Geometry {
    int64_t H, d, dp, Lq, Lk, N, n_qb, n_kb, bk;

    static Geometry make(int64_t C, int64_t H, int64_t Lq, int64_t Lk, int64_t N) {
        Geometry g;
        g.H    = H;
        g.d    = C / H;
        g.dp   = (g.d + DP - 1) / DP * DP;
        g.Lq   = Lq;
        g.Lk   = Lk;
        g.N    = N;
        g.n_qb = (Lq + BQ - 1) / BQ;
        g.bk   = g.dp <= 160 ? BK : g.dp <= 320 ? BK / 2 : BK / 4;
        g.n_kb = (Lk + g.bk - 1) / g.bk;
        return g;
    }
    // Packed keys and values of one block: K^T [dp][bk] then V [bk][dp], zero-padded.
    int64_t block_floats() const { return 2 * bk * dp; }
    int64_t packed_floats() const { return N * H * n_kb * block_floats(); }
};

// S[MR_QK][NR] tile of the scores: Q rows r0.. times K^T columns j0.. (Q pre-scaled).
template <class V>
inline void qk_tile(const float* Q, const float* KT, float* S, int64_t d, int64_t dp, int64_t bk) {
    gemm_tile<V, MR_QK, NR>(Q, dp, KT, bk, d, S, bk, false);
}

// O[MR_PV][NC] += P[MR_PV][nk] Vb[nk][NC] for the columns c0..c0+NC of the output rows r0..
template <class V, int NC>
inline void pv_tile(const float* P, const float* Vb, float* O, int64_t nk, int64_t dp, int64_t bk) {
    gemm_tile<V, MR_PV, NC>(P, bk, Vb, dp, nk, O, dp, true);
}

// Online softmax of one score row against the running max m and sum l: the row becomes probabilities
// (relative to the new max); returns the factor the running output row must be scaled by.
template <class V>
inline float softmax_row(float* srow, int64_t nk, float& m, float& l) {
    constexpr int W = lanes<V>();
    const int64_t nv = nk - nk % W;
    V vm             = splat<V>(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < nv; j += W) {
        vm = vmax<V>(vm, load<V>(srow + j));
    }
    float mx = std::max(m, hmax<V>(vm));
    for (int64_t j = nv; j < nk; j++) {
        mx = std::max(mx, srow[j]);
    }
    const float alpha = std::exp2(m - mx);  // 0 on the first block (m = -inf)
    V vs              = V{};
    const V vmx       = splat<V>(mx);
    for (int64_t j = 0; j < nv; j += W) {
        const V p = exp2_neg<V>(load<V>(srow + j) - vmx);
        store<V>(srow + j, p);
        vs += p;
    }
    float sum = hsum<V>(vs);
    for (int64_t j = nv; j < nk; j++) {
        const float p = std::exp2(srow[j] - mx);
        srow[j]       = p;
        sum += p;
    }
    l = l * alpha + sum;
    m = mx;
    return alpha;
}

// The packing node: keys transposed and values copied, block by block, zero-padded (done once per call, shared
// by every query block of the head). dst [block_floats, n_kb, H, N]; src = k, v [C, L_k, N].
void pack_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    const ggml_tensor* k = dst->src[0];
    const ggml_tensor* v = dst->src[1];
    const Geometry g     = Geometry::make(k->ne[0], (int64_t)(intptr_t)userdata, 1, k->ne[1], k->ne[2]);
    const int64_t blocks = g.N * g.H * g.n_kb;
    for (int64_t t = ith; t < blocks; t += nth) {
        const int64_t b = t % g.n_kb, h = (t / g.n_kb) % g.H, n = t / (g.n_kb * g.H);
        float* KT       = (float*)dst->data + t * g.block_floats();
        float* Vb       = KT + g.bk * g.dp;
        std::fill(KT, KT + g.block_floats(), 0.0f);
        const int64_t j0 = b * g.bk, nk = std::min(g.bk, g.Lk - j0);
        for (int64_t j = 0; j < nk; j++) {
            const float* krow = (const float*)((const char*)k->data + n * k->nb[2] + (j0 + j) * k->nb[1]) + h * g.d;
            const float* vrow = (const float*)((const char*)v->data + n * v->nb[2] + (j0 + j) * v->nb[1]) + h * g.d;
            for (int64_t c = 0; c < g.d; c++) {
                KT[c * g.bk + j] = krow[c];
            }
            std::memcpy(Vb + j * g.dp, vrow, sizeof(float) * (size_t)g.d);
        }
    }
}

template <class V>
void attend_task(const Geometry& g, const ggml_tensor* q, const float* packed, ggml_tensor* dst, int64_t n,
                 int64_t h, int64_t qb, Scratch& w) {
    const int64_t d = g.d, dp = g.dp;
    const int64_t i0    = qb * BQ;
    const int64_t nq    = std::min(BQ, g.Lq - i0);
    const int64_t nr_qk = (nq + MR_QK - 1) / MR_QK * MR_QK;  // rows computed (padding rows of Q are zero)
    const int64_t nr_pv = (nq + MR_PV - 1) / MR_PV * MR_PV;
    float* Q = w.q.data();
    float* S = w.s.data();
    float* O = w.o.data();
    float* M = w.m.data();
    float* L = w.l.data();

    // log2(e) / sqrt(d) folded into Q: the softmax then works in powers of two.
    const float qscale = (float)(1.4426950408889634 / std::sqrt((double)d));
    std::fill(Q, Q + BQR * dp, 0.0f);
    for (int64_t r = 0; r < nq; r++) {
        const float* row = (const float*)((const char*)q->data + n * q->nb[2] + (i0 + r) * q->nb[1]) + h * d;
        for (int64_t c = 0; c < d; c++) {
            Q[r * dp + c] = row[c] * qscale;
        }
    }
    std::fill(O, O + BQR * dp, 0.0f);
    const int64_t bk = g.bk;
    std::fill(S, S + BQR * bk, 0.0f);  // rows past nq stay zero: they add nothing to O
    std::fill(M, M + BQR, -std::numeric_limits<float>::infinity());
    std::fill(L, L + BQR, 0.0f);

    const float* blocks = packed + (n * g.H + h) * g.n_kb * g.block_floats();
    for (int64_t b = 0; b < g.n_kb; b++) {
        const float* KT   = blocks + b * g.block_floats();
        const float* Vb   = KT + bk * dp;
        const int64_t nk  = std::min(bk, g.Lk - b * bk);
        const int64_t nkr = (nk + NR - 1) / NR * NR;
        for (int64_t r0 = 0; r0 < nr_qk; r0 += MR_QK) {
            for (int64_t j = 0; j < nkr; j += NR) {
                qk_tile<V>(Q + r0 * dp, KT + j, S + r0 * bk + j, d, dp, bk);
            }
        }
        for (int64_t r = 0; r < nq; r++) {
            const float alpha = softmax_row<V>(S + r * bk, nk, M[r], L[r]);
            if (alpha != 1.0f) {
                float* orow = O + r * dp;
                for (int64_t c = 0; c < dp; c++) {
                    orow[c] *= alpha;
                }
            }
        }
        for (int64_t r = nq; r < nr_qk; r++) {
            std::fill(S + r * bk, S + r * bk + nkr, 0.0f);
        }
        for (int64_t r0 = 0; r0 < nr_pv; r0 += MR_PV) {
            int64_t c0 = 0;
            for (; c0 + 24 <= dp; c0 += 24) {
                pv_tile<V, 24>(S + r0 * bk, Vb + c0, O + r0 * dp + c0, nk, dp, bk);
            }
            if (dp - c0 == 16) {
                pv_tile<V, 16>(S + r0 * bk, Vb + c0, O + r0 * dp + c0, nk, dp, bk);
            } else if (dp - c0 == 8) {
                pv_tile<V, 8>(S + r0 * bk, Vb + c0, O + r0 * dp + c0, nk, dp, bk);
            }
        }
    }
    for (int64_t r = 0; r < nq; r++) {
        float* out        = (float*)((char*)dst->data + n * dst->nb[2] + (i0 + r) * dst->nb[1]) + h * d;
        const float inv_l = 1.0f / L[r];
        for (int64_t c = 0; c < d; c++) {
            out[c] = O[r * dp + c] * inv_l;
        }
    }
}

// The attention node: dst [C, L_q, N]; src = q [C, L_q, N], packed keys/values (pack_node), k (for L_k).
template <class V>
void fused_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    const ggml_tensor* q = dst->src[0];
    const float* packed  = (const float*)dst->src[1]->data;
    const int64_t Lk     = dst->src[2]->ne[1];
    const Geometry g     = Geometry::make(q->ne[0], (int64_t)(intptr_t)userdata, q->ne[1], Lk, q->ne[2]);
    thread_local Scratch w;
    w.q.resize((size_t)(BQR * g.dp));
    w.s.resize((size_t)(BQR * g.bk));
    w.o.resize((size_t)(BQR * g.dp));
    w.m.resize(BQR);
    w.l.resize(BQR);
    // Tasks of one head are adjacent, so the threads share that head's keys and values in cache.
    const int64_t tasks = g.N * g.H * g.n_qb;
    for (int64_t t = ith; t < tasks; t += nth) {
        const int64_t qb = t % g.n_qb;
        const int64_t h  = (t / g.n_qb) % g.H;
        const int64_t n  = t / (g.n_qb * g.H);
        attend_task<V>(g, q, packed, dst, n, h, qb, w);
    }
}

ggml_tensor* gemm_attention(ggml_context* ctx, ggml_tensor* q, ggml_tensor* k, ggml_tensor* v, int64_t H) {
    const int64_t C = q->ne[0], Lq = q->ne[1], Lk = k->ne[1], N = q->ne[2];
    const int64_t d  = C / H;
    const int64_t dp = (d + 15) / 16 * 16;
    auto heads_first = [&](ggml_tensor* x, int64_t L) {  // [C, L, N] -> [dp, L, H * N], zero-padded
        x = ggml_reshape_4d(ctx, ggml_is_contiguous(x) ? x : ggml_cont(ctx, x), d, H, L, N);
        if (dp != d) {
            x = ggml_pad(ctx, x, (int)(dp - d), 0, 0, 0);
        }
        x = ggml_cont(ctx, ggml_permute(ctx, x, 0, 2, 1, 3));
        return ggml_reshape_3d(ctx, x, dp, L, H * N);
    };
    ggml_tensor* qh = heads_first(q, Lq);
    ggml_tensor* kh = heads_first(k, Lk);
    // v as [L_k, d, H * N]: the second product contracts over the keys.
    ggml_tensor* vt = ggml_reshape_4d(ctx, ggml_is_contiguous(v) ? v : ggml_cont(ctx, v), d, H, Lk, N);
    vt              = ggml_cont(ctx, ggml_permute(ctx, vt, 1, 2, 0, 3));
    vt              = ggml_reshape_3d(ctx, vt, Lk, d, H * N);
    ggml_tensor* s  = ggml_mul_mat(ctx, kh, qh);  // [L_k, L_q, H * N]
    ggml_mul_mat_set_prec(s, GGML_PREC_F32);
    s              = ggml_soft_max_ext(ctx, s, nullptr, 1.0f / std::sqrt((float)d), 0.0f);
    ggml_tensor* o = ggml_mul_mat(ctx, vt, s);  // [d, L_q, H * N]
    o              = ggml_reshape_4d(ctx, o, d, Lq, H, N);
    o              = ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3));  // [d, H, L_q, N]
    return ggml_reshape_3d(ctx, o, C, Lq, N);
}

}  // namespace

ggml_tensor* attention(ggml_context* ctx, ggml_tensor* q, ggml_tensor* k, ggml_tensor* v, int64_t n_head,
                       AttentionVariant variant) {
    if (variant == AttentionVariant::gemm) {
        return gemm_attention(ctx, q, k, v, n_head);
    }
    const Geometry g      = Geometry::make(q->ne[0], n_head, q->ne[1], k->ne[1], q->ne[2]);
    ggml_tensor* kv[2]    = {k, v};
    ggml_tensor* packed   = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, g.block_floats(), g.n_kb, g.H, g.N, kv, 2,
                                                    pack_node, GGML_N_TASKS_MAX, (void*)(intptr_t)n_head),
                                     "attention.pack");
    ggml_tensor* args[3]  = {q, packed, k};  // k only for its length
    ggml_custom_op_t fn   = variant == AttentionVariant::fused_scalar ? fused_node<float> : fused_node<v8f>;
    return labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2], 1, args, 3, fn, GGML_N_TASKS_MAX,
                                   (void*)(intptr_t)n_head),
                    "attention.fused");
}

AttentionVariant attention_choose(int64_t d_head, int64_t L_q, int64_t L_k) {
    // Measured (docs/benchmarks.md, 2 threads, steady state): the fused kernel beats upstream's path on every
    // UNet attention of SD1.x/SD2.x (2-core Zen 3: d = 40..160; 1.04-1.70x self-attention, 2.9-6.1x
    // cross-attention) and SDXL (2-core Zen 4: 1.8-2.2x self, 4.3-6.8x cross), and the padded-GEMM arrangement
    // never wins by more than noise. With one 512-wide head (the VAE's mid-block) ggml's GEMM wins up to 9216
    // tokens (Zen 3: 1.15x at 9216), while at 16384 (a 1024 px decode) its 1 GB score matrix costs more than it
    // gains: fused 1.21x faster there (Zen 4) and 160 MB of compute buffer instead of 1152.
    if (d_head <= 256) {
        return AttentionVariant::fused;
    }
    return L_q * L_k >= kFusedWideScores ? AttentionVariant::fused : AttentionVariant::none;
}

AttentionMode attention_mode() {
    return (AttentionMode)g_mode.load(std::memory_order_relaxed);
}

void set_attention_mode(AttentionMode mode) {
    g_mode.store((int)mode, std::memory_order_relaxed);
}

}  // namespace pysdcpp

ggml_tensor* pysdcpp_attention_hook(ggml_context* ctx, ggml_tensor* q, ggml_tensor* k, ggml_tensor* v,
                                    int64_t n_head) {
    using namespace pysdcpp;
    if (attention_mode() != AttentionMode::fast || n_head < 1) {
        return nullptr;
    }
    const int64_t C      = q->ne[0];
    const bool eligible  = q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F32 && v->type == GGML_TYPE_F32 &&
                          C % n_head == 0 && k->ne[0] == C && v->ne[0] == C && k->ne[1] == v->ne[1] &&
                          k->ne[2] == q->ne[2] && v->ne[2] == q->ne[2] && q->ne[3] == 1 && k->ne[3] == 1 &&
                          v->ne[3] == 1 && q->nb[0] == sizeof(float) && k->nb[0] == sizeof(float) &&
                          v->nb[0] == sizeof(float);
    if (!eligible) {
        return nullptr;
    }
    const AttentionVariant variant = attention_choose(C / n_head, q->ne[1], k->ne[1]);
    return variant == AttentionVariant::none ? nullptr : attention(ctx, q, k, v, n_head, variant);
}
