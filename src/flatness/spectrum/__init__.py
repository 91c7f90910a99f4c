"""Model-level spectra of curvature matrices: top-k eigenpairs, trace, spectral density.

:func:`hessian_topk`, :func:`hessian_trace` and :func:`hessian_density` build the curvature
operator of ``(model, loss_fn, data)`` (:mod:`flatness.operators`) and run the algorithms of
:mod:`flatness.algorithms` on it. The algorithms are re-exported here for compatibility.
"""

from flatness.algorithms.density import DensityResult, slq_density
from flatness.algorithms.lanczos import LanczosResult, lanczos_eigsh
from flatness.algorithms.trace import TraceResult, hutchinson, hutchpp, trace_estimate
from flatness.spectrum.hessian import (
    BlockSpectra,
    HessianDensity,
    HessianTopK,
    HessianTrace,
    hessian_density,
    hessian_topk,
    hessian_trace,
    parameter_blocks,
)

__all__ = [
    "BlockSpectra",
    "DensityResult",
    "HessianDensity",
    "HessianTopK",
    "HessianTrace",
    "LanczosResult",
    "TraceResult",
    "hessian_density",
    "hessian_topk",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos_eigsh",
    "parameter_blocks",
    "slq_density",
    "trace_estimate",
]
