"""Host code of the Metal kernels (metal/spatial_norm.metal) for the ``mps`` device.

:class:`MetalKernels` drives the kernels through a compiled library object: the one
``torch.mps.compile_shader`` returns on a Mac, or any object with the same calling convention
(the tests use a CPU emulator of the Metal source). Importing this module registers it as the
``MPS`` implementation of ``spatialnorm::forward`` and ``spatialnorm::backward``.
"""

from pathlib import Path

import torch

from . import _ops  # noqa: F401  (the op schema must exist before kernels are registered)
from ._layout import laid_out_like
from ._metal_sweep import plan_sweep
from .reference import window_extent
from ._validation import check_backward_arguments, check_forward_arguments

# Kernel name suffix of each dtype the Metal source instantiates.
_KERNEL_SUFFIX = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}

# Threads per threadgroup of the general path: a SIMD-group multiple, within every Apple GPU's limit.
_GROUP_SIZE = 256


def metal_source_path() -> Path:
    """The Metal source: packaged beside this module when installed, in metal/ in a source tree."""
    packaged = Path(__file__).parent / "metal" / "spatial_norm.metal"
    return packaged if packaged.exists() else Path(__file__).parent.parent / "metal" / "spatial_norm.metal"


class MetalKernels:
    """Runs spatial normalization and its gradient with the kernels of a compiled Metal library."""

    def __init__(self, library):
        self._library = library

    def _kernel(self, name: str, dtype: torch.dtype):
        suffix = _KERNEL_SUFFIX.get(dtype)
        if suffix is None:
            raise TypeError(f"dtype {dtype} is not supported by the Metal kernels (Metal has no double); use float32")
        try:
            return getattr(self._library, f"{name}_{suffix}")
        except AttributeError:
            raise TypeError(f"dtype {dtype} needs Metal Shading Language 3.1 (macOS 14 or later)") from None

    def _dispatch(self, kernel, *args, threads: int) -> None:
        if threads > 0:
            kernel(*args, threads=threads, group_size=min(threads, _GROUP_SIZE))

    def _row_sums_of_squares(self, x, kernel_width):
        """Sums of x^2 along each row over the forward window's columns (float32)."""
        width = x.shape[-1]
        planes_rows = x.numel() // width if width else 0
        sums = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        kernel = self._kernel("row_sums_of_squares", x.dtype)
        self._dispatch(kernel, x, sums, width, planes_rows, *window_extent(kernel_width, width), threads=planes_rows)
        return sums

    def _plan(self, gradient, x, kernel_width, kernel_height):
        height, width = x.shape[-2:]
        if x.numel() == 0:
            return None
        return plan_sweep(
            gradient, x.numel() // (height * width), height, width, window_extent(kernel_height, height),
            window_extent(kernel_width, width),
        )

    def forward(self, input, kernel_width, kernel_height, alpha, beta, delta):
        kernel_width, kernel_height, alpha, beta, delta = check_forward_arguments(
            input, kernel_width, kernel_height, alpha, beta, delta
        )
        tiled = self._kernel("forward_tiled", input.dtype)
        x = input.contiguous()  # the kernels read raw storage: strides would be ignored
        scale = alpha / (kernel_width * kernel_height)
        plan = self._plan(False, x, kernel_width, kernel_height)
        if plan is not None:
            output = torch.empty_like(x)
            tiled(x, output, list(plan.fields), scale, delta, -beta, threads=plan.threads, group_size=plan.group_size)
            return laid_out_like(input, output)
        return laid_out_like(input, self._general_forward(x, kernel_width, kernel_height, scale, beta, delta))

    def _general_forward(self, x, kernel_width, kernel_height, scale, beta, delta):
        kernel = self._kernel("forward_from_row_sums", x.dtype)
        height, width = x.shape[-2:]
        columns = x.numel() // height if height else 0
        row_sums = self._row_sums_of_squares(x, kernel_width)
        output = torch.empty_like(x)
        self._dispatch(
            kernel, x, row_sums, output, width, height, columns, *window_extent(kernel_height, height),
            scale, delta, -beta, threads=columns,
        )
        return output

    def backward(self, grad_output, input, kernel_width, kernel_height, alpha, beta, delta):
        kernel_width, kernel_height, alpha, beta, delta = check_backward_arguments(
            grad_output, input, kernel_width, kernel_height, alpha, beta, delta
        )
        tiled = self._kernel("gradient_tiled", input.dtype)
        x, dy = input.contiguous(), grad_output.contiguous()
        window_size = kernel_width * kernel_height
        scale, gradient_scale = alpha / window_size, 2.0 * alpha * beta / window_size
        plan = self._plan(True, x, kernel_width, kernel_height)
        if plan is not None:
            grad_input = torch.empty_like(x)
            tiled(
                dy, x, grad_input, list(plan.fields), scale, delta, -beta, -beta - 1.0, gradient_scale,
                threads=plan.threads, group_size=plan.group_size,
            )
            return laid_out_like(input, grad_input)
        return laid_out_like(
            input, self._general_backward(dy, x, kernel_width, kernel_height, scale, beta, delta, gradient_scale)
        )

    def _general_backward(self, dy, x, kernel_width, kernel_height, scale, beta, delta, gradient_scale):
        """dX through full-size float32 scratch: for windows too large for threadgroup memory."""
        terms_kernel = self._kernel("gradient_terms", x.dtype)
        finish_kernel = self._kernel("gradient_from_row_sums", x.dtype)
        height, width = x.shape[-2:]
        columns = x.numel() // height if height else 0
        row_sums = self._row_sums_of_squares(x, kernel_width)
        scaled_gradient = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # dY * T^-beta
        terms = torch.empty_like(scaled_gradient)
        self._dispatch(
            terms_kernel, dy, x, row_sums, scaled_gradient, terms, width, height, columns,
            *window_extent(kernel_height, height), scale, delta, -beta, -beta - 1.0, threads=columns,
        )
        # The gradient's window M is the mirror of W: swap before and after.
        term_row_sums = row_sums  # the squares' row sums are no longer needed
        rows = x.numel() // width if width else 0
        self._dispatch(
            self._library.row_sums, terms, term_row_sums, width, rows, *reversed(window_extent(kernel_width, width)),
            threads=rows,
        )
        grad_input = torch.empty_like(x)
        self._dispatch(
            finish_kernel, x, scaled_gradient, term_row_sums, grad_input, width, height, columns,
            *reversed(window_extent(kernel_height, height)), gradient_scale, threads=columns,
        )
        return grad_input


_device_kernels = None


def device_kernels() -> MetalKernels:
    """The kernels compiled for this Mac's GPU, once per process."""
    global _device_kernels
    if _device_kernels is None:
        _device_kernels = MetalKernels(torch.mps.compile_shader(metal_source_path().read_text()))
    return _device_kernels


def _forward_mps(input, kernel_width, kernel_height, alpha, beta, delta):
    return device_kernels().forward(input, kernel_width, kernel_height, alpha, beta, delta)


def _backward_mps(grad_output, input, kernel_width, kernel_height, alpha, beta, delta):
    return device_kernels().backward(grad_output, input, kernel_width, kernel_height, alpha, beta, delta)


torch.library.register_kernel("spatialnorm::forward", "mps", _forward_mps)
torch.library.register_kernel("spatialnorm::backward", "mps", _backward_mps)
