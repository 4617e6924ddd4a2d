// Small ggml checks and steps the hooks and the harnesses share.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

namespace pysdcpp {

// Weights whose bytes the host can read (our kernels read or convert them on the CPU).
inline bool host_weights(const ggml_tensor* w) {
    return w->data != nullptr && (w->buffer == nullptr || ggml_backend_buffer_is_host(w->buffer));
}

// n contiguous F32 values in host memory, in any shape ([n], or a [1, 1, n, 1] view).
inline bool f32_values(const ggml_tensor* t, int64_t n) {
    return t != nullptr && t->type == GGML_TYPE_F32 && ggml_is_contiguous(t) && ggml_nelements(t) == n &&
           host_weights(t);
}

// The function of a ggml_custom_4d node (written first in its op_params), or garbage for other ops.
inline ggml_custom_op_t custom_fun(const ggml_tensor* node) {
    ggml_custom_op_t fun = nullptr;
    std::memcpy(&fun, node->op_params, sizeof(fun));
    return fun;
}

// A bias our nodes can add themselves: a plain F32 vector of n values (anything else keeps upstream's ggml_add).
inline bool fusable_bias(const ggml_tensor* b, int64_t n) {
    return f32_values(b, n) && b->ne[0] == n;
}

// Harnesses: a tensor of the context holding host floats, as F16 (converted without the CPU backend's tables)
// or F32; nullptr for absent data.
inline ggml_tensor* host_tensor(ggml_context* ctx, const float* data, bool f16, int64_t ne0, int64_t ne1 = 1,
                                int64_t ne2 = 1, int64_t ne3 = 1) {
    if (data == nullptr) {
        return nullptr;
    }
    ggml_tensor* t  = ggml_new_tensor_4d(ctx, f16 ? GGML_TYPE_F16 : GGML_TYPE_F32, ne0, ne1, ne2, ne3);
    const int64_t n = ne0 * ne1 * ne2 * ne3;
    if (f16) {
        ggml_fp32_to_fp16_row(data, (ggml_fp16_t*)t->data, n);
    } else {
        std::memcpy(t->data, data, sizeof(float) * (size_t)n);
    }
    return t;
}

// Harnesses: a ggml context over a buffer allocated here (ggml_init aborts the process when its own allocation
// fails). get() is nullptr when the memory is not there, and error() then says how much `what` asked for.
class HarnessContext {
public:
    HarnessContext(size_t bytes, const char* what) : bytes_(bytes), what_(what) {
        buffer_ = std::malloc(bytes);
        if (buffer_ != nullptr) {
            ggml_init_params params = {bytes, buffer_, false};
            ctx_                    = ggml_init(params);
        }
    }
    ~HarnessContext() {
        if (ctx_ != nullptr) {
            ggml_free(ctx_);
        }
        std::free(buffer_);
    }
    HarnessContext(const HarnessContext&)            = delete;
    HarnessContext& operator=(const HarnessContext&) = delete;

    ggml_context* get() const { return ctx_; }
    std::string error() const {
        return "out of memory for the " + what_ + " graph (" + std::to_string(bytes_ >> 20) + " MB)";
    }

private:
    size_t bytes_;
    std::string what_;
    void* buffer_      = nullptr;
    ggml_context* ctx_ = nullptr;
};

// Harnesses: computes gf `repeat` times, seconds[r] per run (the first measured from first_start, which may lie
// before the graph was built); false if a compute failed.
inline bool compute_timed(ggml_context* ctx, ggml_cgraph* gf, int n_threads, int repeat, double* seconds,
                          std::chrono::steady_clock::time_point first_start) {
    for (int r = 0; r < repeat; r++) {
        const auto t0 = r == 0 ? first_start : std::chrono::steady_clock::now();
        if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) {
            return false;
        }
        if (seconds != nullptr) {
            seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
    }
    return true;
}

// Harnesses: computes out's graph `repeat` times (compute_timed, from now) and copies its values to y; false, with
// `error` set, if a compute failed.
inline bool compute_into(ggml_context* ctx, ggml_tensor* out, int n_threads, int repeat, double* seconds, float* y,
                         std::string& error) {
    ggml_cgraph* gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    if (!compute_timed(ctx, gf, n_threads, repeat, seconds, std::chrono::steady_clock::now())) {
        error = "graph compute failed";
        return false;
    }
    std::memcpy(y, out->data, sizeof(float) * (size_t)ggml_nelements(out));
    return true;
}

}  // namespace pysdcpp
