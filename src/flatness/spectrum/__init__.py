"""Spectra of curvature matrices: top-k eigenpairs, trace, spectral density, per block.

The composable core (:mod:`flatness.spectrum.core`): build a curvature operator once
(:func:`flatness.curvature_operator` or a class of :mod:`flatness.operators`), then run
:func:`topk`, :func:`trace`, :func:`density` or :func:`by_block` on it. The model-level
conveniences :func:`hessian_topk`, :func:`hessian_trace` and :func:`hessian_density` build the
operator of ``(model, loss_fn, data)`` and call them. The algorithms of
:mod:`flatness.algorithms` are re-exported here for compatibility.
"""

from flatness.algorithms.density import DensityResult, slq_density
from flatness.algorithms.lanczos import LanczosResult, lanczos_eigsh
from flatness.algorithms.trace import TraceResult, hutchinson, hutchpp, trace_estimate
from flatness.spectrum.core import (
    BlockSpectra,
    CurvatureDensity,
    CurvatureTopK,
    CurvatureTrace,
    by_block,
    density,
    parameter_blocks,
    topk,
    trace,
)
from flatness.spectrum.hessian import (
    HessianDensity,
    HessianTopK,
    HessianTrace,
    hessian_density,
    hessian_topk,
    hessian_trace,
)

__all__ = [
    "BlockSpectra",
    "CurvatureDensity",
    "CurvatureTopK",
    "CurvatureTrace",
    "DensityResult",
    "HessianDensity",
    "HessianTopK",
    "HessianTrace",
    "LanczosResult",
    "TraceResult",
    "by_block",
    "density",
    "hessian_density",
    "hessian_topk",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos_eigsh",
    "parameter_blocks",
    "slq_density",
    "topk",
    "trace",
    "trace_estimate",
]
