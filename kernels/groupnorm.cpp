// The fused group normalisation (see groupnorm.h), and the harness that runs one on host arrays.
#include "groupnorm.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "ggml_helpers.h"
#include "simd.h"
#include "winograd.h"
#include "work_items.h"
#include "profile.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

namespace pysdcpp {

namespace {

using simd::v8f;

const bool kVector = true, kScalar = false;  // node userdata: the SIMD or the portable scalar build

// The node's three scalars (groups, eps, whether SiLU follows) sit in the last 12 bytes of its op_params, past the
// fields ggml_custom_4d writes there (function, task count, userdata: 24 bytes of 64).
constexpr size_t kParamsOffset = GGML_MAX_OP_PARAMS - 3 * sizeof(int32_t);
constexpr size_t kSiluOffset   = kParamsOffset + 2 * sizeof(int32_t);
static_assert(kParamsOffset >= 3 * sizeof(void*), "ggml's custom-op fields overlap the group-norm parameters");

template <class V>
inline V affine(V x, V a, V b, bool silu) {
    const V t = x * a + b;
    return silu ? simd::times_sigmoid<V>(t, t) : t;
}

template <class V>
void affine_row(const float* x, float* y, int64_t n, float a, float b, bool silu) {
    constexpr int L = simd::lanes<V>();
    const V va = simd::splat<V>(a), vb = simd::splat<V>(b);
    int64_t i  = 0;
    for (; i + L <= n; i += L) {
        simd::store<V>(y + i, affine<V>(simd::load<V>(x + i), va, vb, silu));
    }
    for (; i < n; i++) {
        y[i] = affine<float>(x[i], a, b, silu);
    }
}

// One group of cg channels of P positions: normalises x + offset[c] (offset: the ResNets' time embedding, or
// nullptr), then SiLU where `silu`.
template <class V>
void normalise_group(const float* x, const float* offset, float* y, int64_t cg, int64_t P, const float* gamma,
                     const float* beta, float eps, bool silu) {
    const int64_t n = cg * P;
    // The shift: the mean of a sample of the group (its first elements), close enough to the group's mean that
    // E[(x - s)^2] - E[x - s]^2 keeps its digits.
    const int64_t ns = std::min<int64_t>(n, 64);
    double sample    = 0.0;
    for (int64_t i = 0; i < ns; i++) {
        sample += x[i] + (offset != nullptr ? offset[i / P] : 0.0f);
    }
    const float shift = (float)(sample / (double)ns);
    double s1 = 0.0, s2 = 0.0;
    if (offset == nullptr) {
        simd::shifted_sums<V>(x, n, shift, s1, s2);
    } else {
        for (int64_t c = 0; c < cg; c++) {   // x + o - shift = x - (shift - o)
            simd::shifted_sums<V>(x + c * P, P, shift - offset[c], s1, s2);
        }
    }
    const double m1   = s1 / (double)n;
    const double var  = std::max(0.0, s2 / (double)n - m1 * m1);
    const double mean = shift + m1;
    const double rstd = 1.0 / std::sqrt(var + (double)eps);
    for (int64_t c = 0; c < cg; c++) {
        const double a = rstd * gamma[c];
        const double o = offset != nullptr ? offset[c] : 0.0;
        affine_row<V>(x + c * P, y + c * P, P, (float)a, (float)(beta[c] + (o - mean) * a), silu);
    }
}

// dst y [W, H, C, N]; src[0] = x, src[1] = gamma, src[2] = beta, src[3] = per-(image, channel) offsets [1, 1, C, N]
// added to x first, or absent; op_params: groups, eps, SiLU. One item per (image, group).
void group_norm_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const ggml_tensor* x = dst->src[0];
    const float* gamma   = (const float*)dst->src[1]->data;
    const float* beta    = (const float*)dst->src[2]->data;
    const bool vector    = *(const bool*)userdata;
    int32_t groups = 0;
    float eps      = 0.0f;
    std::memcpy(&groups, (const char*)dst->op_params + kParamsOffset, sizeof(int32_t));
    std::memcpy(&eps, (const char*)dst->op_params + kParamsOffset + sizeof(int32_t), sizeof(float));
    int32_t silu = 0;
    std::memcpy(&silu, (const char*)dst->op_params + kSiluOffset, sizeof(int32_t));
    const float* offsets = dst->src[3] != nullptr ? (const float*)dst->src[3]->data : nullptr;
    const int64_t P = x->ne[0] * x->ne[1], C = x->ne[2], N = x->ne[3], cg = C / groups;
    WorkItems items(dst, nth, N * groups);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t n = item / groups, g = item % groups;
        const int64_t off = (n * C + g * cg) * P;
        const float* xs   = (const float*)x->data + off;
        float* ys         = (float*)dst->data + off;
        const float* os   = offsets != nullptr ? offsets + n * C + g * cg : nullptr;
        if (vector) {
            normalise_group<v8f>(xs, os, ys, cg, P, gamma + g * cg, beta + g * cg, eps, silu != 0);
        } else {
            normalise_group<float>(xs, os, ys, cg, P, gamma + g * cg, beta + g * cg, eps, silu != 0);
        }
    }
}

}  // namespace

ggml_tensor* group_norm_affine(ggml_context* ctx, ggml_tensor* x, int groups, float eps, ggml_tensor* gamma,
                               ggml_tensor* beta, bool vector, ggml_tensor* offset, bool silu) {
    ggml_tensor* args[4] = {x, gamma, beta, offset};
    ggml_tensor* y       = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0], x->ne[1], x->ne[2], x->ne[3], args,
                                                   offset != nullptr ? 4 : 3, group_norm_node, GGML_N_TASKS_MAX,
                                                   (void*)(vector ? &kVector : &kScalar)),
                                    offset != nullptr ? "group_norm.emb" : "group_norm");   // .emb: the add folded in
    const int32_t with_silu = silu ? 1 : 0;
    std::memcpy((char*)y->op_params + kParamsOffset, &groups, sizeof(int32_t));
    std::memcpy((char*)y->op_params + kParamsOffset + sizeof(int32_t), &eps, sizeof(float));
    std::memcpy((char*)y->op_params + kSiluOffset, &with_silu, sizeof(int32_t));
    return y;
}

