// One 3x3 convolution on host arrays through the same ggml graph nodes the models use: what the kernel tests
// and `pysdcpp bench --layers` call, with no model loaded.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "ggml-cpu.h"
#include "ggml.h"
#include "gemm.h"
#include "ggml_helpers.h"
#include "winograd.h"

extern "C" {
#include "stable-diffusion.h"
#include "pysdcpp_ext.h"
}

namespace {

ggml_tensor* build_conv(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, ggml_tensor* b, int pad, int algorithm) {
    using namespace pysdcpp;
    ggml_tensor* y = nullptr;
    switch (algorithm) {
        case PYSDCPP_CONV_IM2COL:
            y = ggml_conv_2d(ctx, w, x, 1, 1, pad, pad, 1, 1);
            break;
        case PYSDCPP_CONV_DIRECT:
            y = ggml_conv_2d_direct(ctx, w, x, 1, 1, pad, pad, 1, 1);
            break;
        // The Winograd variants add the bias in their output transform, as in the models.
        case PYSDCPP_CONV_WINOGRAD_F4:
            return winograd_conv2d(ctx, w, x, pad, WinogradVariant::f4x4, FilterSource::cached, b);
        case PYSDCPP_CONV_WINOGRAD_F2:
            return winograd_conv2d(ctx, w, x, pad, WinogradVariant::f2x2, FilterSource::cached, b);
        case PYSDCPP_CONV_WINOGRAD_F4_IN_GRAPH:
            return winograd_conv2d(ctx, w, x, pad, WinogradVariant::f4x4, FilterSource::in_graph, b);
        case PYSDCPP_CONV_WINOGRAD_F4_GGML_GEMM:
            return winograd_conv2d(ctx, w, x, pad, WinogradVariant::f4x4, FilterSource::cached, b,
                                   WinogradGemm::ggml);
        case PYSDCPP_CONV_WINOGRAD_F4_SCALAR:
            return winograd_conv2d(ctx, w, x, pad, WinogradVariant::f4x4, FilterSource::cached, b,
                                   WinogradGemm::own_scalar);
        case PYSDCPP_CONV_WINOGRAD_F4_FUSED:
            return winograd_conv2d(ctx, w, x, pad, WinogradVariant::f4x4, FilterSource::fused, b);
        case PYSDCPP_CONV_WINOGRAD_F2_FUSED:
            return winograd_conv2d(ctx, w, x, pad, WinogradVariant::f2x2, FilterSource::fused, b);
        default:
            return nullptr;
    }
    if (b != nullptr) {
        y = ggml_add_inplace(ctx, y, ggml_reshape_4d(ctx, b, 1, 1, b->ne[0], 1));
    }
    return y;
}

std::string g_error;

}  // namespace

extern "C" SD_API const char* pysdcpp_conv_last_error(void) {
    return g_error.c_str();
}

extern "C" SD_API void pysdcpp_set_gemm_tile(int tile) {
    using pysdcpp::GemmTile;
    pysdcpp::set_gemm_tile(tile == PYSDCPP_GEMM_TILE_NARROW ? GemmTile::narrow
                           : tile == PYSDCPP_GEMM_TILE_WIDE ? GemmTile::wide
                                                            : GemmTile::automatic);
}

extern "C" SD_API int pysdcpp_gemm_tile(void) {
    return pysdcpp::gemm_tile_in_use() == pysdcpp::GemmTile::wide ? PYSDCPP_GEMM_TILE_WIDE : PYSDCPP_GEMM_TILE_NARROW;
}

extern "C" SD_API void pysdcpp_set_conv_algorithm(int algorithm) {
    const bool winograd = algorithm >= PYSDCPP_CONV_WINOGRAD_F4 && algorithm <= PYSDCPP_CONV_LAST;
    pysdcpp::set_conv_algorithm(winograd ? pysdcpp::ConvAlgorithm::winograd : pysdcpp::ConvAlgorithm::im2col);
}

// The per-call variant closest to the hook's route. (A hoisted F(2x2) layer with fewer than 16 output channels,
// which no SD model has, runs ggml's GEMM in a model; the harness has no such variant and reports WINOGRAD_F2.)
extern "C" SD_API int pysdcpp_conv_plan(int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int pad) {
    using namespace pysdcpp;
    const LayerPlan lp = winograd_plan(W, H, C, N, K, pad);
    switch (lp.variant) {
        case WinogradVariant::f4x4:
            return !lp.hoisted ? PYSDCPP_CONV_WINOGRAD_F4_FUSED
                   : K < 16    ? PYSDCPP_CONV_WINOGRAD_F4_GGML_GEMM
                               : PYSDCPP_CONV_WINOGRAD_F4;
        case WinogradVariant::f2x2:
            return lp.hoisted ? PYSDCPP_CONV_WINOGRAD_F2 : PYSDCPP_CONV_WINOGRAD_F2_FUSED;
        default:
            return PYSDCPP_CONV_IM2COL;
    }
}

