"""Argument checks shared by the Python API, the fake kernels and the Python-side device kernels.

The messages match the C++ checks (csrc/spatial_norm.cpp) word for word, so an error reads the
same whichever device raised it.
"""

import math
import numbers

import torch

# The largest kernel size: the kernels index a window's rows and columns with 32-bit integers, and
# the product of two sizes must fit in 64 bits.
MAX_KERNEL_SIZE = 2**31 - 1

# The dtypes the kernels are built for (16-bit ones computed in float32).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# Under torch.compile, floats (and with dynamic shapes, sizes) may be symbols with no value yet:
# their values are not checked while tracing, but by the operator's kernel when it runs.
def _symbolic(value) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat)) or torch.compiler.is_compiling()


def check_kernel_size(name: str, value) -> int:
    if type(value) is int and 1 <= value <= MAX_KERNEL_SIZE:  # the common case, before the slower checks
        return value
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_KERNEL_SIZE:
        raise ValueError(f"{name} must be an integer in [1, {MAX_KERNEL_SIZE}], got {value!r}")
    return int(value)


def _check_real(name: str, value) -> float:
    if type(value) is float:  # the common case, before the slower checks
        return value
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_alpha(value) -> float:
    value = _check_real("alpha", value)
    if not _symbolic(value) and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {value}")
    return value


def check_finite(name: str, value) -> float:
    value = _check_real(name, value)
    if not _symbolic(value) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_settings(kernel_width, kernel_height, alpha, beta, delta):
    """Validated (kernel_width, kernel_height, alpha, beta, delta); kernel_height None means square."""
    kernel_width = check_kernel_size("kernel_width", kernel_width)
    kernel_height = kernel_width if kernel_height is None else check_kernel_size("kernel_height", kernel_height)
    return kernel_width, kernel_height, check_alpha(alpha), check_finite("beta", beta), check_finite("delta", delta)


def check_image(tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() not in (3, 4):
        raise ValueError(f"{name} must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, got a {tensor.dim()}-D tensor")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float64, float16 or bfloat16, got {tensor.dtype}")


def check_same_layout(grad, image, grad_name: str = "grad_output", image_name: str = "input") -> None:
    for what in ("shape", "device", "dtype"):
        a, b = getattr(grad, what), getattr(image, what)
        if a != b:
            error = TypeError if what == "dtype" else ValueError
            raise error(f"{grad_name} and {image_name} must have the same {what}, got {a} and {b}")


def check_forward_arguments(input, kernel_width, kernel_height, alpha, beta, delta):
    """The op's settings, validated, after checking its input (as the C++ kernels do)."""
    settings = check_settings(kernel_width, kernel_height, alpha, beta, delta)
    check_image(input, "input")
    return settings


def check_backward_arguments(grad_output, input, kernel_width, kernel_height, alpha, beta, delta):
    """The gradient op's settings, validated, after checking both tensors (as the C++ kernels do)."""
    settings = check_settings(kernel_width, kernel_height, alpha, beta, delta)
    check_image(grad_output, "grad_output")
    check_image(input, "input")
    check_same_layout(grad_output, input)
    return settings
