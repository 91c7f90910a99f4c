"""Frozen result dataclasses that serialize to JSON.

Every public measure returns a frozen dataclass: the answer first, then the evidence
(evaluations, HVPs, residuals, convergence), then the options used. ``to_dict()`` turns
tensors and arrays into nested lists so that ``json.dumps(result.to_dict())`` works;
``to_dict(max_array_size=1000)`` replaces bigger arrays (perturbations, eigenvectors,
directions of large models) by a summary of shape, dtype and norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

__all__ = ["Result", "to_jsonable"]


def _summary(value: torch.Tensor | np.ndarray) -> dict[str, Any]:
    t = torch.as_tensor(value).detach()
    norm = float(torch.linalg.vector_norm(t.double().cpu())) if t.is_floating_point() else None
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype),
        "norm": norm if norm is None or math.isfinite(norm) else None,
        "omitted": True,
    }


def to_jsonable(value: Any, *, max_array_size: int | None = None) -> Any:
    """Convert tensors, arrays, dataclasses and containers into JSON-ready Python objects.

    Non-finite floats become ``None`` (JSON has no NaN); dtypes and devices become strings.
    Tensors and arrays with more than ``max_array_size`` elements (if given) become
    ``{"shape", "dtype", "norm", "omitted": True}``.
    """

    def convert(v: Any) -> Any:
        return to_jsonable(v, max_array_size=max_array_size)

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if max_array_size is not None and size > max_array_size:
            return _summary(value)
        if isinstance(value, torch.Tensor):
            return convert(value.detach().cpu().tolist())
        return convert(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [convert(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class of all results: frozen, with ``to_dict()`` for JSON."""

    def to_dict(self, *, max_array_size: int | None = None) -> dict[str, Any]:
        """Return the result as nested plain Python objects (lists, floats, str, None).

        Args:
            max_array_size: tensors and arrays with more elements than this become a summary
                ``{"shape", "dtype", "norm", "omitted": True}`` (default: everything is kept;
                perturbations, eigenvectors and directions are parameter-sized).
        """
        if max_array_size is not None and (
            isinstance(max_array_size, bool) or not isinstance(max_array_size, int) or max_array_size < 0
        ):
            raise ValueError(f"max_array_size: got {max_array_size!r}; expected an int >= 0 or None")
        out = to_jsonable(self, max_array_size=max_array_size)
        for key in getattr(self, "_extra_keys", ()):
            out[key] = to_jsonable(getattr(self, key), max_array_size=max_array_size)
        return out