bool fuse_silu(ggml_tensor* y) {
    int32_t silu = 0;
    if (y->op != GGML_OP_CUSTOM || custom_fun(y) != group_norm_node) {
        return false;
    }
    std::memcpy(&silu, (const char*)y->op_params + kSiluOffset, sizeof(int32_t));
    if (silu != 0) {
        return false;
    }
    silu = 1;
    std::memcpy((char*)y->op_params + kSiluOffset, &silu, sizeof(int32_t));
    return true;
}

}  // namespace pysdcpp

ggml_tensor* pysdcpp_group_norm_hook(ggml_context* ctx, ggml_tensor* x, ggml_tensor* gamma, ggml_tensor* beta,
                                     int groups, float eps) {
    using namespace pysdcpp;
    if (conv_algorithm() != ConvAlgorithm::winograd) {
        return nullptr;
    }
    const int64_t C = x->ne[2];
    const bool eligible = ggml_n_dims(x) >= 3 && x->type == GGML_TYPE_F32 && ggml_is_contiguous(x) && groups > 0 &&
                          C % groups == 0 && f32_values(gamma, C) && f32_values(beta, C);
    if (!eligible) {
        return nullptr;
    }
    // x = h + e with e [1, 1, C, N] (a ResNet's time embedding; on 1x1 maps any add of two such tensors, exact
    // there too): the node reads h and e and adds e itself; the add stays in the graph only if something else
    // reads its result. This assumes nothing writes h or e in place before the norm runs (an in-place add
    // x itself is refused); upstream's UNets build no such op.
    ggml_tensor* h = x->op == GGML_OP_ADD ? x->src[0] : nullptr;
    ggml_tensor* e = x->op == GGML_OP_ADD ? x->src[1] : nullptr;
    if (h != nullptr && e != nullptr && x->view_src == nullptr && h->type == GGML_TYPE_F32 && ggml_is_contiguous(h) && ggml_are_same_shape(h, x) &&
        e->type == GGML_TYPE_F32 && ggml_is_contiguous(e) && e->ne[0] == 1 && e->ne[1] == 1 && e->ne[2] == C &&
        e->ne[3] == x->ne[3]) {
        return group_norm_affine(ctx, h, groups, eps, gamma, beta, true, e);
    }
    return group_norm_affine(ctx, x, groups, eps, gamma, beta);
}

ggml_tensor* pysdcpp_silu_hook(ggml_context* ctx, ggml_tensor* x) {
    return pysdcpp::fuse_silu(x) ? x : ggml_silu_inplace(ctx, x);
}

// ---- harness: one group normalisation on host arrays (kernel tests) ------------------------------------------

namespace {
std::string g_norm_error;
}

extern "C" SD_API const char* pysdcpp_group_norm_last_error(void) {
    return g_norm_error.c_str();
}

extern "C" SD_API int pysdcpp_group_norm(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int groups,
                                         float eps, const float* gamma, const float* beta, const float* offset,
                                         int silu, int path, int n_threads, int repeat, float* y, double* seconds) {
    using namespace pysdcpp;
    if (N < 1 || C < 1 || H < 1 || W < 1 || groups < 1 || C % groups != 0 || !(eps >= 0.0f) || n_threads < 1 ||
        repeat < 1 || gamma == nullptr || beta == nullptr || path < PYSDCPP_PATH_UPSTREAM ||
        path > PYSDCPP_PATH_FAST_SCALAR) {
        g_norm_error = "invalid group-norm arguments";
        return 1;
    }
    try {
        const size_t bytes = 2 * sizeof(float) * (size_t)(3 * N * C * H * W + 2 * C + N * C) + (16 << 20);
        HarnessContext harness(bytes, "group-norm");
        ggml_context* ctx = harness.get();
        if (ctx == nullptr) {
            g_norm_error = harness.error();
            return 1;
        }
        ggml_tensor* tx = host_tensor(ctx, x, false, W, H, C, N);
        ggml_tensor* tg = host_tensor(ctx, gamma, false, C);
        ggml_tensor* tb = host_tensor(ctx, beta, false, C);
        ggml_tensor* to = offset != nullptr ? host_tensor(ctx, offset, false, 1, 1, C, N) : nullptr;
        ggml_tensor* out = nullptr;
        if (path == PYSDCPP_PATH_UPSTREAM) {  // what upstream's ResNets build without the hooks
            out = to != nullptr ? ggml_add(ctx, tx, to) : tx;
            out = ggml_group_norm(ctx, out, groups, eps);
            out = ggml_mul_inplace(ctx, out, ggml_reshape_4d(ctx, tg, 1, 1, C, 1));
            out = ggml_add_inplace(ctx, out, ggml_reshape_4d(ctx, tb, 1, 1, C, 1));
            out = silu != 0 ? ggml_silu_inplace(ctx, out) : out;
        } else {
            out = group_norm_affine(ctx, tx, groups, eps, tg, tb, path == PYSDCPP_PATH_FAST, to, silu != 0);
        }
        return compute_into(ctx, out, n_threads, repeat, seconds, y, g_norm_error) ? 0 : 1;
    } catch (const std::exception& e) {
        g_norm_error = e.what();
        return 1;
    }
}
