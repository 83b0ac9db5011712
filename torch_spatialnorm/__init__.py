"""Spatial (within-channel) local response normalization for PyTorch, with the semantics of
Apple's ``MPSCNNSpatialNormalization`` and ``MPSCNNSpatialNormalizationGradient``."""

from . import mps, reference
from .functional import spatial_normalization, spatial_normalization_gradient
from .modules import SpatialNormalization, SpatialNormalizationGradient

__version__ = "0.1.0"

__all__ = [
    "SpatialNormalization",
    "SpatialNormalizationGradient",
    "mps",
    "reference",
    "spatial_normalization",
    "spatial_normalization_gradient",
]
