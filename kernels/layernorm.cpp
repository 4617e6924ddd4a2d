// The fused layer normalisation (see layernorm.h), and the harness that runs one on host arrays.
#include "layernorm.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <string>

#include "ggml_helpers.h"
#include "linear.h"
#include "profile.h"
#include "simd.h"
#include "work_items.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

namespace pysdcpp {

namespace {

using simd::v8f;

const bool kVector = true, kScalar = false;  // node userdata: the SIMD or the portable scalar build


// eps sits in the last 4 bytes of the node's op_params, past ggml_custom_4d's fields (24 bytes of 64).
constexpr size_t kEpsOffset = GGML_MAX_OP_PARAMS - sizeof(float);
static_assert(kEpsOffset >= 3 * sizeof(void*), "ggml's custom-op fields overlap the layer-norm parameter");

// Two passes over the row (in cache): a first mean, then the sums about it, whose first moment corrects the mean
// and the variance (the first mean's float rounding does not reach the result).
template <class V>
void normalise_row(const float* x, float* y, int64_t C, const float* gamma, const float* beta, float eps) {
    constexpr int L = simd::lanes<V>();
    double s1 = 0.0, s2 = 0.0;
    simd::shifted_sums<V>(x, C, 0.0f, s1, s2);
    const float m0 = (float)(s1 / (double)C);
    s1 = s2 = 0.0;
    simd::shifted_sums<V>(x, C, m0, s1, s2);
    const double d1   = s1 / (double)C;
    const double mean = m0 + d1;
    const double var  = std::max(0.0, s2 / (double)C - d1 * d1);
    const float rstd  = (float)(1.0 / std::sqrt(var + (double)eps));
    const V vm = simd::splat<V>((float)mean), vr = simd::splat<V>(rstd);
    int64_t c = 0;
    for (; c + L <= C; c += L) {
        V t = (simd::load<V>(x + c) - vm) * vr * simd::load<V>(gamma + c);
        if (beta != nullptr) {
            t += simd::load<V>(beta + c);
        }
        simd::store<V>(y + c, t);
    }
    for (; c < C; c++) {
        y[c] = (x[c] - (float)mean) * rstd * gamma[c] + (beta != nullptr ? beta[c] : 0.0f);
    }
}

// dst y [C, rows...]; src[0] = x, src[1] = gamma, src[2] = beta or absent. Items: runs of whole rows (for_each_row).
void layer_norm_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const bool vector  = *(const bool*)userdata;
    float eps          = 0.0f;
    std::memcpy(&eps, (const char*)dst->op_params + kEpsOffset, sizeof(float));
    const int64_t C    = dst->ne[0];
    const float* X     = (const float*)dst->src[0]->data;
    const float* gamma = (const float*)dst->src[1]->data;
    const float* beta  = dst->src[2] != nullptr ? (const float*)dst->src[2]->data : nullptr;
    float* Y           = (float*)dst->data;
    for_each_row(dst, nth, ggml_nrows(dst), C, [&](int64_t r) {
        if (vector) {
            normalise_row<v8f>(X + r * C, Y + r * C, C, gamma, beta, eps);
        } else {
            normalise_row<float>(X + r * C, Y + r * C, C, gamma, beta, eps);
        }
    });
}

}  // namespace

ggml_tensor* layer_norm_affine(ggml_context* ctx, ggml_tensor* x, float eps, ggml_tensor* gamma, ggml_tensor* beta,
                               bool vector) {
    ggml_tensor* args[3] = {x, gamma, beta};
    ggml_tensor* y = labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0], x->ne[1], x->ne[2], x->ne[3], args,
                                             beta != nullptr ? 3 : 2, layer_norm_node, GGML_N_TASKS_MAX,
                                             (void*)(vector ? &kVector : &kScalar)),
                              "layer_norm");
    std::memcpy((char*)y->op_params + kEpsOffset, &eps, sizeof(float));
    return y;
}

}  // namespace pysdcpp

ggml_tensor* pysdcpp_layer_norm_hook(ggml_context* ctx, ggml_tensor* x, ggml_tensor* gamma, ggml_tensor* beta,
                                     float eps) {
    using namespace pysdcpp;
    if (linear_mode() != LinearMode::fast) {
        return nullptr;
    }
    const int64_t C = x->ne[0];
    const bool eligible = x->type == GGML_TYPE_F32 && ggml_is_contiguous(x) && fusable_bias(gamma, C) &&
                          (beta == nullptr || fusable_bias(beta, C));
    return eligible ? layer_norm_affine(ctx, x, eps, gamma, beta) : nullptr;
}

// ---- harness: one layer normalisation on host arrays (kernel tests) ------------------------------------------

namespace {
std::string g_layer_norm_error;
}

extern "C" SD_API const char* pysdcpp_layer_norm_last_error(void) {
    return g_layer_norm_error.c_str();
}

extern "C" SD_API int pysdcpp_layer_norm(const float* x, int64_t rows, int64_t C, float eps, const float* gamma,
                                         const float* beta, int path, int n_threads, int repeat, float* y,
                                         double* seconds) {
    using namespace pysdcpp;
    if (rows < 1 || C < 1 || !(eps >= 0.0f) || gamma == nullptr || n_threads < 1 || repeat < 1 ||
        path < PYSDCPP_PATH_UPSTREAM || path > PYSDCPP_PATH_FAST_SCALAR) {
        g_layer_norm_error = "invalid layer-norm arguments";
        return 1;
    }
    try {
        const size_t bytes = 2 * sizeof(float) * (size_t)(3 * rows * C + 2 * C) + (16 << 20);
        HarnessContext harness(bytes, "layer-norm");
        ggml_context* ctx = harness.get();
        if (ctx == nullptr) {
            g_layer_norm_error = harness.error();
            return 1;
        }
        ggml_tensor* tx  = host_tensor(ctx, x, false, C, rows);
        ggml_tensor* tg  = host_tensor(ctx, gamma, false, C);
        ggml_tensor* tb  = host_tensor(ctx, beta, false, C);
        ggml_tensor* out = nullptr;
        if (path == PYSDCPP_PATH_UPSTREAM) {  // what ggml_ext_layer_norm builds without the hook
            out = ggml_mul_inplace(ctx, ggml_norm(ctx, tx, eps), tg);
            out = tb != nullptr ? ggml_add_inplace(ctx, out, tb) : out;
        } else {
            out = layer_norm_affine(ctx, tx, eps, tg, tb, path == PYSDCPP_PATH_FAST);
        }
        return compute_into(ctx, out, n_threads, repeat, seconds, y, g_layer_norm_error) ? 0 : 1;
    } catch (const std::exception& e) {
        g_layer_norm_error = e.what();
        return 1;
    }
}
