"""flatness: how sharp or flat is a trained network's loss minimum?"""

from flatness.objective import NonFiniteLossError, Objective
from flatness.operator import HessianOperator
from flatness.spectrum import (
    hessian_density,
    hessian_topk,
    hessian_trace,
    hutchinson,
    hutchpp,
    lanczos_eigsh,
    slq_density,
)

__version__ = "0.1.0"

__all__ = [
    "HessianOperator",
    "NonFiniteLossError",
    "Objective",
    "__version__",
    "hessian_density",
    "hessian_topk",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos_eigsh",
    "slq_density",
]
