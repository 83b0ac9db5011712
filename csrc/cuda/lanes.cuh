// A few consecutive values of an image line in registers (Lanes), and the same values as they lie
// in memory (Stored): 16-bit values travel in pairs in 32-bit words, so that a loaded group stays
// packed until widen() turns it into the compute type with one or two bit operations per value
// (as c10's 16-bit classes would not: each becomes a register of its own). Also whether a
// launch's tensors let it load and store their rows' groups as one (rows_of_aligned_groups).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace spatialnorm::cuda {

// kSize consecutive values of a line, added lane by lane: what a thread loads or stores at once
// and carries through the passes down the columns.
template <typename T, int kSize>
struct alignas(sizeof(T) * kSize < 16 ? sizeof(T) * kSize : 16) Lanes {
  T v[kSize];

  Lanes() = default;
  __device__ Lanes(int zero) {  // NOLINT: Lanes<T, n> sum = 0, as for a number
#pragma unroll
    for (int e = 0; e < kSize; ++e) {
      v[e] = T(zero);
    }
  }

  __device__ Lanes operator+(const Lanes& other) const {
    Lanes sum;
#pragma unroll
    for (int e = 0; e < kSize; ++e) {
      sum.v[e] = v[e] + other.v[e];
    }
    return sum;
  }

  __device__ Lanes& operator+=(const Lanes& other) { return *this = *this + other; }
};

template <typename scalar_t, int kSize>
constexpr bool kPacked = sizeof(scalar_t) == 2 && kSize % 2 == 0;

template <typename scalar_t, int kSize>
using Stored = std::conditional_t<kPacked<scalar_t, kSize>, Lanes<uint32_t, kSize / 2>, Lanes<scalar_t, kSize>>;

__device__ inline float widen_low(c10::BFloat16, uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ inline float widen_high(c10::BFloat16, uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }
__device__ inline float widen_low(c10::Half, uint32_t pair) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(pair)));
}
__device__ inline float widen_high(c10::Half, uint32_t pair) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> 16)));
}

template <typename scalar_t, int kSize>
__device__ inline Lanes<at::opmath_type<scalar_t>, kSize> widen(const Stored<scalar_t, kSize>& stored) {
  Lanes<at::opmath_type<scalar_t>, kSize> values;
  if constexpr (kPacked<scalar_t, kSize>) {
#pragma unroll
    for (int i = 0; i < kSize / 2; ++i) {
      values.v[2 * i] = widen_low(scalar_t(), stored.v[i]);
      values.v[2 * i + 1] = widen_high(scalar_t(), stored.v[i]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kSize; ++e) {
      values.v[e] = static_cast<at::opmath_type<scalar_t>>(stored.v[e]);
    }
  }
  return values;
}

// One load of kSize values (the copy keeps it one: widen reading them through a reference lets the
// compiler split it into a load per value).
template <typename scalar_t, int kSize>
__device__ inline Lanes<at::opmath_type<scalar_t>, kSize> load_widened(const scalar_t* __restrict__ p) {
  const Stored<scalar_t, kSize> stored = *reinterpret_cast<const Stored<scalar_t, kSize>*>(p);
  return widen<scalar_t, kSize>(stored);
}

// Whether rows `width` values long are whole groups of `group` values that start `alignment`-byte
// aligned in every tensor: then each group can be loaded and stored as one.
inline bool rows_of_aligned_groups(int64_t width, int64_t group, size_t alignment,
                                   std::initializer_list<const at::Tensor*> tensors) {
  bool aligned = width % group == 0;
  for (const at::Tensor* t : tensors) {
    aligned &= reinterpret_cast<uintptr_t>(t->const_data_ptr()) % alignment == 0;
  }
  return aligned;
}

}  // namespace spatialnorm::cuda
