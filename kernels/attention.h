// Attention for the accelerated library, as ggml graph nodes.
//
// softmax(Q K^T / sqrt(d)) V per head, on q [C, L_q, N], k and v [C, L_k, N] (C = n_head * d, ggml order), the
// layout stable-diffusion.cpp's attention helper receives. Two paths:
//   fused: one node, tiled over (batch, head, block of query rows): scores of a query block against a block of
//          keys stay in cache, an online softmax rescales the running output, and the full L_q x L_k score
//          matrix is never stored (F32 throughout; explicit SIMD through the compiler's vector extensions, plus a
//          portable scalar build of the same kernel used by the tests);
//   gemm:  upstream's arrangement (two ggml_mul_mat with a soft-max between them) with the head dimension padded
//          with zeros to a multiple of 16, so ggml's fast F32 GEMM (which needs K % 8 on AVX2, % 16 on AVX-512)
//          takes Q K^T for every head size.
#pragma once

#include <cstdint>

#include "ggml.h"

namespace pysdcpp {

// What the attention hook does: keep upstream's path, or the fast path chosen per shape.
enum class AttentionMode : int { upstream = 0, fast = 1 };

// Explicit per-call variants (the harness and the benchmarks); `none` keeps upstream's path.
enum class AttentionVariant : int { fused = 0, fused_scalar = 1, gemm = 2, none = 3 };

// q [C, L_q, N], k/v [C, L_k, N] (F32; any strides with contiguous rows) -> [C, L_q, N] F32 (`variant` not
// `none`).
ggml_tensor* attention(ggml_context* ctx, ggml_tensor* q, ggml_tensor* k, ggml_tensor* v, int64_t n_head,
                       AttentionVariant variant);

// Score-matrix entries (L_q x L_k) from which a head wider than 256 takes the fused path too: 2^27, a 512 MB
// matrix on upstream's path.
constexpr int64_t kFusedWideScores = (int64_t)1 << 27;

// The per-shape choice for AttentionMode::fast (measured; see attention.cpp).
AttentionVariant attention_choose(int64_t d_head, int64_t L_q, int64_t L_k);

AttentionMode attention_mode();
void set_attention_mode(AttentionMode mode);

}  // namespace pysdcpp

// The hook patch 0003 calls at the top of ggml_ext_attention_ext (plain-layout, unmasked calls only): the
// attention output [C, L_q, N], or nullptr to keep upstream's path.
ggml_tensor* pysdcpp_attention_hook(ggml_context* ctx, ggml_tensor* q, ggml_tensor* k, ggml_tensor* v,
                                    int64_t n_head);
