#include "spatial_norm.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace spatialnorm {
namespace {

void check_kernel_size(const char* name, int64_t size) {
  TORCH_CHECK_VALUE(size >= 1 && size <= kMaxKernelSize, name, " must be an integer in [1, ", kMaxKernelSize, "], got ",
                    size);
}

void check_settings(const Settings& s) {
  check_kernel_size("kernel_width", s.kernel_width);
  check_kernel_size("kernel_height", s.kernel_height);
  TORCH_CHECK_VALUE(std::isfinite(s.alpha) && s.alpha >= 0, "alpha must be finite and >= 0, got ", s.alpha);
  TORCH_CHECK_VALUE(std::isfinite(s.beta), "beta must be finite, got ", s.beta);
  TORCH_CHECK_VALUE(std::isfinite(s.delta), "delta must be finite, got ", s.delta);
}

void check_image(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(tensor.dim() == 3 || tensor.dim() == 4, name,
                    " must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, got a ", tensor.dim(), "-D tensor");
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   " must have dtype float32, float64, float16 or bfloat16, got ", dtype);
}

void check_same_layout(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(),
                    "grad_output and input must have the same shape, got ", grad_output.sizes(), " and ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == input.device(),
                    "grad_output and input must be on the same device, got ", grad_output.device(), " and ",
                    input.device());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(),
                   "grad_output and input must have the same dtype, got ", grad_output.scalar_type(), " and ",
                   input.scalar_type());
}

}  // namespace

Settings checked_forward_arguments(const at::Tensor& input, int64_t kernel_width, int64_t kernel_height,
                                   double alpha, double beta, double delta) {
  const Settings settings{kernel_width, kernel_height, alpha, beta, delta};
  check_settings(settings);
  check_image(input, "input");
  return settings;
}

Settings checked_backward_arguments(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_width,
                                    int64_t kernel_height, double alpha, double beta, double delta) {
  const Settings settings{kernel_width, kernel_height, alpha, beta, delta};
  check_settings(settings);
  check_image(grad_output, "grad_output");
  check_image(input, "input");
  check_same_layout(grad_output, input);
  return settings;
}

PlaneShape plane_shape(const at::Tensor& image) {
  const int64_t height = image.size(-2);
  const int64_t width = image.size(-1);
  const int64_t planes = height * width == 0 ? 0 : image.numel() / (height * width);
  return {planes, height, width};
}

OutputBuffer::OutputBuffer(const at::Tensor& input)
    : result_(at::empty_like(input)),
      contiguous_(result_.is_contiguous() ? result_ : at::empty(input.sizes(), result_.options())) {}

at::Tensor OutputBuffer::finish() {
  if (!contiguous_.is_same(result_)) {
    result_.copy_(contiguous_);
  }
  return result_;
}

}  // namespace spatialnorm
