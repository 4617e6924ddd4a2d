// The register tile every product of our kernels is built from (Winograd's and the linear layers' GEMM, the
// attention's Q K^T and P V): an R x NC block of C held in R * NC / lanes accumulators.
#pragma once

#include <cstdint>

#include "simd.h"

namespace pysdcpp {

// C[R][NC] (row stride ldc) = (accumulate ? C : 0) + A[R][kd] (row stride lda) * B[kd][NC] (row stride ldb).
// Each reduction step loads one row of B and broadcasts one element of each row of A. Unrolled by four along the
// reduction: without it, loop overhead kept such tiles at ~75% of the FMA peak on Zen 3 (measured 75 -> 90-99
// GFLOP/s on one thread with L1-resident operands).
template <class V, int R, int NC>
inline void gemm_tile(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kd, float* C, int64_t ldc,
                      bool accumulate) {
    constexpr int W  = simd::lanes<V>();
    constexpr int NV = NC / W;
    V acc[R][NV];
    for (int r = 0; r < R; r++) {
        for (int x = 0; x < NV; x++) {
            acc[r][x] = accumulate ? simd::load<V>(C + r * ldc + x * W) : V{};
        }
    }
#pragma GCC unroll 4
    for (int64_t l = 0; l < kd; l++) {
        V b[NV];
        for (int x = 0; x < NV; x++) {
            b[x] = simd::load<V>(B + l * ldb + x * W);
        }
        for (int r = 0; r < R; r++) {
            const float a = A[r * lda + l];
            for (int x = 0; x < NV; x++) {
                acc[r][x] += a * b[x];
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int x = 0; x < NV; x++) {
            simd::store<V>(C + r * ldc + x * W, acc[r][x]);
        }
    }
}

// Two panels side by side: C[R][2 * W] (row stride ldc) = (accumulate ? C : 0) + A[R][kd] * [B0 | B1], each B a
// [kd][W] panel (W = the vector's lanes). One broadcast of A feeds both panels' FMAs: with 16-lane vectors,
// 24 FMAs per 14 loads instead of 12 per 13. The same summation order per output as gemm_tile.
template <class V, int R>
inline void gemm_tile_pair(const float* A, int64_t lda, const float* B0, const float* B1, int64_t kd, float* C,
                           int64_t ldc, bool accumulate) {
    constexpr int W = simd::lanes<V>();
    V acc[R][2];
    for (int r = 0; r < R; r++) {
        acc[r][0] = accumulate ? simd::load<V>(C + r * ldc) : V{};
        acc[r][1] = accumulate ? simd::load<V>(C + r * ldc + W) : V{};
    }
#pragma GCC unroll 2
    for (int64_t l = 0; l < kd; l++) {
        const V b0 = simd::load<V>(B0 + l * W), b1 = simd::load<V>(B1 + l * W);
        for (int r = 0; r < R; r++) {
            const float a = A[r * lda + l];
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
        }
    }
    for (int r = 0; r < R; r++) {
        simd::store<V>(C + r * ldc, acc[r][0]);
        simd::store<V>(C + r * ldc + W, acc[r][1]);
    }
}

}  // namespace pysdcpp
