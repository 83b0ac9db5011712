"""nn.Module wrappers, the PyTorch counterparts of MPSCNNSpatialNormalization(Gradient)."""

import torch
from torch import nn

from . import functional
from ._validation import check_alpha, check_finite, check_settings

__all__ = ["SpatialNormalization", "SpatialNormalizationGradient"]


class _SpatialNormalizationSettings(nn.Module):
    """Kernel sizes fixed at construction (as in MPS); alpha, beta and delta validated on set."""

    def __init__(self, kernel_width: int, kernel_height=None, alpha=1.0, beta=5.0, delta=1.0):
        super().__init__()
        self._kernel_width, self._kernel_height, self._alpha, self._beta, self._delta = check_settings(
            kernel_width, kernel_height, alpha, beta, delta
        )

    @property
    def kernel_width(self) -> int:
        return self._kernel_width

    @property
    def kernel_height(self) -> int:
        return self._kernel_height

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value) -> None:
        self._alpha = check_alpha(value)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value) -> None:
        self._beta = check_finite("beta", value)

    @property
    def delta(self) -> float:
        return self._delta

    @delta.setter
    def delta(self, value) -> None:
        self._delta = check_finite("delta", value)

    def settings(self) -> dict:
        return {
            "kernel_width": self._kernel_width,
            "kernel_height": self._kernel_height,
            "alpha": self._alpha,
            "beta": self._beta,
            "delta": self._delta,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.settings().items())


class SpatialNormalization(_SpatialNormalizationSettings):
    """Spatial (within-channel) local response normalization; see
    :func:`torch_spatialnorm.spatial_normalization`.

    Example::

        >>> norm = SpatialNormalization(5, alpha=1e-2, beta=0.75)
        >>> y = norm(torch.randn(8, 16, 32, 32))
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.spatial_normalization(input, **self.settings())


class SpatialNormalizationGradient(_SpatialNormalizationSettings):
    """The gradient filter: ``g(source_gradient, source_image)`` gives dL/dX from dL/dY and X."""

    @classmethod
    def from_forward(cls, forward: SpatialNormalization) -> "SpatialNormalizationGradient":
        """A gradient filter with the same settings as ``forward``."""
        if not isinstance(forward, SpatialNormalization):
            raise TypeError(f"from_forward needs a SpatialNormalization, got {type(forward).__name__}")
        return cls(**forward.settings())

    def forward(self, source_gradient: torch.Tensor, source_image: torch.Tensor) -> torch.Tensor:
        return functional.spatial_normalization_gradient(source_gradient, source_image, **self.settings())
