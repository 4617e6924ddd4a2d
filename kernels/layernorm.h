// Layer normalisation with its affine step as one graph node, per row of C values:
//
//   y[r][c] = (x[r][c] - mean[r]) / sqrt(var[r] + eps) * gamma[c] + beta[c]
//
// ggml builds it as ggml_norm followed by a mul and an add of [C] vectors: three passes over the transformer
// blocks' activations (three layer norms per block). Here each run of rows is one work item: two passes over a
// row in cache (a mean, then the sums about it) and one writing y.
#pragma once

#include <cstdint>

#include "ggml.h"

namespace pysdcpp {

// x [C, rows...] F32 contiguous; gamma and beta F32 with C values each, or beta nullptr.
ggml_tensor* layer_norm_affine(ggml_context* ctx, ggml_tensor* x, float eps, ggml_tensor* gamma, ggml_tensor* beta,
                               bool vector = true);

}  // namespace pysdcpp

// The hook patch 0015 calls from ggml_ext_layer_norm: the fused node, or nullptr to keep upstream's ops (when the
// linear-layer mode keeps upstream's path, or for tensors the node does not take).
ggml_tensor* pysdcpp_layer_norm_hook(ggml_context* ctx, ggml_tensor* x, ggml_tensor* gamma, ggml_tensor* beta,
                                     float eps);
