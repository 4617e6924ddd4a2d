// Linear layers (y = x W^T + b) through our GEMM (gemm.h) instead of ggml's mul_mat: the transformer blocks'
// projections and feed-forward layers, a third or more of a UNet evaluation.
//
// ggml multiplies F16 weights by first rounding the activations to F16 and then runs tinyBLAS's dot-product tiles.
// Here the activations stay F32 (read in place, broadcast a tile's rows at a time) and the weights are converted to
// F32 while being packed into the GEMM's column panels (kGemmDepth x kGemmCols floats, L2-sized blocks), each
// column block once for all the rows its work item covers, then multiplied by 256 rows of x at a time. The
// threads claim (column block, group of rows) items dynamically.
#pragma once

#include <cstdint>

#include "ggml.h"

namespace pysdcpp {

enum class LinearMode : int { upstream = 0, fast = 1 };

LinearMode linear_mode();
void set_linear_mode(LinearMode mode);

// Below this many rows (tokens x batch) a layer keeps ggml's path. Measured on SD1.5's UNet shapes (`pysdcpp
// bench --linear`, docs/benchmarks.md; 2-core Zen 3, 2 threads; ggml's F16 path runs at 87-155 GFLOP/s there,
// close to the FMA peak of ~176): ours 1.05-1.41x at 1024 and 4096 rows, 0.94-1.09x at 256, 0.78-1.20x at 64-77.
constexpr int64_t kMinLinearRows = 512;

// y [N, ...x's rows] = x [K, ...] W^T (+ b), x F32 contiguous, w [K, N] F16 or F32 contiguous in host memory,
// b F32 [N] or nullptr. `vector`: the SIMD build of the GEMM, else its portable scalar build (tests).
ggml_tensor* linear(ggml_context* ctx, ggml_tensor* x, ggml_tensor* w, ggml_tensor* b, bool vector = true);

}  // namespace pysdcpp

// The hook patch 0006 calls from ggml_ext_linear: our linear layer, or nullptr to keep upstream's. b may be
// nullptr; *bias_done says whether the replacement added it.
ggml_tensor* pysdcpp_linear_hook(ggml_context* ctx, ggml_tensor* x, ggml_tensor* w, ggml_tensor* b, bool* bias_done);
