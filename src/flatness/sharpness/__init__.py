"""Sharpness of a minimum: Keskar's ε-box measure, adaptive worst-case and average-case sharpness.

- :func:`sharpness`: Keskar et al. (2017, arXiv 1609.04836), Metric 2.1, by L-BFGS-B on the
  box C_ε, in the full space or a random (or given) subspace.
- :func:`adaptive_sharpness`: worst-case (adaptive) sharpness over an ℓ_p ball scaled by |θ|
  (Kwon et al. 2021, arXiv 2102.11600; Andriushchenko et al. 2023, arXiv 2302.07011).
- :func:`average_sharpness`: the expected loss increase under Gaussian perturbations scaled by
  |θ| (Andriushchenko et al. 2023).

All evaluate the full data through :class:`flatness.Objective` and leave the model untouched.
The optimizers live in :mod:`flatness.algorithms.maximize` and know nothing of models.
"""

from flatness.sharpness._common import AdaptiveSharpnessResult, AverageSharpnessResult, SharpnessResult
from flatness.sharpness.adaptive import adaptive_sharpness
from flatness.sharpness.average import average_sharpness
from flatness.sharpness.keskar import sharpness

__all__ = [
    "AdaptiveSharpnessResult",
    "AverageSharpnessResult",
    "SharpnessResult",
    "adaptive_sharpness",
    "average_sharpness",
    "sharpness",
]
