"""The numerical layer: algorithms on any symmetric linear operator or function of a flat vector.

Nothing here knows about models, losses or data: an operator is anything
:func:`as_operator` accepts (an object with ``matvec`` / ``shape`` / ``dtype`` / ``device``, a
square tensor or array, a scipy ``LinearOperator``, or a callable with its size), and the
maximizers take ``f_and_grad(x)`` of a NumPy vector. The model layer
(:mod:`flatness.operators`, :mod:`flatness.spectrum`, :mod:`flatness.sharpness`) builds such
operators and functions from ``(model, loss_fn, data)`` and calls these.

- :mod:`~flatness.algorithms.lanczos` — thick-restart Lanczos eigensolver and the Lanczos
  tridiagonalization, sharing one Lanczos step;
- :mod:`~flatness.algorithms.trace` — Hutchinson and Hutch++ trace estimators;
- :mod:`~flatness.algorithms.density` — stochastic Lanczos quadrature;
- :mod:`~flatness.algorithms.maximize` — box (L-BFGS-B) and ball maximizers, and the vertex
  search (and the curvature vertex) that starts the box maximizer;
- :mod:`~flatness.algorithms._linalg` — the operator protocol and :class:`VectorSpace`, the one
  place where vectors are combined (dot products, norms, random vectors).
"""

from flatness.algorithms._linalg import LinearOperator, Operator, VectorSpace, as_operator
from flatness.algorithms.density import DensityResult, slq_density
from flatness.algorithms.lanczos import LanczosResult, lanczos_eigsh, lanczos_step, lanczos_tridiagonal
from flatness.algorithms.maximize import (
    MaximizeResult,
    curvature_vertex,
    maximize_ball,
    maximize_box,
    vertex_search,
)
from flatness.algorithms.trace import TraceResult, hutchinson, hutchpp, trace_estimate

__all__ = [
    "DensityResult",
    "LanczosResult",
    "LinearOperator",
    "MaximizeResult",
    "Operator",
    "TraceResult",
    "VectorSpace",
    "as_operator",
    "curvature_vertex",
    "hutchinson",
    "hutchpp",
    "lanczos_eigsh",
    "lanczos_step",
    "lanczos_tridiagonal",
    "maximize_ball",
    "maximize_box",
    "slq_density",
    "trace_estimate",
    "vertex_search",
]
