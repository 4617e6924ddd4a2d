// Our F32 GEMM for products whose right-hand operand is packed ahead of time (Winograd's transformed filters are
// written packed by the filter transform, so the products pay no packing at all).
//
//   C[i][j] = sum_l A[i][l] * B[l][j]   for rows i in [i0, i1), all columns j < n
//
// A is row-major with row stride lda (read in place: each step broadcasts one element of each of a tile's rows), B
// comes packed as column panels of kGemmPanel: Bp[j / kGemmPanel][l][j % kGemmPanel], the last panel zero-padded.
// C is row-major with row stride ldc. Register tiles: 6 rows x 16 columns (12 accumulators of 8
// lanes, for 16 AVX registers) or, the wide tile, 12 rows x 32 columns, two panels (24 accumulators of 16 lanes:
// 24 AVX-512 FMAs per 14 loads, against 12 AVX FMAs per 8 loads; a lone last panel 12 x 16; the default where the
// build targets AVX-512: 1.35x the narrow tile on one Sapphire Rapids thread, 120 against 89 GFLOP/s); the
// reduction runs in blocks of kGemmDepth so a tile's slice of A stays in L1 and a block of panels in L2.
#pragma once

#include <cstdint>

namespace pysdcpp {

constexpr int kGemmPanel     = 16;   // columns per packed panel of B
constexpr int64_t kGemmDepth = 256;  // reduction block
constexpr int64_t kGemmCols  = 128;  // columns per block of panels (kGemmDepth x kGemmCols floats: 128 KB)

// Floats of a packed B with depth k and n columns.
inline int64_t gemm_packed_floats(int64_t k, int64_t n) {
    return (n + kGemmPanel - 1) / kGemmPanel * kGemmPanel * k;
}

// Index of B[l][j] in the packed layout.
inline int64_t gemm_packed_index(int64_t k, int64_t l, int64_t j) {
    return ((j / kGemmPanel) * k + l) * kGemmPanel + j % kGemmPanel;
}

// The vector build's register tile (process-wide; set_gemm_tile(automatic) picks wide on AVX-512 builds).
enum class GemmTile { automatic = 0, narrow = 1, wide = 2 };
void set_gemm_tile(GemmTile tile);
GemmTile gemm_tile_in_use();   // narrow or wide

// `vector`: the SIMD build of the kernel (vectors the compiler maps onto AVX/AVX-512, NEON or SSE, in the tile
// gemm_tile_in_use() says); otherwise the portable scalar build of the same algorithm and blocking (what the tests
// check on every machine, beside both tiles).
void gemm_packed_b(const float* A, int64_t lda, const float* Bp, int64_t k, int64_t n, float* C, int64_t ldc,
                   int64_t i0, int64_t i1, bool vector = true);

// One block of a product, for callers that pack B themselves block by block:
//   C[i][j] = (accumulate ? C[i][j] : 0) + sum_{l < kd} A[i][l] * P(l, j)   rows [i0, i1), columns j < ncols
// where P holds ceil(ncols / kGemmPanel) panels, `panel_stride` floats apart, each [kd][kGemmPanel] (columns
// past ncols in the last panel are read but their results dropped).
void gemm_block(const float* A, int64_t lda, const float* P, int64_t panel_stride, int64_t kd, int64_t ncols,
                float* C, int64_t ldc, int64_t i0, int64_t i1, bool accumulate, bool vector = true);

}  // namespace pysdcpp
