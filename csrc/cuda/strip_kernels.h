// The CUDA forward and gradient for large windows, a block walking down a strip of a plane
// (strip_forward.cu, strip_backward.cu); spatial_norm_cuda.cu takes them where they apply.
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

// Writes the gradient dx of the input x for the output's gradient dy (all contiguous) and returns
// true for windows whose larger side (as clipped to the plane) is from 31 (32 in 16-bit types) to
// 64 and whose strips fit a block's shared memory; returns false and writes nothing elsewhere.
template <typename scalar_t>
bool backward_by_strips(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const PlaneShape& shape,
                        const Settings& settings, const Coefficients<at::opmath_type<scalar_t>>& k);

}  // namespace spatialnorm::cuda
