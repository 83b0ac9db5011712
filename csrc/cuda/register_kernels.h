// The CUDA forward and gradient for the common windows, with the window sums in registers
// (register_forward.cu, register_backward.cu); spatial_norm_cuda.cu takes them where they apply.
#pragma once

#include "../spatial_norm.h"
#include "coefficients.cuh"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

namespace spatialnorm::cuda {

// Writes the forward of x (contiguous) into y (contiguous) and returns true for square windows
// from 2x2 to 17x17 in float32, float16 and bfloat16, over planes whose rows are whole,
// aligned groups of four values (each plane under 2^31 elements); returns false and writes nothing
// elsewhere.
template <typename scalar_t>
bool forward_in_registers(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, const Settings& settings,
                          const Coefficients<at::opmath_type<scalar_t>>& k);

// Writes the gradient dx of the input x for the output's gradient dy (all contiguous) and returns
// true for square windows from 2x2 to 9x9 in float32, float16 and bfloat16, over the same planes;
// returns false and writes nothing elsewhere.
template <typename scalar_t>
bool backward_in_registers(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                           const Settings& settings, const Coefficients<at::opmath_type<scalar_t>>& k);

}  // namespace spatialnorm::cuda
