"""Python-side registrations for the ``spatialnorm`` operators declared in csrc/ops.cpp.

Importing this module loads the compiled kernels (CPU, and CUDA where built) and the forward's
autograd (csrc/autograd.cpp), and adds the fake kernels, the gradient op's autograd formula, and
the reference implementation for devices without a kernel.
"""

import warnings

import torch

from . import _C  # noqa: F401  (registers the schema and the compiled kernels)
from . import reference
from ._layout import laid_out_like
from ._validation import check_backward_arguments, check_forward_arguments

forward = torch.ops.spatialnorm.forward
backward = torch.ops.spatialnorm.backward


@torch.library.register_fake("spatialnorm::forward")
def _forward_fake(input, kernel_width, kernel_height, alpha, beta, delta):
    check_forward_arguments(input, kernel_width, kernel_height, alpha, beta, delta)
    return torch.empty_like(input)


@torch.library.register_fake("spatialnorm::backward")
def _backward_fake(grad_output, input, kernel_width, kernel_height, alpha, beta, delta):
    check_backward_arguments(grad_output, input, kernel_width, kernel_height, alpha, beta, delta)
    return torch.empty_like(input)


# Devices with no kernel of ours run the reference, after saying so once per device type.
_warned_device_types = set()


def _warn_once_about_fallback(device):
    if device.type not in _warned_device_types:
        _warned_device_types.add(device.type)
        warnings.warn(
            f"torch_spatialnorm has no kernel for the {device.type} device; using the pure-PyTorch "
            "reference implementation, which is slower and uses more memory",
            stacklevel=3,
        )


def _forward_reference(input, kernel_width, kernel_height, alpha, beta, delta):
    check_forward_arguments(input, kernel_width, kernel_height, alpha, beta, delta)
    _warn_once_about_fallback(input.device)
    return laid_out_like(input, reference.spatial_normalization(input, kernel_width, kernel_height, alpha, beta, delta))


def _backward_reference(grad_output, input, kernel_width, kernel_height, alpha, beta, delta):
    check_backward_arguments(grad_output, input, kernel_width, kernel_height, alpha, beta, delta)
    _warn_once_about_fallback(input.device)
    result = reference.spatial_normalization_gradient(grad_output, input, kernel_width, kernel_height, alpha, beta, delta)
    return laid_out_like(input, result)


torch.library.register_kernel("spatialnorm::forward", None, _forward_reference)
torch.library.register_kernel("spatialnorm::backward", None, _backward_reference)


# Autograd of the gradient op (double backward of the forward), as a composite of PyTorch ops.
# With dX = dY*P - c*X*R, P = T^-beta, Q = P/T, R = M(dY*X*Q), T = delta + a*W(X^2), where W and M
# are the window sums, a = alpha/(kw*kh) and c = 2*alpha*beta/(kw*kh), and the incoming gradient
# V of dX, write U = W(X*V); then
#   d/d(dY) = V*P - c*X*Q*U
#   d/dT    = -beta*V*dY*Q + c*(beta+1)*U*dY*X*Q/T
#   d/dX    = -c*V*R - c*U*dY*Q + 2*a*X*M(d/dT)
def _backward_setup_context(ctx, inputs, output):
    grad_output, input, *settings = inputs
    ctx.settings = settings
    ctx.save_for_backward(grad_output, input)


def _backward_backward(ctx, v):
    dy, x = ctx.saved_tensors
    if x.numel() == 0:  # the window sums of an empty image are empty, but pooling refuses one
        return torch.zeros_like(dy), torch.zeros_like(x), None, None, None, None, None
    kernel_width, kernel_height, alpha, beta, delta = ctx.settings
    a = alpha / (kernel_width * kernel_height)
    c = 2.0 * alpha * beta / (kernel_width * kernel_height)
    t = reference.denominator(x, kernel_width, kernel_height, alpha, delta)
    p = reference.power(t, -beta)
    if c == 0:  # alpha or beta 0: dX = dY * T^-beta, and T^-beta does not depend on X
        return v * p, torch.zeros_like(x), None, None, None, None, None
    q = reference.power(t, -beta - 1.0)
    r = reference.window_sum(dy * x * q, kernel_width, kernel_height, mirrored=True)
    u = reference.window_sum(x * v, kernel_width, kernel_height)
    grad_dy = v * p - c * x * q * u
    grad_t = -beta * v * dy * q + c * (beta + 1.0) * u * dy * x * q / t
    grad_x = -c * v * r - c * u * dy * q + 2.0 * a * x * reference.window_sum(grad_t, kernel_width, kernel_height, mirrored=True)
    return grad_dy, grad_x, None, None, None, None, None


torch.library.register_autograd("spatialnorm::backward", _backward_backward, setup_context=_backward_setup_context)
