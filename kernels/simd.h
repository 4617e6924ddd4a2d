// The vector types our kernels are written over: 8-lane float vectors through the compiler's vector extension
// (mapped onto AVX/AVX-512, NEON or SSE registers, whatever the build targets), 16-lane ones for the GEMM's wide
// register tiles (one AVX-512 register; two AVX or four NEON/SSE registers elsewhere), or plain float for the
// portable scalar build of the same algorithm.
#pragma once

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

}  // namespace simd
}  // namespace pysdcpp
