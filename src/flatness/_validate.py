"""Argument validation shared by both layers: one rule per kind of option.

Every check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad
value) whose message names the argument, the value received and what would be accepted.
Integers are Python or NumPy integers alike (never ``bool``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["check_choice", "check_int", "check_options", "check_positive", "check_seed", "is_int"]


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


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed is any Python or NumPy integer (not a bool); returns it as a Python int ≥ 0."""
    if not is_int(seed):
        raise TypeError(f"{name}: expected an int (Python or NumPy), got {seed!r}")
    if seed < 0:
        raise ValueError(f"{name}: got {seed}; expected an int >= 0")
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
        if par.kind is inspect.Parameter.KEYWORD_ONLY
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
