// Linear layers through our GEMM (see linear.h), and the harness that runs one on host arrays.
#include "linear.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "gemm.h"
#include "pack.h"
#include "ggml_helpers.h"
#include "work_items.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "profile.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

namespace pysdcpp {

namespace {

std::atomic<int> g_linear_mode{(int)LinearMode::upstream};

const bool kVector = true, kScalar = false;  // node userdata: which build of the GEMM

// Rows per pass: a pass multiplies each packed (kGemmDepth x kGemmCols) block of W^T by the pass's rows, whose
// outputs for the column block (kLinearRows x kGemmCols floats, 128 KB) stay in L2 next to the packed block
// (128 KB) while the reduction walks K. (All rows in one pass streamed the outputs through L3 once per
// block: 1.0x of ggml on 2560-deep layers; measured.)
constexpr int64_t kLinearRows = 256;

// dst y [N, rows...] F32; src[0] = x [K, rows...] F32, src[1] = w [K, N], src[2] = bias [N] or absent.
// Work items are (column block, group of row passes), claimed dynamically. An item packs its column block of W^T
// once, for all of K (K x width floats, at most 2.6 MB at K = 5120), and then runs its passes over it: packing
// converts F16 and transposes, and done once per pass it cost 4% of SDXL's UNet at 1024 px (profile). Groups are
// as few as keep every thread busy; with a single pass of rows the column blocks are narrower (two panels), so
// that a small layer still has enough items.
void linear_node(ggml_tensor* dst, int ith, int nth, void* userdata) {
    (void)ith;
    const ggml_tensor* x = dst->src[0];
    const ggml_tensor* w = dst->src[1];
    const ggml_tensor* b = dst->src[2];
    const int64_t K = w->ne[0], N = w->ne[1], rows = ggml_nelements(x) / K;
    const bool vector     = *(const bool*)userdata;
    const int64_t width   = rows <= kLinearRows ? 2 * kGemmPanel : kGemmCols;
    const int64_t n_cols  = (N + width - 1) / width;
    const int64_t passes  = (rows + kLinearRows - 1) / kLinearRows;
    const int64_t groups  = std::min(passes, (4 * nth + n_cols - 1) / n_cols);
    const int64_t per_grp = (passes + groups - 1) / groups;  // passes per group
    const int64_t n_k     = (K + kGemmDepth - 1) / kGemmDepth;
    const int64_t block   = kGemmDepth * width;                // floats of one packed (depth, column) block
    thread_local std::vector<float> pack, rows_f32;
    pack.resize((size_t)(n_k * block));
    rows_f32.resize((size_t)(kGemmDepth * kGemmPanel));
    const float* X = (const float*)x->data;
    float* Y       = (float*)dst->data;
    WorkItems items(dst, nth, n_cols * groups);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t j0 = (item / groups) * width, j1 = std::min(N, j0 + width);
        const int64_t r0 = (item % groups) * per_grp * kLinearRows;
        const int64_t r1 = std::min(rows, r0 + per_grp * kLinearRows);
        if (r0 >= r1) {
            continue;
        }
        for (int64_t kb = 0; kb < n_k; kb++) {
            const int64_t l0 = kb * kGemmDepth, kd = std::min(kGemmDepth, K - l0);
            pack_panels(w->data, w->type == GGML_TYPE_F16, K, j0, j1, l0, kd, pack.data() + kb * block,
                        kd * kGemmPanel, rows_f32.data());
        }
        for (int64_t i0 = r0; i0 < r1; i0 += kLinearRows) {
            const int64_t i1 = std::min(r1, i0 + kLinearRows);
            for (int64_t kb = 0; kb < n_k; kb++) {
                const int64_t l0 = kb * kGemmDepth, kd = std::min(kGemmDepth, K - l0);
                gemm_block(X + l0, K, pack.data() + kb * block, kd * kGemmPanel, kd, j1 - j0, Y + j0, N, i0, i1,
                           l0 > 0, vector);
            }
            if (b != nullptr) {
                const float* bias = (const float*)b->data;
                for (int64_t i = i0; i < i1; i++) {
                    float* y = Y + i * N;
                    for (int64_t j = j0; j < j1; j++) {
                        y[j] += bias[j];
                    }
                }
            }
        }
    }
}

}  // namespace

