"""Frozen result dataclasses that serialize to JSON.

Every public measure returns a frozen dataclass: the answer first, then the evidence
(evaluations, HVPs, residuals, convergence), then the options used. ``to_dict()`` turns
tensors and arrays into nested lists so that ``json.dumps(result.to_dict())`` works;
``to_dict(max_array_size=1000)`` replaces bigger arrays (perturbations, eigenvectors,
directions of large models) by a summary of shape, dtype and norm. ``repr`` stays short
whatever the model's size: arrays and tensors of more than 8 numbers are summarized by shape,
dtype and range, long containers and nested results are cut (every field is still there in
full, and in ``to_dict()``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["DeprecatedAlias", "MatvecCount", "Result", "to_jsonable"]


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


# repr limits: numbers shown of an array (beyond: a summary), items of a container (by depth),
# fields of a nested result, characters of any other value.
_REPR_NUMBERS = 8
_REPR_ITEMS = (8, 6, 3)
_REPR_NESTED_FIELDS = 2
_REPR_CHARS = 120


def _array_summary(value: torch.Tensor | np.ndarray) -> str:
    """``tensor(shape=(1000,), dtype=float64, min=-0.1, max=3.2)``: no number printed one by one."""
    is_tensor = isinstance(value, torch.Tensor)
    t = value.detach() if is_tensor else torch.as_tensor(np.asarray(value))
    dtype = str(t.dtype).removeprefix("torch.") if is_tensor else str(np.asarray(value).dtype)
    parts = [f"shape={tuple(t.shape)}", f"dtype={dtype}"]
    if is_tensor and t.device.type != "cpu":
        parts.append(f"device={t.device}")
    if t.dtype == torch.bool:
        parts.append(f"{int(t.sum())} true")
    elif t.numel() and not t.is_complex():
        finite = t[torch.isfinite(t)] if t.is_floating_point() else t
        if finite.numel():
            parts += [f"min={float(finite.min()):.4g}", f"max={float(finite.max()):.4g}"]
        if finite.numel() < t.numel():
            parts.append(f"{t.numel() - finite.numel()} non-finite")
    return f"{'tensor' if is_tensor else 'array'}({', '.join(parts)})"


def _short(value: Any, depth: int) -> str:
    """A bounded repr of ``value`` (a field at nesting ``depth`` ≥ 1)."""
    items = _REPR_ITEMS[min(depth, len(_REPR_ITEMS) - 1)]
    if isinstance(value, Result):
        return value._repr(depth)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if size > _REPR_NUMBERS:
            return _array_summary(value)
        text = repr(value.detach() if isinstance(value, torch.Tensor) else value)
        return " ".join(text.split())
    if isinstance(value, Mapping):
        shown = [f"{_short(k, depth + 1)}: {_short(v, depth + 1)}" for k, v in list(value.items())[:items]]
        more = len(value) - len(shown)
        return "{" + ", ".join(shown + ([f"… (+{more} more)"] if more else [])) + "}"
    if isinstance(value, (list, tuple)):
        shown = [_short(v, depth + 1) for v in value[:items]]
        more = len(value) - len(shown)
        body = ", ".join(shown + ([f"… (+{more} more)"] if more else []))
        if isinstance(value, tuple):
            return f"({body},)" if len(value) == 1 else f"({body})"
        return f"[{body}]"
    text = repr(value)
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 1] + "…"


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class of all results: frozen, with ``to_dict()`` for JSON and a short ``repr``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # @dataclass writes a __repr__ printing every array in full unless the class body
        # defines one: give each subclass the short one before the decorator runs.
        super().__init_subclass__(**kwargs)
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = Result.__repr__  # type: ignore[method-assign]

    def _repr(self, depth: int = 0) -> str:
        fields = [f for f in dataclasses.fields(self) if f.repr]
        if depth > 0 and len(fields) > _REPR_NESTED_FIELDS:  # a result inside a result
            shown = [
                f"{f.name}={_short(getattr(self, f.name), depth + 1)}" for f in fields[:_REPR_NESTED_FIELDS]
            ]
            return f"{type(self).__name__}({', '.join(shown)}, …)"
        shown = [f"{f.name}={_short(getattr(self, f.name), depth + 1)}" for f in fields]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __repr__(self) -> str:
        """The fields, with arrays summarized and long containers cut (a few thousand characters at most)."""
        return self._repr()

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
        return to_jsonable(self, max_array_size=max_array_size)


class DeprecatedAlias:
    """A read-only attribute kept under an old name: returns ``new`` with a ``DeprecationWarning``.

    Not a dataclass field, so it is in neither ``to_dict()`` nor ``repr``.

    Args:
        new: the attribute's current name.
        removal: when the old name goes (said in the warning).
    """

    def __init__(self, new: str, removal: str = "in the next release") -> None:
        self.new = new
        self.removal = removal
        self.old = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.old = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        warnings.warn(
            f"{type(obj).__name__}.{self.old} is deprecated and will be removed {self.removal}; "
            f"use .{self.new} (the same number)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(obj, self.new)


class MatvecCount:
    """Mixin of everything that counts matrix-vector products in ``n_matvec``.

    ``n_hvp``, the count's former name on the spectrum results, :class:`flatness.BlockSpectra`
    and :class:`flatness.HessianOperator`, is a deprecated alias of ``n_matvec``.
    """

    n_hvp = DeprecatedAlias("n_matvec")
