// Division by a divisor fixed at launch, with a multiplication and a shift (ATen's IntDivider):
// how the CUDA kernels turn a block's or a segment's index into its place in the planes.
#pragma once

#include <ATen/cuda/detail/IntegerDivider.cuh>

namespace spatialnorm::cuda {

using Divider = at::cuda::detail::IntDivider<unsigned int>;

}  // namespace spatialnorm::cuda
