// The CUDA forward for large windows, a block walking down a strip of a plane (strip_forward.cu);
// spatial_norm_cuda.cu takes it where it applies.
#pragma once

#include "../spatial_norm.h"
#include "coefficients.cuh"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

namespace spatialnorm::cuda {

// Writes the forward of x (contiguous) into y (contiguous) and returns true for windows from 32
// rows or columns on (as clipped to the plane) whose strips fit a block's shared memory; returns
// false and writes nothing elsewhere.
template <typename scalar_t>
bool forward_by_strips(const at::Tensor& x, const at::Tensor& y, const PlaneShape& shape, const Settings& settings,
                       const Coefficients<at::opmath_type<scalar_t>>& k);

}  // namespace spatialnorm::cuda
