// Autograd of spatialnorm::forward, on every device: its backward is spatialnorm::backward, and
// only the input is saved. Written in C++ so that a training step spends no Python on it (a
// Python autograd.Function costs several times the launch of a kernel). The gradient op's own
// autograd, the double backward, is a composite formula registered from torch_spatialnorm/_ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace spatialnorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_op(const at::Tensor& input, int64_t kernel_width, int64_t kernel_height, double alpha, double beta,
                      double delta) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spatialnorm::forward", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, double, double, double)>();
  return op.call(input, kernel_width, kernel_height, alpha, beta, delta);
}

at::Tensor backward_op(const at::Tensor& grad_output, const at::Tensor& input, int64_t kernel_width,
                       int64_t kernel_height, double alpha, double beta, double delta) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("spatialnorm::backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double, double)>();
  return op.call(grad_output, input, kernel_width, kernel_height, alpha, beta, delta);
}

class SpatialNormalization : public torch::autograd::Function<SpatialNormalization> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, int64_t kernel_width,
                            int64_t kernel_height, double alpha, double beta, double delta) {
    ctx->save_for_backward({input});
    ctx->saved_data["kernel_width"] = kernel_width;
    ctx->saved_data["kernel_height"] = kernel_height;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["delta"] = delta;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op(input, kernel_width, kernel_height, alpha, beta, delta);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor input = ctx->get_saved_variables()[0];
    const auto& s = ctx->saved_data;
    const at::Tensor grad_input =
        backward_op(grad_outputs[0], input, s.at("kernel_width").toInt(), s.at("kernel_height").toInt(),
                    s.at("alpha").toDouble(), s.at("beta").toDouble(), s.at("delta").toDouble());
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor forward_with_autograd(const at::Tensor& input, int64_t kernel_width, int64_t kernel_height, double alpha,
                                 double beta, double delta) {
  return SpatialNormalization::apply(input, kernel_width, kernel_height, alpha, beta, delta);
}

}  // namespace

TORCH_LIBRARY_IMPL(spatialnorm, Autograd, m) {
  m.impl("forward", &forward_with_autograd);
}

}  // namespace spatialnorm
