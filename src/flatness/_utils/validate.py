"""Argument validation shared by both layers: one rule per kind of option.

Every check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad
value) whose message names the argument, the value received and what would be accepted.
Integers are Python or NumPy integers alike (never ``bool``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = [
    "MAX_SEED",
    "check_choice",
    "check_int",
    "check_loss_reduction",
    "check_options",
    "check_positive",
    "check_seed",
    "declared_reduction",
    "is_int",
]


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive(name: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    """Raise a ValueError/TypeError naming ``name`` unless ``value`` is a positive number."""
    if value is None and allow_none:
        return
    ok_type = is_int(value) if integer else (is_int(value) or isinstance(value, (float, np.floating)))
    if not ok_type:
        what = "an int" if integer else "a number"
        raise TypeError(f"{name}: expected {what} > 0, got {value!r}")
    if not value > 0 or (not integer and not math.isfinite(value)):
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{name}: got {value!r}; expected {what} > 0")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an integer ≥ ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: got {value}; expected an int >= {minimum}")


#: the largest seed accepted: torch's generators take 64-bit seeds, and a few functions derive
#: further seeds as ``seed + i`` (landscape directions, Monitor records), which must still fit.
MAX_SEED = 2**63 - 1


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed is a Python or NumPy integer (not a bool) in [0, 2**63 − 1]; returned as a Python int.

    Raises:
        TypeError: ``seed`` is not an integer.
        ValueError: it is negative or above 2**63 − 1 (naming ``name``).
    """
    if not is_int(seed):
        raise TypeError(f"{name}: expected an int (Python or NumPy), got {seed!r}")
    if seed < 0 or seed > MAX_SEED:
        raise ValueError(
            f"{name}: got {seed}; expected an int in [0, 2**63 - 1] (torch's generators take 64-bit "
            "seeds); pass a smaller seed, e.g. seed % 2**63"
        )
    return int(seed)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name}: got {value!r}; expected one of {choices}")


def check_options(fn: Callable[..., Any], options: dict[str, Any], target: Callable[..., Any]) -> None:
    """Reject keyword arguments that neither ``fn`` nor ``target`` (where they are forwarded) takes.

    Public functions forward ``**options`` to the objective; without this check a typo such as
    ``epsilom=`` would surface as an error of a constructor the user never called.
    """
    accepted = [
        name
        for name, par in inspect.signature(target).parameters.items()
        if par.kind is inspect.Parameter.KEYWORD_ONLY and not name.startswith("_")  # private: internal
    ]
    unknown = [k for k in options if k not in accepted]
    if not unknown:
        return
    own = [
        name
        for name, par in inspect.signature(fn).parameters.items()
        if par.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "this function"))
    key = unknown[0]
    close = difflib.get_close_matches(key, own + accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = getattr(target, "__qualname__", "the objective").split(".")[0]
    raise TypeError(
        f"{name}() got an unexpected keyword argument {key!r}{hint}. Its own options are "
        f"{[o for o in own if o not in ('model', 'loss_fn', 'data', 'self')]}; it also forwards "
        f"{accepted} to flatness.{where}"
    )


def declared_reduction(loss_fn: Any) -> str | None:
    """The ``reduction`` a loss declares: an ``nn`` loss module's attribute, or the keyword of a
    ``functools.partial``; None for a plain function (which cannot be inspected)."""
    if isinstance(loss_fn, functools.partial):
        value = loss_fn.keywords.get("reduction")
    else:
        value = getattr(loss_fn, "reduction", None) if hasattr(loss_fn, "forward") else None
    return value if isinstance(value, str) else None


def check_loss_reduction(loss_fn: Any, reduction: str) -> None:
    """Raise a ValueError naming both when ``loss_fn`` declares another reduction than ``reduction``.

    ``reduction="mean"`` averages batch losses weighted by batch size, so each must be the batch
    *mean*; ``reduction="sum"`` adds them, so each must be the batch *sum*. A summed criterion
    (``nn.CrossEntropyLoss(reduction="sum")``) under the default ``"mean"`` would make every
    curvature about a batch size too large, silently.
    """
    declared = declared_reduction(loss_fn)
    if declared is None:
        return
    if isinstance(loss_fn, functools.partial):
        what = f"functools.partial({getattr(loss_fn.func, '__name__', 'loss')}, ...)"
    else:
        what = type(loss_fn).__name__
    if declared == "none":
        raise ValueError(
            f"loss_fn: {what} has reduction='none', so it returns per-element losses, not one "
            f"number per batch; pass a loss with reduction={reduction!r}"
        )
    kind = {"mean": "mean", "batchmean": "mean", "sum": "sum"}.get(declared)
    if kind is None:  # a reduction this check does not know
        return
    if kind != reduction:
        summed = kind == "sum"
        raise ValueError(
            f"loss_fn: {what} has reduction={declared!r} (it returns the batch "
            f"{'sum' if summed else 'mean'}), but reduction={reduction!r} here expects the batch "
            f"{'mean' if summed else 'sum'}: every loss and curvature would be off by about a batch "
            f"size. Pass reduction={kind!r} to flatness (L = the {'sum' if summed else 'mean'} over "
            f"all samples), or a loss with reduction={reduction!r}"
        )
