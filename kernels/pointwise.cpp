// 1x1 convolutions through our GEMM (see pointwise.h), and the harness that runs one on host arrays.
#include "pointwise.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "gemm.h"
#include "ggml_helpers.h"
#include "work_items.h"
#include "ggml-cpu.h"
#include "profile.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

namespace pysdcpp {

namespace {

const bool kVector = true, kScalar = false;  // node userdata: which build of the GEMM

// dst y [W, H, K, N]; src[0] = x [W, H, C, N], src[1] = w [1, 1, C, K], src[2] = bias [K] or absent. Work items
// are (image, block of positions), claimed dynamically; narrower blocks (two panels) when the wide ones would
// leave a thread without enough items.
void pointwise_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const ggml_tensor* x = dst->src[0];
    const ggml_tensor* w = dst->src[1];
    const ggml_tensor* b = dst->src[2];
    const int64_t P = x->ne[0] * x->ne[1], C = x->ne[2], N = x->ne[3], K = w->ne[3];
    const bool vector   = *(const bool*)userdata;
    int64_t width       = kGemmCols;
    if (N * ((P + width - 1) / width) < 4 * nth) {
        width = 2 * kGemmPanel;
    }
    const int64_t n_blocks = (P + width - 1) / width;
    thread_local std::vector<float> a_f32, pack;
    const float* A = (const float*)w->data;
    if (w->type == GGML_TYPE_F16) {
        a_f32.resize((size_t)(K * C));
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t*)w->data, a_f32.data(), K * C);
        A = a_f32.data();
    }
    pack.resize((size_t)(kGemmDepth * gemm_packed_floats(1, width)));
    WorkItems items(dst, nth, N * n_blocks);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t n = item / n_blocks, j0 = (item % n_blocks) * width, j1 = std::min(P, j0 + width);
        const float* X = (const float*)x->data + n * C * P;
        float* Y       = (float*)dst->data + n * K * P;
        for (int64_t l0 = 0; l0 < C; l0 += kGemmDepth) {
            const int64_t kd = std::min(kGemmDepth, C - l0);
            // Panels of 16 positions: row l of a panel is x[l0 + l][j .. j + 16), zero past j1.
            for (int64_t j = j0; j < j1; j += kGemmPanel) {
                float* panel     = pack.data() + ((j - j0) / kGemmPanel) * kd * kGemmPanel;
                const int64_t nj = std::min<int64_t>(kGemmPanel, j1 - j);
                for (int64_t l = 0; l < kd; l++) {
                    float* dstp = panel + l * kGemmPanel;
                    std::memcpy(dstp, X + (l0 + l) * P + j, sizeof(float) * (size_t)nj);
                    std::fill(dstp + nj, dstp + kGemmPanel, 0.0f);
                }
            }
            gemm_block(A + l0, C, pack.data(), kd * kGemmPanel, kd, j1 - j0, Y + j0, P, 0, K, l0 > 0, vector);
        }
        if (b != nullptr) {
            const float* bias = (const float*)b->data;
            for (int64_t k = 0; k < K; k++) {
                float* y = Y + k * P;
                for (int64_t j = j0; j < j1; j++) {
                    y[j] += bias[k];
                }
            }
        }
    }
}

}  // namespace

ggml_tensor* conv2d_1x1(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, ggml_tensor* bias, bool vector) {
    ggml_tensor* args[3] = {x, w, bias};
    return labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0], x->ne[1], w->ne[3], x->ne[3], args,
                                   bias != nullptr ? 3 : 2, pointwise_node, GGML_N_TASKS_MAX,
                                   (void*)(vector ? &kVector : &kScalar)),
                    "conv1x1");
}

bool pointwise_eligible(const ggml_tensor* w, const ggml_tensor* x, int s0, int s1, int p0, int p1, int d0, int d1) {
    return w->ne[0] == 1 && w->ne[1] == 1 && s0 == 1 && s1 == 1 && p0 == 0 && p1 == 0 && d0 == 1 && d1 == 1 &&
           x->type == GGML_TYPE_F32 && ggml_is_contiguous(x) && (w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_F32) &&
           ggml_is_contiguous(w) && w->ne[2] == x->ne[2] && host_weights(w) &&
           x->ne[0] * x->ne[1] * x->ne[3] >= kMinPointwisePositions;
}

}  // namespace pysdcpp

// ---- harness: one 1x1 convolution on host arrays (kernel tests, benchmarks) ----------------------------------

namespace {
std::string g_pointwise_error;
}

extern "C" SD_API const char* pysdcpp_conv1x1_last_error(void) {
    return g_pointwise_error.c_str();
}

extern "C" SD_API int pysdcpp_conv2d_1x1(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, const float* w,
                                         int64_t K, const float* bias, int weight_f16, int path, int n_threads,
                                         int repeat, float* y, double* seconds) {
    using namespace pysdcpp;
    if (N < 1 || C < 1 || K < 1 || H < 1 || W < 1 || n_threads < 1 || repeat < 1 || path < PYSDCPP_PATH_UPSTREAM ||
        path > PYSDCPP_PATH_FAST_SCALAR) {
        g_pointwise_error = "invalid 1x1 convolution arguments";
        return 1;
    }
    try {
        // Every tensor (x, w, bias, y), ggml's im2col columns (F16) and slack, twice over.
        const size_t bytes = 2 * sizeof(float) * (size_t)(N * C * H * W * 2 + K * C + K + N * K * H * W) + (32 << 20);
        HarnessContext harness(bytes, "1x1 convolution");
        ggml_context* ctx = harness.get();
        if (ctx == nullptr) {
            g_pointwise_error = harness.error();
            return 1;
        }
        ggml_tensor* tx = host_tensor(ctx, x, false, W, H, C, N);
        ggml_tensor* tw = host_tensor(ctx, w, weight_f16 != 0, 1, 1, C, K);
        ggml_tensor* tb = host_tensor(ctx, bias, false, K);
        ggml_tensor* out = nullptr;
        if (path == PYSDCPP_PATH_UPSTREAM) {  // what ggml_ext_conv_2d builds without the hook
            out = ggml_conv_2d(ctx, tw, tx, 1, 1, 0, 0, 1, 1);
            if (tb != nullptr) {
                out = ggml_add_inplace(ctx, out, ggml_reshape_4d(ctx, tb, 1, 1, K, 1));
            }
        } else {
            out = conv2d_1x1(ctx, tw, tx, tb, path == PYSDCPP_PATH_FAST);
        }
        return compute_into(ctx, out, n_threads, repeat, seconds, y, g_pointwise_error) ? 0 : 1;
    } catch (const std::exception& e) {
        g_pointwise_error = e.what();
        return 1;
    }
}
