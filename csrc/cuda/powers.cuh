// a * T^e for the CUDA kernels, exact wherever the product is a finite number of the compute type.
//
// float32 takes 2^(e * log2(T)) with the hardware's approximate log2 and 2^x (absolute error about
// 2^-22 in the logarithm: the power is off by at most |e| * 2^-22 * ln 2 relative, 1e-6 for
// e = -5), where powf's extra-precise algorithm would cost more than the whole rest of a kernel.
// Those instructions flush subnormals to zero, so a subnormal T is scaled into the normal range
// first; and where 2^(e * log2(T)) alone would leave float's normal range (T = 1e-8 with
// e = -5: 1e40), the product is taken on a's fraction and exponent apart, so that 0 * T^e is 0
// and 1e-20 * 1e40 is 1e20. float64 uses pow, and the same split where the power leaves double's
// normal range.
//
// T <= 0 (possible only with delta <= 0) gives NaN, on every device (docs/definition.md); e = 0
// gives a (pow(T, 0) is 1 even for an infinite or NaN T).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <limits>

namespace spatialnorm::cuda {

__device__ inline float approximate_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ inline float approximate_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// T, made ready for several powers.
template <typename opmath_t>
struct PowerBase;

template <>
struct PowerBase<float> {
  float t;
  float log2_t;  // approximate: -inf for t = 0 or a subnormal t, NaN for a negative one

  __device__ explicit PowerBase(float t) : t(t), log2_t(approximate_log2(t)) {}
};

template <>
struct PowerBase<double> {
  double t;

  __device__ explicit PowerBase(double t) : t(t) {}
};

// a * 2^l where 2^l alone is outside the normal range but l is finite: a's fraction times 2^r,
// |r| <= 1/2, then scaled by a's exponent plus round(l). Beyond +-limit the result is 0 or
// infinite (or a = 0) whatever a is, so l is clamped there to keep the exponents in int range.
template <typename T>
__device__ inline T times_exp2_split(T a, T l, T limit) {
  int exponent = 0;
  const T fraction = frexp(a, &exponent);
  const T clamped = fmin(fmax(l, -limit), limit);
  const T whole = rint(clamped);
  T power;
  if constexpr (sizeof(T) == sizeof(float)) {
    power = approximate_exp2(clamped - whole);
  } else {
    power = exp2(clamped - whole);
  }
  return ldexp(fraction * power, exponent + static_cast<int>(whole));
}

__device__ inline float times_power(float a, float t, float e) {
  if (!(t > 0.0f) && !isnan(t)) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (e == 0.0f) {
    return a;
  }
  const float log2_t = t < 0x1p-126f ? approximate_log2(t * 0x1p24f) - 24.0f : approximate_log2(t);
  const float l = e * log2_t;
  if (fabsf(l) < 126.0f || !isfinite(l)) {  // a normal power, or T infinite or NaN: 0, inf or NaN as pow gives
    return a * approximate_exp2(l);
  }
  return times_exp2_split(a, l, 400.0f);
}

__device__ inline double times_power(double a, double t, double e) {
  if (!(t > 0.0) && !isnan(t)) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  if (e == 0.0) {
    return a;
  }
  const double power = pow(t, e);
  if (isnormal(power) || !isfinite(t)) {
    return a * power;
  }
  return times_exp2_split(a, e * log2(t), 3000.0);
}

// A pass of a kernel takes its powers in up to two tries. FastPowers assumes a normal T and a
// normal power (one approximate log2 and 2^x, no branch, so the pass's loads and arithmetic
// schedule freely) and notes where that fails; where it failed for any element of a block, the
// block takes the pass again with ExactPowers, which handle every case above.
struct FastPowers {
  bool missed = false;

  __device__ float operator()(float a, const PowerBase<float>& base, float e) {
    const float l = e * base.log2_t;
    missed |= !(fabsf(l) < 126.0f);  // also where l is NaN: T <= 0, or e = 0 with T infinite
    return a * approximate_exp2(l);
  }

  __device__ double operator()(double a, const PowerBase<double>& base, double e) {
    const double power = pow(base.t, e);
    missed |= !isnormal(power) || !(base.t > 0.0);
    return a * power;
  }
};

struct ExactPowers {
  bool missed = false;  // never: every case is handled

  template <typename opmath_t>
  __device__ opmath_t operator()(opmath_t a, const PowerBase<opmath_t>& base, opmath_t e) {
    return times_power(a, base.t, e);
  }
};

}  // namespace spatialnorm::cuda
