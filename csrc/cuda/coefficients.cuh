// The constants of a call in the compute type, the denominator T they make of a window sum and
// the gradient's dX they make of its terms: shared by the CUDA kernels of every translation unit.
#pragma once

#include "../spatial_norm.h"
#include "powers.cuh"

namespace spatialnorm::cuda {

template <typename opmath_t>
struct Coefficients {
  opmath_t scale;           // alpha / (kw * kh)
  opmath_t delta;
  opmath_t neg_beta;
  opmath_t g_exponent;      // -beta - 1
  opmath_t gradient_scale;  // 2 * alpha * beta / (kw * kh)
};

template <typename opmath_t>
Coefficients<opmath_t> coefficients(const Settings& s) {
  return {static_cast<opmath_t>(s.alpha / s.window_size()), static_cast<opmath_t>(s.delta),
          static_cast<opmath_t>(-s.beta), static_cast<opmath_t>(-s.beta - 1.0),
          static_cast<opmath_t>(2.0 * s.alpha * s.beta / s.window_size())};
}

// T = delta + alpha/(kw*kh) * (window sum of X^2); just delta when alpha is 0, whatever the window
// holds (also infinities or NaN).
template <typename opmath_t>
__device__ inline PowerBase<opmath_t> denominator(const Coefficients<opmath_t>& k, opmath_t window_sum) {
  return PowerBase<opmath_t>(k.scale == opmath_t(0) ? k.delta : k.delta + k.scale * window_sum);
}

// dX = dY*T^-beta - gradient_scale * X * (M-window sum of G); with alpha or beta 0 the second
// term is absent, whatever G's sum holds.
template <typename opmath_t>
__device__ inline opmath_t gradient_of_input(const Coefficients<opmath_t>& k, opmath_t dy_p, opmath_t x,
                                             opmath_t g_sum) {
  return k.gradient_scale == opmath_t(0) ? dy_p : dy_p - k.gradient_scale * x * g_sum;
}

}  // namespace spatialnorm::cuda
