"""Pure-PyTorch spatial normalization, written straight from the definition (docs/definition.md).

It is the ground truth of the tests (run it in float64), and the implementation used on devices
that have no kernel of this package. Both functions are differentiable to any order.
"""

import torch
import torch.nn.functional as F


def window_extent(kernel_size: int, length: int):
    """(before, after): how far the window W reaches before and after its pixel, ``k // 2`` and
    ``(k - 1) // 2``, along a dimension of ``length`` pixels. A window reaching past the image on a
    side sums what it would sum reaching just to its edge, so the extents are clipped to it."""
    last = max(length - 1, 0)
    return min(kernel_size // 2, last), min((kernel_size - 1) // 2, last)


def padded_for_windows(x: torch.Tensor, kernel_width: int, kernel_height: int, mirrored: bool = False):
    """(``x`` padded with zeros by the window's reach, the pool size (rows, columns)): pooling the
    padded tensor with stride 1 visits each pixel's window W (its mirror M, ``mirrored=True``)."""
    height, width = x.shape[-2:]
    left, right = window_extent(kernel_width, width)
    top, bottom = window_extent(kernel_height, height)
    if mirrored:
        left, right, top, bottom = right, left, bottom, top
    return F.pad(x, (left, right, top, bottom)), (top + bottom + 1, left + right + 1)


def window_sum(x: torch.Tensor, kernel_width: int, kernel_height: int, mirrored: bool = False) -> torch.Tensor:
    """Sum of ``x`` over each pixel's window W, pixels outside the image counting as zero (the
    gradient's window M, ``mirrored=True``, is W's mirror image)."""
    padded, pool = padded_for_windows(x, kernel_width, kernel_height, mirrored)
    return F.avg_pool2d(padded, pool, stride=1, divisor_override=1)


def denominator(x, kernel_width, kernel_height, alpha, delta):
    """T = delta + alpha / (kw * kh) * sum of x^2 over the window (just delta when alpha is 0,
    whatever the window holds)."""
    if alpha == 0:
        return torch.full_like(x, delta)
    return delta + alpha / (kernel_width * kernel_height) * window_sum(x * x, kernel_width, kernel_height)


def power(t, exponent):
    """t ** exponent, NaN where t <= 0: the result is undefined there, and every implementation
    gives NaN (elsewhere as torch.pow, so NaN ** 0 is 1)."""
    return torch.where(t <= 0, torch.nan, t.pow(exponent))


def spatial_normalization(x, kernel_width, kernel_height=None, alpha=1.0, beta=5.0, delta=1.0):
    kernel_height = kernel_width if kernel_height is None else kernel_height
    t = denominator(x, kernel_width, kernel_height, alpha, delta)
    return x * power(t, -beta)


def spatial_normalization_gradient(
    source_gradient, source_image, kernel_width, kernel_height=None, alpha=1.0, beta=5.0, delta=1.0
):
    """dL/dX from dL/dY and X: the exact derivative of :func:`spatial_normalization`."""
    kernel_height = kernel_width if kernel_height is None else kernel_height
    dy, x = source_gradient, source_image
    t = denominator(x, kernel_width, kernel_height, alpha, delta)
    if alpha == 0 or beta == 0:  # the second term is absent, whatever X holds
        return dy * power(t, -beta)
    neighbours = window_sum(dy * x * power(t, -beta - 1.0), kernel_width, kernel_height, mirrored=True)
    return dy * power(t, -beta) - (2.0 * alpha * beta / (kernel_width * kernel_height)) * x * neighbours
