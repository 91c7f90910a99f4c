"""The model layer: a model, a loss and data bound into exact functions of a flat vector θ.

:class:`Objective` is the one objective; a backend (one process, or FSDP2 shards) is chosen from
the model. Everything else in flatness reaches models and data only through it.
"""

from flatness.objective._fd import NonSmoothWarning, NoSecondDerivativeError
from flatness.objective._objective import NonFiniteLossError, Objective, check_options
from flatness.objective._params import ParamSpec

__all__ = [
    "NoSecondDerivativeError",
    "NonFiniteLossError",
    "NonSmoothWarning",
    "Objective",
    "ParamSpec",
    "check_options",
]
