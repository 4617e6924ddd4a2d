// One attention call on host arrays through the graph nodes the models use, allocated the way the models'
// graphs are (ggml's graph allocator on the CPU backend), so the harness reports the compute buffer too.
// Upstream's variants call upstream's own attention helper, with the pysdcpp hook switched off.
#include <chrono>
#include <cstring>
#include <exception>
#include <string>

#include "attention.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "src/ggml_extend.hpp"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

namespace {

thread_local std::string g_attn_error;

int attn_fail(const std::string& message) {
    g_attn_error = message;
    return 1;
}

// Restores the process-wide attention mode when the harness returns.
struct ModeGuard {
    pysdcpp::AttentionMode saved = pysdcpp::attention_mode();
    ~ModeGuard() { pysdcpp::set_attention_mode(saved); }
};

ggml_tensor* build(ggml_context* ctx, ggml_backend_t backend, ggml_tensor* q, ggml_tensor* k, ggml_tensor* v,
                   int64_t n_head, int variant) {
    using namespace pysdcpp;
    switch (variant) {
        case PYSDCPP_ATTN_UPSTREAM:
        case PYSDCPP_ATTN_UPSTREAM_FLASH:
            set_attention_mode(AttentionMode::upstream);
            return ggml_ext_attention_ext(ctx, backend, q, k, v, n_head, nullptr, false,
                                          variant == PYSDCPP_ATTN_UPSTREAM_FLASH);
        case PYSDCPP_ATTN_FAST:
            set_attention_mode(AttentionMode::fast);
            return ggml_ext_attention_ext(ctx, backend, q, k, v, n_head, nullptr, false, false);
        case PYSDCPP_ATTN_FUSED:
            return attention(ctx, q, k, v, n_head, AttentionVariant::fused);
        case PYSDCPP_ATTN_FUSED_SCALAR:
            return attention(ctx, q, k, v, n_head, AttentionVariant::fused_scalar);
        case PYSDCPP_ATTN_GEMM:
            return attention(ctx, q, k, v, n_head, AttentionVariant::gemm);
        default:
            return nullptr;
    }
}

}  // namespace

extern "C" SD_API const char* pysdcpp_attention_last_error(void) {
    return g_attn_error.c_str();
}

extern "C" SD_API void pysdcpp_set_attention_mode(int mode) {
    pysdcpp::set_attention_mode(mode == PYSDCPP_ATTN_UPSTREAM ? pysdcpp::AttentionMode::upstream
                                                              : pysdcpp::AttentionMode::fast);
}

extern "C" SD_API int pysdcpp_attention(const float* q, const float* k, const float* v, int64_t N, int64_t L_q,
                                        int64_t L_k, int64_t C, int64_t n_head, int variant, int n_threads,
                                        int repeat, float* out, double* seconds, size_t* compute_bytes) {
    if (N < 1 || L_q < 1 || L_k < 1 || C < 1 || n_head < 1 || C % n_head != 0 || n_threads < 1 || repeat < 1 ||
        variant < PYSDCPP_ATTN_UPSTREAM || variant > PYSDCPP_ATTN_UPSTREAM_FLASH) {
        return attn_fail("invalid attention arguments");
    }
    if (variant == PYSDCPP_ATTN_UPSTREAM_FLASH && N > 1) {
        // Its output view ignores the batch (ggml asserts and aborts the process): not a path models use here.
        return attn_fail("upstream's flash-attention path is measured with batch 1 only");
    }
    ModeGuard guard;
    ggml_backend_t backend = nullptr;
    ggml_context* ctx      = nullptr;
    ggml_gallocr_t galloc  = nullptr;
    auto cleanup           = [&]() {
        if (galloc != nullptr) ggml_gallocr_free(galloc);
        if (ctx != nullptr) ggml_free(ctx);
        if (backend != nullptr) ggml_backend_free(backend);
    };
    try {
        backend = ggml_backend_cpu_init();
        if (backend == nullptr) {
            return attn_fail("could not start the CPU backend");
        }
        ggml_backend_cpu_set_n_threads(backend, n_threads);
        ggml_init_params params = {ggml_tensor_overhead() * 256 + ggml_graph_overhead(), nullptr, true};
        ctx                     = ggml_init(params);
        ggml_tensor* tq         = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, C, L_q, N);
        ggml_tensor* tk         = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, C, L_k, N);
        ggml_tensor* tv         = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, C, L_k, N);
        for (ggml_tensor* t : {tq, tk, tv}) {
            ggml_set_input(t);
        }
        // Upstream's flash path pads the keys with a mask built from the runner's constant "one" tensor, which
        // a GGMLRunner creates before every graph: the harness provides it too.
        ggml_tensor* one = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 1);
        ggml_set_name(one, "ggml_runner_build_in_tensor:one");
        ggml_set_input(one);
        ggml_tensor* y = build(ctx, backend, tq, tk, tv, n_head, variant);
        if (y == nullptr) {
            cleanup();
            return attn_fail("this attention variant does not apply to these shapes");
        }
        y = ggml_cont(ctx, y);  // upstream's flash path returns a view
        ggml_set_output(y);
        ggml_cgraph* gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
        if (!ggml_gallocr_alloc_graph(galloc, gf)) {
            cleanup();
            return attn_fail("out of memory for the attention graph");
        }
        if (compute_bytes != nullptr) {
            *compute_bytes = ggml_gallocr_get_buffer_size(galloc, 0);
        }
        for (int r = 0; r < repeat; r++) {
            // The allocator may reuse the inputs' memory once they are consumed: set them before every run.
            ggml_backend_tensor_set(tq, q, 0, ggml_nbytes(tq));
            ggml_backend_tensor_set(tk, k, 0, ggml_nbytes(tk));
            ggml_backend_tensor_set(tv, v, 0, ggml_nbytes(tv));
            if (one->buffer != nullptr) {  // allocated only when the graph uses it
                const float value = 1.0f;
                ggml_backend_tensor_set(one, &value, 0, sizeof(value));
            }
            auto t0 = std::chrono::steady_clock::now();
            if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
                cleanup();
                return attn_fail("graph compute failed");
            }
            auto t1 = std::chrono::steady_clock::now();
            if (seconds != nullptr) {
                seconds[r] = std::chrono::duration<double>(t1 - t0).count();
            }
        }
        ggml_backend_tensor_get(y, out, 0, ggml_nbytes(y));
        cleanup();
        return 0;
    } catch (const std::exception& e) {
        cleanup();
        return attn_fail(e.what());
    }
}
