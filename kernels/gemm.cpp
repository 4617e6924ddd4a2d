// The packed-B F32 GEMM (see gemm.h).
#include "gemm.h"
#include "gemm_tile.h"

#include <algorithm>
#include <cstring>

namespace pysdcpp {

namespace {

using namespace simd;

constexpr int kRows = 6;  // rows per register tile

template <class V>
void tile_rows(int rows, const float* A, int64_t lda, const float* B, int64_t kd, float* C, int64_t ldc,
               bool accumulate) {
    switch (rows) {
        case 6: gemm_tile<V, 6, kGemmPanel>(A, lda, B, kGemmPanel, kd, C, ldc, accumulate); break;
        case 5: gemm_tile<V, 5, kGemmPanel>(A, lda, B, kGemmPanel, kd, C, ldc, accumulate); break;
        case 4: gemm_tile<V, 4, kGemmPanel>(A, lda, B, kGemmPanel, kd, C, ldc, accumulate); break;
        case 3: gemm_tile<V, 3, kGemmPanel>(A, lda, B, kGemmPanel, kd, C, ldc, accumulate); break;
        case 2: gemm_tile<V, 2, kGemmPanel>(A, lda, B, kGemmPanel, kd, C, ldc, accumulate); break;
        default: gemm_tile<V, 1, kGemmPanel>(A, lda, B, kGemmPanel, kd, C, ldc, accumulate); break;
    }
}

// Rows [i0, i1) of one block (see gemm_block), six rows at a time; for each row tile the block's panels in
// turn, so the tile's slice of A stays in L1 while the panels come from L2.
template <class V>
void block(const float* A, int64_t lda, const float* P, int64_t panel_stride, int64_t kd, int64_t ncols, float* C,
           int64_t ldc, int64_t i0, int64_t i1, bool accumulate) {
    for (int64_t i = i0; i < i1; i += kRows) {
        const int rows  = (int)std::min<int64_t>(kRows, i1 - i);
        const float* Ai = A + i * lda;
        for (int64_t j = 0; j < ncols; j += kGemmPanel) {
            const float* Pj = P + (j / kGemmPanel) * panel_stride;
            if (j + kGemmPanel <= ncols) {
                tile_rows<V>(rows, Ai, lda, Pj, kd, C + i * ldc + j, ldc, accumulate);
            } else {
                // The last, partial panel: through a full-width scratch tile (the results of the padding
                // columns are dropped).
                const int cols               = (int)(ncols - j);
                float tmp[kRows][kGemmPanel] = {};
                for (int r = 0; r < rows; r++) {
                    if (accumulate) {
                        std::memcpy(tmp[r], C + (i + r) * ldc + j, sizeof(float) * cols);
                    }
                }
                tile_rows<V>(rows, Ai, lda, Pj, kd, &tmp[0][0], kGemmPanel, accumulate);
                for (int r = 0; r < rows; r++) {
                    std::memcpy(C + (i + r) * ldc + j, tmp[r], sizeof(float) * cols);
                }
            }
        }
    }
}

template <class V>
void gemm(const float* A, int64_t lda, const float* Bp, int64_t k, int64_t n, float* C, int64_t ldc, int64_t i0,
          int64_t i1) {
    for (int64_t l0 = 0; l0 < k; l0 += kGemmDepth) {
        const int64_t kd = std::min(kGemmDepth, k - l0);
        for (int64_t j0 = 0; j0 < n; j0 += kGemmCols) {
            block<V>(A + l0, lda, Bp + gemm_packed_index(k, l0, j0), k * kGemmPanel, kd, std::min(n, j0 + kGemmCols) - j0,
                     C + j0, ldc, i0, i1, l0 > 0);
        }
    }
}

}  // namespace

void gemm_packed_b(const float* A, int64_t lda, const float* Bp, int64_t k, int64_t n, float* C, int64_t ldc,
                   int64_t i0, int64_t i1, bool vector) {
    if (vector) {
        gemm<v8f>(A, lda, Bp, k, n, C, ldc, i0, i1);
    } else {
        gemm<float>(A, lda, Bp, k, n, C, ldc, i0, i1);
    }
}

void gemm_block(const float* A, int64_t lda, const float* P, int64_t panel_stride, int64_t kd, int64_t ncols,
                float* C, int64_t ldc, int64_t i0, int64_t i1, bool accumulate, bool vector) {
    if (vector) {
        block<v8f>(A, lda, P, panel_stride, kd, ncols, C, ldc, i0, i1, accumulate);
    } else {
        block<float>(A, lda, P, panel_stride, kd, ncols, C, ldc, i0, i1, accumulate);
    }
}

}  // namespace pysdcpp
