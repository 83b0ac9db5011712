// The CUDA forward for the common windows, with the window sums in registers
// (register_forward.cu); spatial_norm_cuda.cu takes it where it applies.
#pragma once

#include "../spatial_norm.h"
#include "coefficients.cuh"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

namespace spatialnorm::cuda {

// Writes the forward of x (contiguous) into y (contiguous) and returns true for square windows
// from 2x2 to 5x5 in float32 and to 6x6 in float16 and bfloat16, over planes whose rows are whole,
// aligned groups of four values (each plane under 2^31 elements); returns false and writes nothing
// elsewhere.
template <typename scalar_t>
bool forward_in_registers(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, const Settings& settings,
                          const Coefficients<at::opmath_type<scalar_t>>& k);

}  // namespace spatialnorm::cuda
