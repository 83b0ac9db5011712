// T^e and the products that use it, for the CPU kernels, exact wherever the result is finite.
//
// T comes from double window sums and stays double. For float32 compute types the power is the
// Cephes single-precision logarithm and exponential (minimax polynomials, a few ulp) around a
// double-precision range reduction: T = m * 2^k with m near 1, and e * log(T) = n * ln2 + r with
// |r| <= ln2/2, so only log(m) and exp(r) are evaluated in float. The result is a double with
// float accuracy over the whole double range: T^-beta for a subnormal T, or 1e40, is exact,
// and the products with the data are taken in double, so X * T^-beta is finite wherever the
// exact product is. Written as plain arithmetic so that the loops using it vectorize (std::pow
// is an opaque call that keeps every loop around it scalar); they need -fno-trapping-math,
// without which GCC won't turn selects into vector blends.
//
// float64 goes through std::pow, and where the power alone leaves the double range, the product
// is taken in the log domain.
//
// T <= 0 (possible only with delta <= 0) gives NaN, on every device (docs/definition.md).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>

namespace spatialnorm::cpu {

template <typename To, typename From>
inline To bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From));
  To result;
  std::memcpy(&result, &value, sizeof result);
  return result;
}

// log(1 + m) for m in [sqrt(1/2) - 1, sqrt(2) - 1) (Cephes logf's polynomial).
inline float log1p_reduced(float m) {
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
  return m + (y - 0.5f * z);
}

