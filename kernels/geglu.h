// GEGLU, the feed-forward gate of the UNets' transformer blocks, as one graph node:
//
//   y[r][j] = p[r][j] * gelu(p[r][D + j]),   gelu(g) = g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3))
//
// (the tanh form of GELU, which upstream computes; p = the first projection's output, [2D] per row: value, then
// gate). Upstream's graph makes that three passes: a copy of the gate half out of the projection, ggml's GELU
// (a scalar lookup in a table of F16 inputs, ~2.6 ns per element on Zen 3) and the product; the profile put them
// at 5% of an SD1.5 UNet evaluation at 256 px (docs/bench/notes.md). Here one pass, vector GELU.
#pragma once

#include <cstdint>

#include "ggml.h"

namespace pysdcpp {

// y [D, rows...] from p [2D, rows...] (F32, contiguous). `vector`: the SIMD build, else the portable scalar one.
ggml_tensor* geglu(ggml_context* ctx, ggml_tensor* p, bool vector = true);

}  // namespace pysdcpp

// The hook patch 0013 calls from GEGLU's forward after its projection: the fused node, or nullptr to keep
// upstream's ops (when the linear-layer mode keeps upstream's path, or for tensors the node does not take).
ggml_tensor* pysdcpp_geglu_hook(ggml_context* ctx, ggml_tensor* p);
