"""Loss landscapes: interpolation between models, 1-D and 2-D slices, directions.

Goodfellow et al. 2015 (arXiv 1412.6544), Keskar et al. 2017 (arXiv 1609.04836, Fig. 3),
Li et al. 2018 (arXiv 1712.09913). See ``docs/landscape.md``.
"""

from flatness.landscape.directions import (
    TrajectoryPCA,
    eigen_directions,
    normalize_direction,
    pca_directions,
    random_direction,
)
from flatness.landscape.grid import accuracy, interpolate, landscape_1d, landscape_2d
from flatness.landscape.result import (
    Interpolation,
    Landscape1D,
    Landscape2D,
    LandscapeResult,
    load_landscape,
)

__all__ = [
    "Interpolation",
    "Landscape1D",
    "Landscape2D",
    "LandscapeResult",
    "TrajectoryPCA",
    "accuracy",
    "eigen_directions",
    "interpolate",
    "landscape_1d",
    "landscape_2d",
    "load_landscape",
    "normalize_direction",
    "pca_directions",
    "random_direction",
]