// e^r for |r| <= ln2/2 (Cephes expf's polynomial).
inline float exp_reduced(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// Conversions between whole doubles and int64 for |n| < 2^51, through the bits of 1.5 * 2^52:
// AVX2 has no instruction for them, and GCC would leave the loops using them scalar.
constexpr double kRoundingShift = 0x1.8p52;

inline int64_t to_int(double whole) {
  return bit_cast<int64_t>(whole + kRoundingShift) - bit_cast<int64_t>(kRoundingShift);
}

inline double to_double(int64_t n) {
  return bit_cast<double>(n + bit_cast<int64_t>(kRoundingShift)) - kRoundingShift;
}

// 2^n for integer n in [-2044, 2046], as two factors that are each a normal double, so that
// results below the normal range round to subnormals and zero instead of wrapping the exponent.
inline double two_to_the(int64_t n) {
  const int64_t first = n >> 1;
  return bit_cast<double>((first + 1023) << 52) * bit_cast<double>((n - first + 1023) << 52);
}

// The float32 fast path, for T a normal float and powers within the normal range:
// log(t) for a positive, finite, normal float.
inline float positive_log(float t) {
  const int32_t bits = bit_cast<int32_t>(t);
  const int32_t k = (bits - 0x3f3504f3) >> 23;  // as in WidePower, for floats
  const float m = bit_cast<float>(bits - (k << 23)) - 1.0f;
  return log1p_reduced(m) + static_cast<float>(k) * 0.693147180559945309417f;
}

// e^w for w in [-87, 88], where the result is a normal float (w is clamped to that range).
inline float normal_exponential(float w) {
  w = std::min(std::max(w, -87.0f), 88.0f);
  const float n = std::floor(w * 1.44269504088896341f + 0.5f);
  const float r = w - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two: an exact product
  return exp_reduced(r) * bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// The range of the values T a loop has seen, from their bits, for deciding after it whether the fast
// powers applied to every one of them: the bits of positive floats order like their values, and
// those of zero, negative numbers, infinity and NaN fall outside the normal floats' bits.
struct BaseRange {
  uint32_t least = std::numeric_limits<uint32_t>::max();
  uint32_t greatest = 0;

  void add(float t) {
    const uint32_t bits = bit_cast<uint32_t>(t);
    least = std::min(least, bits);
    greatest = std::max(greatest, bits);
  }

  bool normal() const {
    return least >= bit_cast<uint32_t>(std::numeric_limits<float>::min()) &&
           greatest <= bit_cast<uint32_t>(std::numeric_limits<float>::max());
  }
  double smallest() const { return static_cast<double>(bit_cast<float>(least)); }
  double largest() const { return static_cast<double>(bit_cast<float>(greatest)); }
};

// The range of nonzero magnitudes a loop has seen, for deciding after it whether products of them
// stayed in float's normal range (a product with a zero is an exact zero). The bits of |v| order
// like |v| (a NaN above infinity), so the range is kept in unsigned minima and maxima, which
// vectorize where float ones would not; a zero's bits less one wrap past every other value's.
struct MagnitudeRange {
  uint32_t smallest_less_one = std::numeric_limits<uint32_t>::max();
  uint32_t largest = 0;

  void add(float v) {
    const uint32_t bits = bit_cast<uint32_t>(v) & 0x7fffffffu;
    smallest_less_one = std::min(smallest_less_one, bits - 1u);
    largest = std::max(largest, bits);
  }

  // The range's ends: +inf for the smallest of zeros alone, NaN for a NaN seen.
  double smallest() const {
    return smallest_less_one == std::numeric_limits<uint32_t>::max()
               ? std::numeric_limits<double>::infinity()
               : static_cast<double>(bit_cast<float>(smallest_less_one + 1));
  }
  double greatest() const { return static_cast<double>(bit_cast<float>(largest)); }
};

// Whether every product of factors from the given ranges is a normal float or an exact zero.
inline bool products_fit(std::initializer_list<MagnitudeRange> factors) {
  double smallest = 1.0;
  double greatest = 1.0;
  for (const MagnitudeRange& factor : factors) {
    smallest *= factor.smallest();
    greatest *= factor.greatest();
  }
  return smallest >= std::numeric_limits<float>::min() && greatest <= std::numeric_limits<float>::max();
}

// Whether t^exponent is a normal float for every t of a normal range, with room to spare for the
// fast powers' few ulp (and inside normal_exponential's clamps); and then the magnitudes it spans
// (the power is monotonic in t).
struct PowerRange {
  PowerRange(const BaseRange& t, double exponent) {
    const double at_smallest = std::pow(t.smallest(), exponent);
    const double at_largest = std::pow(t.largest(), exponent);
    const double least = std::min(at_smallest, at_largest);
    const double greatest = std::max(at_smallest, at_largest);
    normal = t.normal() && least >= 4.0 * std::numeric_limits<float>::min() &&
             greatest <= 0.25 * std::numeric_limits<float>::max();
    if (normal) {
      magnitudes.add(static_cast<float>(least));
      magnitudes.add(static_cast<float>(greatest));
    }
  }

  bool normal = false;
  MagnitudeRange magnitudes;
};

// The float32 fast paths below are accurate where T and every power they form are normal floats:
// the caller keeps the BaseRange of the T it passes and asks fits() after the loop.

// What the float32 fast paths that form t^e alone share: t^(e-1) as t^e / t, and the check that
// both are accurate.
template <typename Power>
class PowerOverT {
 public:
  // t^e, and t^(e-1) in over_t.
  float operator()(float t, float& over_t) const {
    const float power = static_cast<const Power&>(*this)(t);
    over_t = power / t;
    return power;
  }

  // Whether the powers of T in `t` are accurate: also the gradient's t^(e-1) where `gradient`.
  bool fits(const BaseRange& t, bool gradient) const {
    return PowerRange(t, exponent_).normal && (!gradient || PowerRange(t, exponent_ - 1.0).normal);
  }

 protected:
  explicit PowerOverT(double exponent) : exponent_(exponent) {}

  double exponent_;
};

// The float32 fast path for any exponent: t^e = e^(e * log t).
class LogExpPower : public PowerOverT<LogExpPower> {
 public:
  explicit LogExpPower(double exponent) : PowerOverT(exponent) {}

  using PowerOverT::operator();
  float operator()(float t) const { return normal_exponential(static_cast<float>(exponent_) * positive_log(t)); }
};

// The float32 fast path for the exponents people use (MPS's default -5, -1, -2, and the
// quarters below): whole multiples of 1/4 up to 16 in magnitude, t^e = t^n * t^(q/4) made of
// multiplications (t, t^2, t^4, t^8 by the bits of n), square roots and one reciprocal for a
// negative e. A few times faster than the logarithm and exponential, and more accurate: about
// one rounding per multiplication, whatever the size of the power. kFractional says whether q
// may be nonzero: whole exponents skip the square roots, which cost as much as the rest.
template <bool kFractional>
class QuarterPower {
 public:
  static bool applies(double exponent) {
    const double quarters = 4.0 * std::fabs(exponent);
    const bool on_grid = quarters < 64.0 && quarters == std::floor(quarters);
    return on_grid && (kFractional || exponent == std::floor(exponent));
  }

  explicit QuarterPower(double exponent)
      : exponent_(exponent),
        whole_(static_cast<int>(std::fabs(exponent))),
        quarters_(static_cast<int>(4.0 * std::fabs(exponent)) % 4),
        reciprocal_(exponent < 0) {}

  float operator()(float t) const {
    const float m = magnitude(t);
    return reciprocal_ ? 1.0f / m : m;
  }

  // t^e, and t^(e-1) in over_t, with one division: 1 / (m t) is t^(e-1) for a negative e, and
  // m * (m / (m t)) for a positive one (m^2 alone might overflow).
  float operator()(float t, float& over_t) const {
    const float m = magnitude(t);
    const float r = 1.0f / (m * t);
    over_t = reciprocal_ ? r : m * (m * r);
    return reciprocal_ ? r * t : m;
  }

  // Whether the powers of T in `t` are accurate: m = t^|e| a normal float, and t^e too (also
  // m * t and t^(e-1) for the gradient). m's factors only grow (t > 1) or shrink (t < 1) towards it.
  bool fits(const BaseRange& t, bool gradient) const {
    const double magnitude = std::fabs(exponent_);
    return PowerRange(t, exponent_).normal && PowerRange(t, magnitude).normal &&
           (!gradient || (PowerRange(t, exponent_ - 1.0).normal && PowerRange(t, magnitude + 1.0).normal));
  }

 private:
  // m = t^|e|.
  float magnitude(float t) const {
    // Selects on the per-call bits, so that the loops vectorize (the compiler hoists them).
    float m = 1.0f;
    if constexpr (kFractional) {
      const float root = std::sqrt(t);
      m = (quarters_ & 2 ? root : 1.0f) * (quarters_ & 1 ? std::sqrt(root) : 1.0f);
    }
    const float t2 = t * t;
    const float t4 = t2 * t2;
    m *= (whole_ & 1 ? t : 1.0f) * (whole_ & 2 ? t2 : 1.0f);
    m *= (whole_ & 4 ? t4 : 1.0f) * (whole_ & 8 ? t4 * t4 : 1.0f);
    return m;
  }

  double exponent_;
  int whole_;       // n, 0 to 15
  int quarters_;    // q, 0 to 3
  int reciprocal_;  // a bool here keeps GCC from vectorizing the loops around (no vector type for it)
};

// 1/sqrt(v) for a normal float v: a first guess from the bits (the exponent negated and halved,
// the well-known 0x5f3759df), then three Newton steps, each squaring the relative error (3.4e-2,
// 1.8e-3, 4.7e-6, 3e-11): within 1.3 ulp, from multiplications that vectorize on every target.
inline float inverse_sqrt(float v) {
  float y = bit_cast<float>(0x5f3759df - (bit_cast<int32_t>(v) >> 1));
  const float half = 0.5f * v;
  for (int step = 0; step < 3; ++step) {
    y = y * (1.5f - half * y * y);
  }
  return y;
}

// The float32 fast path for LRN's -0.75, and -0.5 and -0.25: s = 1/sqrt(t) by inverse_sqrt, then
// t^-0.5 = s, t^-0.25 = sqrt(s) and t^-0.75 = s * sqrt(s); the gradient's t^(e-1) is t^e * s^2,
// with no division. A square root or a division costs about as much as inverse_sqrt's
// multiplications (one 2.6 GHz core, AVX-512, X * T^-0.75 over 3136 elements: 0.14 ns an element,
// 0.17 with 1/sqrt(sqrt(t)) cubed, 0.20 with QuarterPower's two square roots and a division, 0.54
// with LogExpPower). Within 3e-7 relative, t^(e-1) within 6e-7, for every normal t that fits().
class RootPower : public PowerOverT<RootPower> {
 public:
  static bool applies(double exponent) { return exponent == -0.25 || exponent == -0.5 || exponent == -0.75; }

  explicit RootPower(double exponent) : PowerOverT(exponent), quarters_(static_cast<int>(-4.0 * exponent)) {}

  float operator()(float t) const { return power(inverse_sqrt(t)); }

  // t^e, and t^(e-1) in over_t: t^e * s^2 rather than PowerOverT's division. s^2 = 1/t lies
  // between 1 and t^(e-1), so fits() covers it.
  float operator()(float t, float& over_t) const {
    const float s = inverse_sqrt(t);
    const float p = power(s);
    over_t = p * (s * s);
    return p;
  }

 private:
  // t^e from s = t^-0.5: s^(q/2) as a product of selected factors, which the loops vectorize
  // (nested selects became branches that kept the gradient's loop scalar).
  float power(float s) const { return (quarters_ & 2 ? s : 1.0f) * (quarters_ & 1 ? std::sqrt(s) : 1.0f); }

  int quarters_;  // q, 1 to 3
};

// t -> t^exponent for t from double window sums, with float accuracy, as a double clamped to
// the finite range (so that 0 * T^e is 0). What depends on the exponent alone is worked out
// once, so that the per-element code has no branches to stop the loops from vectorizing.
class WidePower {
 public:
  explicit WidePower(double exponent)
      : exponent_(exponent),
        at_infinity_(exponent < 0 ? 0.0 : (exponent > 0 ? std::numeric_limits<double>::infinity() : 1.0)),
        at_nan_(exponent == 0 ? 1.0 : std::numeric_limits<double>::quiet_NaN()) {}

  double operator()(double t) const {
    constexpr double kMinNormal = std::numeric_limits<double>::min();
    constexpr double kLn2 = 0.693147180559945309417;
    // Subnormal t: scale into the normal range first, and take the scale back out of the exponent.
    const bool tiny = t < kMinNormal;
    const double normal = tiny ? t * 0x1p64 : t;
    // normal = (1 + m) * 2^k with 1 + m in [sqrt(1/2), sqrt(2)): subtracting the bits of
    // sqrt(1/2) before the shift moves the exponent's boundary there, without compare and select.
    const int64_t bits = bit_cast<int64_t>(normal);
    const int64_t k = (bits - 0x3fe6a09e667f3bcdll) >> 52;
    const float m = static_cast<float>(bit_cast<double>(bits - (k << 52)) - 1.0);
    const double log_t = static_cast<double>(log1p_reduced(m)) + to_double(tiny ? k - 64 : k) * kLn2;
    // Beyond these bounds the result is 0 or the largest double anyway (std::min/max keep a NaN
    // and become single instructions).
    const double w = std::min(std::max(exponent_ * log_t, -746.0), 710.0);
    const double n = std::floor(w * 1.44269504088896340736 + 0.5);
    const double r = w - n * kLn2;
    const double power = std::min(static_cast<double>(exp_reduced(static_cast<float>(r))) * two_to_the(to_int(n)),
                                  std::numeric_limits<double>::max());
    const double special = t > std::numeric_limits<double>::max()
                               ? at_infinity_
                               : (t <= 0 ? std::numeric_limits<double>::quiet_NaN() : at_nan_);  // as std::pow
    return t > 0 && t <= std::numeric_limits<double>::max() ? power : special;
  }

 private:
  double exponent_;
  double at_infinity_;
  double at_nan_;
};

// a * t^e in double, exact where the result is a finite double: where t^e alone overflows or
// underflows, in the log domain. t <= 0 gives NaN; a NaN or infinite t or a gives what the
// formula gives (NaN and infinities propagate as in PyTorch's pointwise ops).
inline double times_power(double a, double t, double e) {
  if (t <= 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const double p = std::pow(t, e);
  if (std::isnormal(p) || !std::isfinite(t) || !std::isfinite(a)) {
    return a * p;
  }
  if (a == 0) {
    return a;
  }
  return std::copysign(std::exp(std::log(std::fabs(a)) + e * std::log(t)), a);
}

// a * b * t^e, likewise, also where a * b alone would overflow or underflow.
inline double times_power(double a, double b, double t, double e) {
  const double ab = a * b;
  if (std::isnormal(ab) || a == 0 || b == 0 || !std::isfinite(a) || !std::isfinite(b) || !(t > 0) ||
      !std::isfinite(t)) {
    return times_power(ab, t, e);
  }
  return std::copysign(std::exp(std::log(std::fabs(a)) + std::log(std::fabs(b)) + e * std::log(t)), ab);
}

}  // namespace spatialnorm::cpu
