// Definitions shared by every device's kernels: window geometry, argument checks and the
// output layout rule. The operator schema itself lives in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace spatialnorm {

// How far a window reaches before and after its centre pixel along one dimension.
struct WindowExtent {
  int64_t before;
  int64_t after;

  int64_t span() const { return before + after + 1; }
};

// The forward window W: [p - k//2, p + (k-1)//2] (docs/definition.md).
inline WindowExtent forward_extent(int64_t kernel_size) {
  return {kernel_size / 2, (kernel_size - 1) / 2};
}

// A window along a dimension of `size` >= 1 pixels, clipped to it: reaching past the image on a
// side sums what reaching just to its edge sums (the divisor stays kw * kh), and clipping bounds
// what the kernels index and buffer.
inline WindowExtent clipped(WindowExtent extent, int64_t size) {
  return {std::min(extent.before, size - 1), std::min(extent.after, size - 1)};
}

// The gradient window M is the mirror image of W.
inline WindowExtent mirrored(WindowExtent extent) {
  return {extent.after, extent.before};
}

// The largest kernel size: windows are indexed with 32-bit integers, and the product of two sizes
// fits in 64 bits (torch_spatialnorm/_validation.py has the same bound).
constexpr int64_t kMaxKernelSize = (int64_t{1} << 31) - 1;

// Settings of one call, as the schema passes them.
struct Settings {
  int64_t kernel_width;
  int64_t kernel_height;
  double alpha;
  double beta;
  double delta;

  // kw * kh, the divisor of every window sum (whatever part of the window lies in the image).
  double window_size() const { return static_cast<double>(kernel_width) * static_cast<double>(kernel_height); }
};

// The arguments of each op, checked: a c10::Error names the offending one, and nothing has been
// touched when it is thrown.
Settings checked_forward_arguments(const at::Tensor& input, int64_t kernel_width, int64_t kernel_height,
                                   double alpha, double beta, double delta);
Settings checked_backward_arguments(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_width,
                                    int64_t kernel_height, double alpha, double beta, double delta);

// A tensor shaped (planes, height, width) view of a 3-D or 4-D image.
struct PlaneShape {
  int64_t planes;
  int64_t height;
  int64_t width;
};
PlaneShape plane_shape(const at::Tensor& image);

// The output of an op is laid out like its input (empty_like's preserve_format). Kernels write
// into a contiguous buffer: the output itself where it is contiguous, else a temporary that
// `finish` copies back.
class OutputBuffer {
 public:
  explicit OutputBuffer(const at::Tensor& input);
  const at::Tensor& contiguous() const { return contiguous_; }
  at::Tensor finish();

 private:
  at::Tensor result_;
  at::Tensor contiguous_;
};

}  // namespace spatialnorm
