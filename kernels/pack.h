// Packing a row-major weight matrix into our GEMM's panel layout (gemm.h), converting F16 to F32 on the way: the
// linear layers pack W^T block by block, and the Winograd filter transforms pack the 3x3 weights of a panel of
// output channels before transforming them (each element of a panel is then one vector of kGemmPanel lanes).
#pragma once

#include <cstdint>

namespace pysdcpp {

// Columns [j0, j1) of W^T, depth [l0, l0 + kd), as panels of kGemmPanel columns `panel_stride` floats apart:
//   P[(j - j0) / kGemmPanel * panel_stride + (l - l0) * kGemmPanel + (j - j0) % kGemmPanel] = W[j][l]
// W is row-major with `row_len` elements per row, F32 or (f16) IEEE half; columns past j1 in the last panel are
// zeros. `rows` is scratch of kGemmPanel * kd floats.
void pack_panels(const void* W, bool f16, int64_t row_len, int64_t j0, int64_t j1, int64_t l0, int64_t kd, float* P,
                 int64_t panel_stride, float* rows);

}  // namespace pysdcpp
