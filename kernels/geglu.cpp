// The fused GEGLU node (see geglu.h), and the harness that runs one on host arrays.
#include "geglu.h"

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

constexpr float kTanhScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kCubic     = 0.044715f;

// value * gelu(gate) = value * gate * sigmoid(2 sqrt(2/pi) (gate + 0.044715 gate^3))
template <class V>
inline V geglu_of(V value, V gate) {
    return value * simd::times_sigmoid<V>(gate, (2.0f * kTanhScale) * (gate + kCubic * gate * gate * gate));
}

template <class V>
void geglu_row(const float* p, float* y, int64_t D) {
    constexpr int L = simd::lanes<V>();
    int64_t j       = 0;
    for (; j + L <= D; j += L) {
        simd::store<V>(y + j, geglu_of<V>(simd::load<V>(p + j), simd::load<V>(p + D + j)));
    }
    for (; j < D; j++) {
        y[j] = geglu_of<float>(p[j], p[D + j]);
    }
}

// dst y [D, rows...]; src[0] = p [2D, rows...]. Items: runs of whole rows (for_each_row).
void geglu_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const bool vector = *(const bool*)userdata;
    const int64_t D   = dst->ne[0];
    const float* P    = (const float*)dst->src[0]->data;
    float* Y          = (float*)dst->data;
    for_each_row(dst, nth, ggml_nrows(dst), D, [&](int64_t r) {
        if (vector) {
            geglu_row<v8f>(P + r * 2 * D, Y + r * D, D);
        } else {
            geglu_row<float>(P + r * 2 * D, Y + r * D, D);
        }
    });
}

}  // namespace

ggml_tensor* geglu(ggml_context* ctx, ggml_tensor* p, bool vector) {
    ggml_tensor* args[1] = {p};
    return labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, p->ne[0] / 2, p->ne[1], p->ne[2], p->ne[3], args, 1,
                                   geglu_node, GGML_N_TASKS_MAX, (void*)(vector ? &kVector : &kScalar)),
                    "geglu");
}

}  // namespace pysdcpp

ggml_tensor* pysdcpp_geglu_hook(ggml_context* ctx, ggml_tensor* p) {
    using namespace pysdcpp;
    if (linear_mode() != LinearMode::fast) {
        return nullptr;
    }
    const bool eligible = p->type == GGML_TYPE_F32 && ggml_is_contiguous(p) && p->ne[0] % 2 == 0;
    return eligible ? geglu(ctx, p) : nullptr;
}

// ---- harness: one GEGLU on host arrays (kernel tests, benchmarks) --------------------------------------------

namespace {
std::string g_geglu_error;
}

extern "C" SD_API const char* pysdcpp_geglu_last_error(void) {
    return g_geglu_error.c_str();
}

extern "C" SD_API int pysdcpp_geglu(const float* p, int64_t rows, int64_t D, int path, int n_threads, int repeat,
                                    float* y, double* seconds) {
    using namespace pysdcpp;
    if (rows < 1 || D < 1 || n_threads < 1 || repeat < 1 || path < PYSDCPP_PATH_UPSTREAM ||
        path > PYSDCPP_PATH_FAST_SCALAR) {
        g_geglu_error = "invalid GEGLU arguments";
        return 1;
    }
    try {
        const size_t bytes = 2 * sizeof(float) * (size_t)(rows * D * 5) + (16 << 20);
        HarnessContext harness(bytes, "GEGLU");
        ggml_context* ctx = harness.get();
        if (ctx == nullptr) {
            g_geglu_error = harness.error();
            return 1;
        }
        ggml_tensor* tp  = host_tensor(ctx, p, false, 2 * D, rows);
        ggml_tensor* out = nullptr;
        if (path == PYSDCPP_PATH_UPSTREAM) {  // what upstream's GEGLU builds after its projection
            ggml_tensor* value = ggml_view_2d(ctx, tp, D, rows, tp->nb[1], 0);
            ggml_tensor* gate  = ggml_cont(ctx, ggml_view_2d(ctx, tp, D, rows, tp->nb[1], D * sizeof(float)));
            out                = ggml_mul(ctx, value, ggml_gelu_inplace(ctx, gate));
        } else {
            out = geglu(ctx, tp, path == PYSDCPP_PATH_FAST);
        }
        return compute_into(ctx, out, n_threads, repeat, seconds, y, g_geglu_error) ? 0 : 1;
    } catch (const std::exception& e) {
        g_geglu_error = e.what();
        return 1;
    }
}
