"""Python-side registrations for the ``spatialnorm`` operators declared in csrc/ops.cpp.

Importing this module loads the compiled kernels (CPU, and CUDA where built), their autograd and
vmap rules (torch_spatialnorm/_autograd.py), and adds the fake kernels and the reference
implementation for devices without a kernel.
"""

import warnings

import torch

from . import _C  # noqa: F401  (registers the schema and the compiled kernels)
from . import _autograd  # noqa: F401  (registers autograd and vmap)
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