LinearMode linear_mode() {
    return (LinearMode)g_linear_mode.load(std::memory_order_relaxed);
}

void set_linear_mode(LinearMode mode) {
    g_linear_mode.store((int)mode, std::memory_order_relaxed);
}

ggml_tensor* linear(ggml_context* ctx, ggml_tensor* x, ggml_tensor* w, ggml_tensor* b, bool vector) {
    ggml_tensor* args[3] = {x, w, b};
    return labelled(ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], x->ne[2], x->ne[3], args,
                                   b != nullptr ? 3 : 2, linear_node, GGML_N_TASKS_MAX,
                                   (void*)(vector ? &kVector : &kScalar)),
                    "linear");
}

}  // namespace pysdcpp

ggml_tensor* pysdcpp_linear_hook(ggml_context* ctx, ggml_tensor* x, ggml_tensor* w, ggml_tensor* b,
                                 bool* bias_done) {
    using namespace pysdcpp;
    if (linear_mode() != LinearMode::fast) {
        return nullptr;
    }
    const bool eligible = host_weights(w) && x->type == GGML_TYPE_F32 && ggml_is_contiguous(x) &&
                          (w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_F32) && ggml_is_contiguous(w) &&
                          w->ne[2] == 1 && w->ne[3] == 1 && x->ne[0] == w->ne[0] &&
                          ggml_nelements(x) / x->ne[0] >= kMinLinearRows;
    if (!eligible) {
        return nullptr;
    }
    const bool fuse = fusable_bias(b, w->ne[1]);
    if (bias_done != nullptr) {
        *bias_done = fuse;
    }
    return linear(ctx, x, w, fuse ? b : nullptr);
}

// ---- harness: one linear layer on host arrays (kernel tests, benchmarks) -------------------------------------

namespace {
std::string g_linear_error;
}

extern "C" SD_API const char* pysdcpp_linear_last_error(void) {
    return g_linear_error.c_str();
}

extern "C" SD_API void pysdcpp_set_linear_mode(int mode) {
    pysdcpp::set_linear_mode(mode == PYSDCPP_LINEAR_FAST ? pysdcpp::LinearMode::fast : pysdcpp::LinearMode::upstream);
}

extern "C" SD_API int pysdcpp_linear(const float* x, int64_t rows, int64_t K, const float* w, int64_t N,
                                     const float* bias, int weight_f16, int path, int n_threads, int repeat,
                                     float* y, double* seconds) {
    using namespace pysdcpp;
    if (rows < 1 || K < 1 || N < 1 || n_threads < 1 || repeat < 1 || path < PYSDCPP_LINEAR_UPSTREAM ||
        path > PYSDCPP_LINEAR_FAST_SCALAR) {
        g_linear_error = "invalid linear-layer arguments";
        return 1;
    }
    try {
        // Every tensor (x, w, bias, y), ggml's work buffer (x converted to F16 for an F16 w) and slack, twice over:
        // ggml aborts the process when a context runs out.
        const size_t bytes = 2 * sizeof(float) * (size_t)(rows * K * 2 + K * N + N + rows * N) + (32 << 20);
        HarnessContext harness(bytes, "linear-layer");
        ggml_context* ctx = harness.get();
        if (ctx == nullptr) {
            g_linear_error = harness.error();
            return 1;
        }
        ggml_tensor* tx = host_tensor(ctx, x, false, K, rows);
        ggml_tensor* tw = host_tensor(ctx, w, weight_f16 != 0, K, N);
        ggml_tensor* tb = host_tensor(ctx, bias, false, N);
        ggml_tensor* out = nullptr;
        if (path == PYSDCPP_LINEAR_UPSTREAM) {  // what ggml_ext_linear builds without the hook
            out = ggml_mul_mat(ctx, tw, tx);
            if (tb != nullptr) {
                out = ggml_add_inplace(ctx, out, tb);
            }
        } else {
            out = linear(ctx, tx, tw, tb, path == PYSDCPP_LINEAR_FAST);
        }
        return compute_into(ctx, out, n_threads, repeat, seconds, y, g_linear_error) ? 0 : 1;
    } catch (const std::exception& e) {
        g_linear_error = e.what();
        return 1;
    }
}
