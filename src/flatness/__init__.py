"""flatness: how sharp or flat is a trained network's loss minimum?"""

from flatness.monitor import Monitor
from flatness.objective import NonFiniteLossError, Objective
from flatness.operator import HessianOperator

__version__ = "0.1.0"

__all__ = ["HessianOperator", "Monitor", "NonFiniteLossError", "Objective", "__version__"]
