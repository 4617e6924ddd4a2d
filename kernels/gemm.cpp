// The packed-B F32 GEMM (see gemm.h).
#include "gemm.h"
#include "gemm_tile.h"

#include <algorithm>
#include <atomic>
#include <cstring>

namespace pysdcpp {

namespace {

using namespace simd;

// Rows per register tile: 6 of two 8-lane vectors, 12 of one 16-lane vector (the scalar build: 6 of 16 floats).
template <class V>
constexpr int rows_per_tile() {
    return lanes<V>() >= kGemmPanel ? 12 : 6;
}
constexpr int kMaxRows = 12;

// A tile of `rows` <= R rows (R, R - 1, ... instantiated).
template <class V, int R>
void tile_rows(int rows, const float* A, int64_t lda, const float* B, int64_t kd, float* C, int64_t ldc,
               bool accumulate) {
    if constexpr (R > 1) {
        if (rows < R) {
            tile_rows<V, R - 1>(rows, A, lda, B, kd, C, ldc, accumulate);
            return;
        }
    }
    gemm_tile<V, R, kGemmPanel>(A, lda, B, kGemmPanel, kd, C, ldc, accumulate);
}

// Rows <= R of a pair of panels (the wide tile only: 24 accumulators fit AVX-512's 32 registers).
template <class V, int R>
void pair_rows(int rows, const float* A, int64_t lda, const float* B0, const float* B1, int64_t kd, float* C,
               int64_t ldc, bool accumulate) {
    if constexpr (R > 1) {
        if (rows < R) {
            pair_rows<V, R - 1>(rows, A, lda, B0, B1, kd, C, ldc, accumulate);
            return;
        }
    }
    gemm_tile_pair<V, R>(A, lda, B0, B1, kd, C, ldc, accumulate);
}

// Rows [i0, i1) of one block (see gemm_block), a tile's rows at a time; for each row tile the block's panels in
// turn, so the tile's slice of A stays in L1 while the panels come from L2.
template <class V>
void block(const float* A, int64_t lda, const float* P, int64_t panel_stride, int64_t kd, int64_t ncols, float* C,
           int64_t ldc, int64_t i0, int64_t i1, bool accumulate) {
    constexpr int R = rows_per_tile<V>();
    for (int64_t i = i0; i < i1; i += R) {
        const int rows  = (int)std::min<int64_t>(R, i1 - i);
        const float* Ai = A + i * lda;
        for (int64_t j = 0; j < ncols; j += kGemmPanel) {
            const float* Pj = P + (j / kGemmPanel) * panel_stride;
            if constexpr (lanes<V>() == kGemmPanel) {
                if (j + 2 * kGemmPanel <= ncols) {   // two full panels at once
                    pair_rows<V, R>(rows, Ai, lda, Pj, Pj + panel_stride, kd, C + i * ldc + j, ldc, accumulate);
                    j += kGemmPanel;
                    continue;
                }
            }
            if (j + kGemmPanel <= ncols) {
                tile_rows<V, R>(rows, Ai, lda, Pj, kd, C + i * ldc + j, ldc, accumulate);
            } else {
                // The last, partial panel: through a full-width scratch tile (the results of the padding
                // columns are dropped).
                const int cols               = (int)(ncols - j);
                float tmp[kMaxRows][kGemmPanel] = {};
                for (int r = 0; r < rows; r++) {
                    if (accumulate) {
                        std::memcpy(tmp[r], C + (i + r) * ldc + j, sizeof(float) * cols);
                    }
                }
                tile_rows<V, R>(rows, Ai, lda, Pj, kd, &tmp[0][0], kGemmPanel, accumulate);
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

#if defined(__AVX512F__)
constexpr GemmTile kDefaultTile = GemmTile::wide;
#else
constexpr GemmTile kDefaultTile = GemmTile::narrow;
#endif
std::atomic<int> g_tile{(int)GemmTile::automatic};

bool wide() {
    const GemmTile t = (GemmTile)g_tile.load(std::memory_order_relaxed);
    return (t == GemmTile::automatic ? kDefaultTile : t) == GemmTile::wide;
}

}  // namespace

void set_gemm_tile(GemmTile tile) {
    g_tile.store((int)tile, std::memory_order_relaxed);
}

GemmTile gemm_tile_in_use() {
    return wide() ? GemmTile::wide : GemmTile::narrow;
}

void gemm_packed_b(const float* A, int64_t lda, const float* Bp, int64_t k, int64_t n, float* C, int64_t ldc,
                   int64_t i0, int64_t i1, bool vector) {
    if (!vector) {
        gemm<float>(A, lda, Bp, k, n, C, ldc, i0, i1);
    } else if (wide()) {
        gemm<v16f>(A, lda, Bp, k, n, C, ldc, i0, i1);
    } else {
        gemm<v8f>(A, lda, Bp, k, n, C, ldc, i0, i1);
    }
}

void gemm_block(const float* A, int64_t lda, const float* P, int64_t panel_stride, int64_t kd, int64_t ncols,
                float* C, int64_t ldc, int64_t i0, int64_t i1, bool accumulate, bool vector) {
    if (!vector) {
        block<float>(A, lda, P, panel_stride, kd, ncols, C, ldc, i0, i1, accumulate);
    } else if (wide()) {
        block<v16f>(A, lda, P, panel_stride, kd, ncols, C, ldc, i0, i1, accumulate);
    } else {
        block<v8f>(A, lda, P, panel_stride, kd, ncols, C, ldc, i0, i1, accumulate);
    }
}

}  // namespace pysdcpp
