"""Frozen result dataclasses that serialize to JSON.

Every public measure returns a frozen dataclass: the answer first, then the evidence
(evaluations, HVPs, residuals, convergence), then the options used. ``to_dict()`` turns
tensors and arrays into nested lists so that ``json.dumps(result.to_dict())`` works.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

__all__ = ["Result", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, dataclasses and containers into JSON-ready Python objects.

    Non-finite floats become ``None`` (JSON has no NaN); dtypes and devices become strings.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class of all results: frozen, with ``to_dict()`` for JSON."""

    def to_dict(self) -> dict[str, Any]:
        """Return the result as nested plain Python objects (lists, floats, str, None)."""
        return to_jsonable(self)
