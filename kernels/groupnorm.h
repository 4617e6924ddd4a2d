// Group normalisation and its affine step as one graph node:
//
//   y[n][c][p] = (x[n][c][p] - mean[n][g]) / sqrt(var[n][g] + eps) * gamma[c] + beta[c],   g = c / (C / G)
//
// ggml builds it as ggml_group_norm followed by a mul and an add of [1, 1, C, 1] tensors, which ggml broadcasts
// element by element: on the SDXL VAE at 1024 px those two passes cost more than the normalisation itself
// (profile, docs/benchmarks.md). Here each (image, group) is one work item: one pass for the statistics
// (shifted by a sample of the group, so the single-pass variance does not cancel; double accumulators), one
// pass writing y = x * a[c] + b[c].
#pragma once

#include <cstdint>

#include "ggml.h"

namespace pysdcpp {

// x [W, H, C, N] F32 contiguous, gamma and beta F32 with C values each; C divisible by groups.
ggml_tensor* group_norm_affine(ggml_context* ctx, ggml_tensor* x, int groups, float eps, ggml_tensor* gamma,
                               ggml_tensor* beta, bool vector = true);

}  // namespace pysdcpp

// The hook patch 0007 calls from ggml_ext_group_norm: the fused node, or nullptr to keep upstream's three ops
// (when the conv algorithm keeps upstream's path, or for tensors the node does not take).
ggml_tensor* pysdcpp_group_norm_hook(ggml_context* ctx, ggml_tensor* x, ggml_tensor* gamma, ggml_tensor* beta,
                                     int groups, float eps);
