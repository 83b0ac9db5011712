// t^e for t > 0, written as plain arithmetic so that loops over it vectorize: std::pow is an
// opaque call that keeps every loop around it scalar. The logarithm and exponential are the
// Cephes single-precision ones (range reduction to a mantissa near 1 and to |r| <= ln2/2, then
// minimax polynomials), accurate to a few ulp. The exponent e*log(t) is rounded to float once,
// which costs about |e*log(t)| * 2^-24 of relative accuracy: under 1e-5 for the T^(-beta) of
// this package. float64 goes through std::pow.
//
// The loops using it need -fno-trapping-math, without which GCC won't turn selects into
// vector blends.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace spatialnorm::cpu {

inline float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// Natural logarithm of a positive, finite, normal float.
inline float positive_log(float t) {
  // t = (1 + m) * 2^e with 1 + m in [sqrt(1/2), sqrt(2)), where the polynomial wants its argument:
  // subtracting the bits of sqrt(1/2) before the shift moves the exponent's boundary there, so no
  // compare and select is needed.
  const int32_t bits = float_to_bits(t);
  const int32_t e = (bits - 0x3f3504f3) >> 23;
  const float m = bits_to_float(bits - (e << 23)) - 1.0f;
  const float exponent = static_cast<float>(e);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * exponent;  // ln2 split in two for an exact product with the exponent
  y += -0.5f * z;
  return m + y + 0.693359375f * exponent;
}

// e^w; underflows to zero and overflows to infinity like std::exp.
inline float exponential(float w) {
  // Beyond these bounds the result is 0 or infinity anyway. (std::min/max, which keep a NaN and
  // become single instructions; fmin/fmax are library calls that stop the loop from vectorizing.)
  w = std::min(std::max(w, -104.0f), 89.0f);
  const float n = std::floor(w * 1.44269504088896341f + 0.5f);
  const float r = w - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n in two factors, each a normal float for n in [-150, 129], so that results below the
  // normal range round to subnormals and zero instead of wrapping the exponent field.
  const int32_t whole = static_cast<int32_t>(n);
  const int32_t first = whole >> 1;
  return p * bits_to_float((first + 127) << 23) * bits_to_float((whole - first + 127) << 23);
}

// t -> t^exponent for t > 0 (and for t = +inf or NaN, as std::pow). What depends on the
// exponent alone is worked out once, so that the per-element code has no branches to stop the
// loops from vectorizing.
template <typename T>
class Power;

template <>
class Power<float> {
 public:
  explicit Power(float exponent)
      : exponent_(exponent),
        at_infinity_(exponent < 0.0f ? 0.0f : (exponent > 0.0f ? std::numeric_limits<float>::infinity() : 1.0f)),
        at_nan_(exponent == 0.0f ? 1.0f : std::numeric_limits<float>::quiet_NaN()) {}

  float operator()(float t) const {
    const float finite = exponential(exponent_ * positive_log(t));
    const float result = t > std::numeric_limits<float>::max() ? at_infinity_ : finite;
    return t == t ? result : at_nan_;
  }

 private:
  float exponent_;
  float at_infinity_;
  float at_nan_;
};

template <>
class Power<double> {
 public:
  explicit Power(double exponent) : exponent_(exponent) {}
  double operator()(double t) const { return std::pow(t, exponent_); }

 private:
  double exponent_;
};

}  // namespace spatialnorm::cpu
