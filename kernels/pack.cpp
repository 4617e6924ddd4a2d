// Panel packing with F16 conversion (see pack.h).
#include "pack.h"

#include <algorithm>

#include "gemm.h"
#include "ggml-cpu.h"
#include "simd.h"

namespace pysdcpp {

namespace {

#if defined(__clang__) || __GNUC__ >= 12
// c[m] = column m of the 8x8 block whose rows are r[0..7] (three rounds of two-vector shuffles).
inline void transpose8(const simd::v8f (&r)[8], simd::v8f (&c)[8]) {
    using simd::v8f;
    v8f t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i]     = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i]     = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int m = 0; m < 4; m++) {
        c[m]     = __builtin_shufflevector(u[m], u[m + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        c[m + 4] = __builtin_shufflevector(u[m], u[m + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
#endif

}  // namespace

// A panel's rows are converted into `rows` (F16) or read in place (F32), then turned into the panel's columns 8x8
// blocks at a time. (Element-wise stores made packing ~6% of a 256-row linear layer.)
void pack_panels(const void* W, bool f16, int64_t row_len, int64_t j0, int64_t j1, int64_t l0, int64_t kd, float* P,
                 int64_t panel_stride, float* rows) {
    for (int64_t p0 = j0; p0 < j1; p0 += kGemmPanel) {
        const float* src[kGemmPanel];
        for (int q = 0; q < kGemmPanel; q++) {
            float* buf = rows + q * kd;
            if (p0 + q >= j1) {
                std::fill(buf, buf + kd, 0.0f);
                src[q] = buf;
            } else if (!f16) {
                src[q] = (const float*)W + (p0 + q) * row_len + l0;
            } else {
                ggml_cpu_fp16_to_fp32((const ggml_fp16_t*)W + (p0 + q) * row_len + l0, buf, kd);
                src[q] = buf;
            }
        }
        float* panel = P + ((p0 - j0) / kGemmPanel) * panel_stride;
        int64_t l    = 0;
#if defined(__clang__) || __GNUC__ >= 12  // __builtin_shufflevector; older compilers take the element loop below
        for (; l + 8 <= kd; l += 8) {
            for (int h = 0; h < kGemmPanel; h += 8) {
                simd::v8f r[8], c[8];
                for (int i = 0; i < 8; i++) {
                    r[i] = simd::load<simd::v8f>(src[h + i] + l);
                }
                transpose8(r, c);
                for (int m = 0; m < 8; m++) {
                    simd::store(panel + (l + m) * kGemmPanel + h, c[m]);
                }
            }
        }
#endif
        for (; l < kd; l++) {
            for (int q = 0; q < kGemmPanel; q++) {
                panel[l * kGemmPanel + q] = src[q][l];
            }
        }
    }
}

}  // namespace pysdcpp
