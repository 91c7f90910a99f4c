"""The model layer: a model, a loss and data bound into exact functions of a flat vector θ.

:class:`Objective` is the one objective; a backend (one process, or FSDP2 shards) is chosen from
the model. Everything else in flatness reaches models and data only through it.
"""

from flatness.objective._backend import CAPABILITIES
from flatness.objective._fd import NonSmoothWarning, NoSecondDerivativeError
from flatness.objective._loss import NonFiniteLossError
from flatness.objective._objective import Objective, check_options
from flatness.objective._params import ParamSpec
from flatness.objective._select import parameter_backend

__all__ = [
    "CAPABILITIES",
    "NoSecondDerivativeError",
    "NonFiniteLossError",
    "NonSmoothWarning",
    "Objective",
    "ParamSpec",
    "check_options",
    "parameter_backend",
]
