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

// x [W, H, C, N] F32 contiguous, gamma and beta F32 with C values each; C divisible by groups. offset: F32 [1, 1, C,
// N] added to x before the normalisation (a ResNet's time embedding), or nullptr; silu: SiLU of the result.
ggml_tensor* group_norm_affine(ggml_context* ctx, ggml_tensor* x, int groups, float eps, ggml_tensor* gamma,
                               ggml_tensor* beta, bool vector = true, ggml_tensor* offset = nullptr,
                               bool silu = false);

// Makes y, a node group_norm_affine built, apply SiLU to its result; false (y unchanged) for any other tensor or a
// node that already does.
bool fuse_silu(ggml_tensor* y);

}  // namespace pysdcpp

// The hook patch 0007 calls from ggml_ext_group_norm: the fused node, or nullptr to keep upstream's three ops
// (when the conv algorithm keeps upstream's path, or for tensors the node does not take). An x that is h plus a
// per-(image, channel) vector (the ResNets' time embedding) is taken as the two, the add done in the node.
ggml_tensor* pysdcpp_group_norm_hook(ggml_context* ctx, ggml_tensor* x, ggml_tensor* gamma, ggml_tensor* beta,
                                     int groups, float eps);

// The hook patch 0014 calls where upstream's ResNets and output heads apply SiLU to a group norm's result: SiLU
// folded into our group-norm node when x is one (nothing else reads the norm's output there), else ggml's SiLU.
ggml_tensor* pysdcpp_silu_hook(ggml_context* ctx, ggml_tensor* x);
