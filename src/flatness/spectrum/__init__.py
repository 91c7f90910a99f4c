"""Hessian spectra: eigensolver, trace and density on any symmetric operator, and on models.

The numerical layer (:func:`lanczos_eigsh`, :func:`hutchinson`, :func:`hutchpp`,
:func:`slq_density`) takes ``matvec(v) -> H v`` and a size n; the model-level functions
(:func:`hessian_topk`, :func:`hessian_trace`, :func:`hessian_density`) build the objective's
Hessian-vector product and call them.
"""

from flatness.spectrum.density import DensityResult, slq_density
from flatness.spectrum.hessian import (
    HessianDensity,
    HessianTopK,
    HessianTrace,
    hessian_density,
    hessian_topk,
    hessian_trace,
)
from flatness.spectrum.lanczos import LanczosResult, lanczos_eigsh
from flatness.spectrum.trace import TraceResult, hutchinson, hutchpp, trace_estimate

__all__ = [
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
    "slq_density",
    "trace_estimate",
]
