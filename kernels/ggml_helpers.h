// Small ggml checks and steps the hooks and the harnesses share.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

namespace pysdcpp {

// Weights whose bytes the host can read (our kernels read or convert them on the CPU).
inline bool host_weights(const ggml_tensor* w) {
    return w->data != nullptr && (w->buffer == nullptr || ggml_backend_buffer_is_host(w->buffer));
}

// A bias our nodes can add themselves: a plain contiguous F32 vector of n values (anything else keeps upstream's
// ggml_add).
inline bool fusable_bias(const ggml_tensor* b, int64_t n) {
    return b != nullptr && b->type == GGML_TYPE_F32 && ggml_is_contiguous(b) && b->ne[0] == n &&
           ggml_nelements(b) == n;
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

}  // namespace pysdcpp