extern "C" SD_API void pysdcpp_conv_routes(int64_t* counts, int reset) {
    for (int i = 0; i < 4; i++) {  // ConvRoute's order, as documented in pysdcpp_ext.h
        counts[i] = pysdcpp::conv_routes((pysdcpp::ConvRoute)i, reset != 0);
    }
}

extern "C" SD_API void pysdcpp_set_winograd_threads(int n_threads) {
    pysdcpp::set_winograd_threads(n_threads);
}

extern "C" SD_API void pysdcpp_set_winograd_cache_budget(size_t bytes) {
    pysdcpp::set_winograd_cache_budget(bytes);
}

extern "C" SD_API size_t pysdcpp_winograd_cache_bytes(void) {
    return pysdcpp::winograd_cache_bytes();
}

extern "C" SD_API size_t pysdcpp_winograd_cache_peak_bytes(int reset) {
    return pysdcpp::winograd_cache_peak_bytes(reset != 0);
}

extern "C" SD_API size_t pysdcpp_winograd_cache_default_budget(void) {
    return pysdcpp::kDefaultCacheBudget;
}

extern "C" SD_API void pysdcpp_set_winograd_chunk_bytes(int64_t bytes) {
    pysdcpp::set_winograd_chunk_bytes(bytes);
}

extern "C" SD_API void pysdcpp_winograd_cache_clear(void) {
    pysdcpp::winograd_cache_clear();
}

// The harness's weights live only for one call: their cached transforms are dropped before and after it, so
// the first repetition includes the filter transform and later ones show the steady state.
extern "C" SD_API int pysdcpp_conv2d_3x3(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, const float* w,
                                         int64_t K, const float* bias, int pad, int weight_f16, int algorithm,
                                         int n_threads, int repeat, float* y, double* seconds) {
    if (N < 1 || C < 1 || K < 1 || H < 1 || W < 1 || (pad != 0 && pad != 1) || n_threads < 1 || repeat < 1 ||
        H + 2 * pad < 3 || W + 2 * pad < 3 || algorithm < 0 || algorithm > PYSDCPP_CONV_LAST) {
        g_error = "invalid convolution arguments";
        return 1;
    }
    try {
        const int64_t OH = H + 2 * pad - 2, OW = W + 2 * pad - 2;
        const int64_t T  = N * ((OH + 1) / 2) * ((OW + 1) / 2);
        // Upper bound of every tensor the graph can hold (im2col buffer, Winograd stages, their F16 copies); the
        // im2col and direct paths hold no Winograd stages.
        const bool im2col_only = algorithm == PYSDCPP_CONV_IM2COL || algorithm == PYSDCPP_CONV_DIRECT;
        size_t bytes = 4 * (size_t)(N * C * H * W + K * C * 9 + K + N * K * OH * OW) * 2;
        bytes += 4 * (size_t)(N * OH * OW * C * 9) * 2;
        if (!im2col_only) {
            bytes += 4 * (size_t)(16 * T * (C + K) + 16 * (K + 16) * C) * 3;  // U: K padded to whole GEMM panels
        }
        bytes += 64 << 20;
        pysdcpp::HarnessContext harness(bytes, "convolution");
        ggml_context* ctx = harness.get();
        if (ctx == nullptr) {
            g_error = harness.error();
            return 1;
        }
        ggml_tensor* tx = pysdcpp::host_tensor(ctx, x, false, W, H, C, N);
        ggml_tensor* tw = pysdcpp::host_tensor(ctx, w, weight_f16 != 0, 3, 3, C, K);
        ggml_tensor* tb = pysdcpp::host_tensor(ctx, bias, false, K);
        pysdcpp::winograd_cache_clear();
        pysdcpp::set_winograd_threads(n_threads);  // the (cached) filter transform runs on the compute's threads
        // Building the graph runs the (cached) filter transform: it counts towards the first repetition.
        auto t_build     = std::chrono::steady_clock::now();
        ggml_tensor* out = build_conv(ctx, tw, tx, tb, pad, algorithm);
        ggml_cgraph* gf  = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, out);
        if (!pysdcpp::compute_timed(ctx, gf, n_threads, repeat, seconds, t_build)) {
            g_error = "graph compute failed";
            return 1;
        }
        std::memcpy(y, out->data, sizeof(float) * (size_t)(N * K * OH * OW));
        pysdcpp::winograd_cache_clear();
        return 0;
    } catch (const std::exception& e) {
        g_error = e.what();
        return 1;
    }
}
