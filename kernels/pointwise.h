// 1x1 convolutions (stride 1, no padding) as one GEMM per image through our F32 GEMM, instead of ggml's im2col
// and F16 mul_mat: the ResNets' channel-changing shortcuts and SD1.x/SD2.x's proj_in/proj_out.
//
//   y[n] [K][P] = W [K][C] x[n] [C][P] (+ b[k]),  P = H * W
//
// x stays in its NCHW layout: each image is the row-major [C][P] right-hand operand, packed block by block into
// the GEMM's column panels (a copy of 16-float row segments); W (F16 converted once per thread and node, or F32
// read in place) is the row-major left operand, and y comes out NCHW. ggml's path gathers every position's C
// channels, H * W floats apart, into F16 columns first: the strided gather, not the product, dominated the
// SDXL VAE's shortcuts at 1024 px (profile, docs/benchmarks.md).
#pragma once

#include <cstdint>

#include "ggml.h"

namespace pysdcpp {

// Below this many output positions (H * W * N) a 1x1 conv keeps upstream's path: one column block of the GEMM,
// too little work to share between threads.
constexpr int64_t kMinPointwisePositions = 256;

// y [W, H, K, N] = the 1x1 conv of x [W, H, C, N] (F32, contiguous) with w [1, 1, C, K] (F16 or F32, host
// memory), plus bias (F32 [K], or nullptr). `vector`: the SIMD build of the GEMM, else its portable scalar build.
ggml_tensor* conv2d_1x1(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, ggml_tensor* bias, bool vector = true);

// Whether the conv hook routes this 1x1 conv here (shape and types; the conv algorithm is the caller's check).
bool pointwise_eligible(const ggml_tensor* w, const ggml_tensor* x, int s0, int s1, int p0, int p1, int d0, int d1);

}  // namespace pysdcpp
