// The Winograd stages on plain arrays (winograd_transforms.cpp), private to the Winograd files: the filter transform
// U = G g G^T (plain or packed for our GEMM), the input transform V = B^T d B and the output transform y = A^T M A.
#pragma once

#include <cstdint>

#include "gemm.h"
#include "ggml.h"
#include "winograd.h"

namespace pysdcpp {

// Floats from one position's packed matrix to the next in a packed U: one cache line more than the matrix, so
// that the transform's 36 (or 16) stores per filter, one per position, fall into different cache sets (at
// power-of-two strides they all met in one set of L1 and the transform ran ~3x slower).
inline int64_t position_floats(int64_t C, int64_t K) {
    return gemm_packed_floats(C, K) + kGemmPanel;
}

// Input channels per block of the packed transform (prefetched one block ahead).
constexpr int64_t kFilterDepth = 64;

// Input channels packed at once inside transform_panels, and the scratch floats it needs.
constexpr int64_t kPackChannels  = 16;
constexpr int64_t kFilterScratch = 2 * kGemmPanel * 9 * kPackChannels;

// The tile size m of a stage tensor from its alpha^2 positions (36: F(4x4), 16: F(2x2)).
inline int tile_of(int64_t positions) {
    return positions == 36 ? 4 : 2;
}

// One block of input channels [c0, c0 + kd) of transform_panels, for callers walking C in blocks of
// kFilterDepth: the next block's weights are prefetched first.
void transform_block(const ggml_tensor* w, int m, int64_t k0, int64_t k1, int64_t c0, int64_t kd, float* U,
                     int64_t pos_stride, int64_t panel_stride, float* scratch);

// U of weight w for output channels [k0, k1) (on panel boundaries when packed) in the layout `packed` names:
// packed per position (gemm.h, [packed C x K] each), or plain [alpha^2][K][C]. w is F16 or F32 [3, 3, C, K].
void transform_filters(const ggml_tensor* w, int m, bool packed, float* U, int64_t k0, int64_t k1);

// V = B^T d B for tiles [t0, t1); d is the (zero-padded) input patch of each tile.
// V holds the tiles [t_base, t_base + g.T) (a chunk of the map, or all of it).
template <int M>
void input_transform(const float* x, const ConvGeometry& g, float* V, int64_t t0, int64_t t1, int64_t t_base);

// y = A^T M A (+ bias) for tiles [t0, t1), clipped at the map's right and bottom edges.
// Mt holds the tiles [t_base, t_base + g.T); bias [K] or nullptr (the conv's bias, fused here).
template <int M>
void output_transform(const float* Mt, const ConvGeometry& g, const float* bias, float* y, int64_t t0, int64_t t1,
                      int64_t t_base);

}  // namespace pysdcpp
