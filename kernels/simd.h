// The vector types our kernels are written over, and the math every kernel shares on them (2^x, the sigmoid,
// shifted sums): 8-lane float vectors through the compiler's vector extension (mapped onto AVX/AVX-512, NEON or SSE
// registers, whatever the build targets), 16-lane ones for the GEMM's wide register tiles (one AVX-512 register;
// two AVX or four NEON/SSE registers elsewhere), or plain float for the portable scalar build of the same algorithm.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pysdcpp {
namespace simd {

typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v8i __attribute__((vector_size(32)));

template <class V>
constexpr int lanes() {
    return (int)(sizeof(V) / sizeof(float));
}

template <class V>
inline V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}

template <class V>
inline void store(float* p, V v) {
    std::memcpy(p, &v, sizeof(V));
}

template <class V>
inline V splat(float x) {
    return V{} + x;
}

// 2^x for x <= 0 (softmax arguments after the running maximum is subtracted, GELU's sigmoid).
template <class V>
inline V exp2_neg(V x);

template <>
inline float exp2_neg<float>(float x) {
    return std::exp2(x);
}

// 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2; 2^f by its Taylor series to degree 6 in f (relative error below
// 1.3e-7 on |f| <= 1/2). The rounding adds and subtracts 1.5 * 2^23, which leaves n in the low mantissa bits.
// Arguments below -126 (and -inf) give 0: no denormals.
template <>
inline v8f exp2_neg<v8f>(v8f x) {
    const v8f lo    = splat<v8f>(-126.0f);
    const v8f magic = splat<v8f>(12582912.0f);
    const v8f x0    = x;
    x               = x < lo ? lo : x;
    const v8f t     = x + magic;
    const v8f f     = x - (t - magic);
    v8f p           = splat<v8f>(1.5403530393381606e-4f);  // ln2^6 / 720
    p               = p * f + 1.3333558146428443e-3f;      // ln2^5 / 120
    p               = p * f + 9.6181291076284772e-3f;      // ln2^4 / 24
    p               = p * f + 5.5504108664821580e-2f;      // ln2^3 / 6
    p               = p * f + 0.24022650695910071f;        // ln2^2 / 2
    p               = p * f + 0.69314718055994531f;        // ln2
    p               = p * f + 1.0f;
    v8i bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = (bits + (127 - 0x4B400000)) << 23;  // low bits of t hold n + 0x4B400000 (the magic's bit pattern)
    v8f scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x0 < lo ? splat<v8f>(0.0f) : p * scale;
}

constexpr float kLog2e = 1.4426950408889634f;

// 1 / (1 + e^-z) by e = e^-|z| in [0, 1]: 1 / (1 + e) for z >= 0, e / (1 + e) below (no overflow either way).
template <class V>
inline V sigmoid(V z) {
    const V e = exp2_neg<V>((z < 0.0f ? z : -z) * kLog2e);
    return (z < 0.0f ? e : splat<V>(1.0f)) / (1.0f + e);
}

template <>
inline float sigmoid<float>(float z) {
    const float e = exp2_neg<float>(-std::fabs(z) * kLog2e);
    return (z < 0.0f ? e : 1.0f) / (1.0f + e);
}

// x * sigmoid(z), and 0 where the sigmoid is 0 (z far below zero): the limit SiLU and GELU have there, also for
// x = -inf (where the product alone is -inf * 0 = NaN).
template <class V>
inline V times_sigmoid(V x, V z) {
    const V s = sigmoid<V>(z);
    return s == 0.0f ? splat<V>(0.0f) : x * s;
}

// Sums of (x - shift) and (x - shift)^2 over n floats: float partial sums over runs of at most 512 elements, each
// run added into the double totals.
template <class V>
void shifted_sums(const float* x, int64_t n, float shift, double& s1, double& s2) {
    constexpr int L   = lanes<V>();
    const V vshift    = splat<V>(shift);
    for (int64_t r0 = 0; r0 < n; r0 += 512) {
        const int64_t r1 = std::min(n, r0 + 512);
        V a1{}, a2{};
        int64_t i = r0;
        for (; i + L <= r1; i += L) {
            const V d = load<V>(x + i) - vshift;
            a1 += d;
            a2 += d * d;
        }
        float t1 = 0.0f, t2 = 0.0f;
        for (int l = 0; l < L; l++) {
            t1 += ((const float*)&a1)[l];
            t2 += ((const float*)&a2)[l];
        }
        for (; i < r1; i++) {
            const float d = x[i] - shift;
            t1 += d;
            t2 += d * d;
        }
        s1 += t1;
        s2 += t2;
    }
}

}  // namespace simd
}  // namespace pysdcpp
