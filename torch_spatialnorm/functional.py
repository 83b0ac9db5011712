"""The functional API: spatial normalization and its gradient kernel."""

import torch

from . import _ops  # noqa: F401  (registers the fake and fallback kernels)
from ._autograd import call_forward, call_gradient
from ._validation import check_image, check_same_layout, check_settings

__all__ = ["spatial_normalization", "spatial_normalization_gradient"]


def spatial_normalization(
    input: torch.Tensor, kernel_width: int, kernel_height=None, alpha=1.0, beta=5.0, delta=1.0
) -> torch.Tensor:
    r"""Normalizes each channel of each image over a ``kernel_height x kernel_width`` window.

    ``Y = X * (delta + alpha / (kw * kh) * sum of X^2 over the window) ^ (-beta)``, with the window
    reaching ``k // 2`` pixels before each pixel and ``(k - 1) // 2`` after it and pixels outside
    the image counting as zero: the semantics of ``MPSCNNSpatialNormalization``. ``input`` is
    ``(N, C, H, W)`` or ``(C, H, W)``; ``kernel_height`` defaults to ``kernel_width``.
    Differentiable to second order.
    """
    kernel_width, kernel_height, alpha, beta, delta = check_settings(kernel_width, kernel_height, alpha, beta, delta)
    check_image(input, "input")
    return call_forward(input, kernel_width, kernel_height, alpha, beta, delta)


def spatial_normalization_gradient(
    source_gradient: torch.Tensor,
    source_image: torch.Tensor,
    kernel_width: int,
    kernel_height=None,
    alpha=1.0,
    beta=5.0,
    delta=1.0,
) -> torch.Tensor:
    """The gradient kernel (``MPSCNNSpatialNormalizationGradient``): dL/dX from dL/dY and X."""
    kernel_width, kernel_height, alpha, beta, delta = check_settings(kernel_width, kernel_height, alpha, beta, delta)
    check_image(source_gradient, "source_gradient")
    check_image(source_image, "source_image")
    check_same_layout(source_gradient, source_image, "source_gradient", "source_image")
    return call_gradient(source_gradient, source_image, kernel_width, kernel_height, alpha, beta, delta)
