"""What the training callbacks share: one-process options, learning rates, rows as metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flatness.monitor import Monitor

INTERVALS = ("step", "epoch")


def build_monitor(
    loss_fn: Any,
    data: Any,
    *,
    every: int,
    measures: Any,
    options: Mapping[str, Mapping[str, Any]] | None,
    interval: str,
    learning_rate: Any,
    warm_start: bool,
    progress: Any,
    prefix: str,
    shared: Mapping[str, Any],
) -> Monitor:
    """A Monitor that measures on this process alone (``process_group=False`` unless given)."""
    if interval not in INTERVALS:
        raise ValueError(f"interval: got {interval!r}; expected one of {INTERVALS}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {prefix!r}")
    if isinstance(learning_rate, str) and learning_rate != "auto":
        raise ValueError(
            f"learning_rate: got {learning_rate!r}; expected None, a number, a callable() or "
            "'auto' (the first optimizer's first parameter group)"
        )
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options: expected a mapping measure name -> dict of options, got {options!r}")
    shared = dict(shared)
    # The callbacks measure on the main process only: no collective may wait for the others.
    if "process_group" not in shared and "process_group" not in (options or {}).get("*", {}):
        shared["process_group"] = False
    return Monitor(
        loss_fn,
        data,
        every=every,
        measures=measures,
        options=options,
        learning_rate=None if learning_rate == "auto" else learning_rate,
        warm_start=warm_start,
        progress=progress,
        **shared,
    )


def optimizer_lr(optimizer: Any) -> float:
    """The learning rate of the first parameter group of ``optimizer``."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        raise ValueError("learning_rate='auto': the trainer has no optimizer with parameter groups")
    lr = groups[0]["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def metrics_of(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The row's numeric columns (all but ``step`` and ``epoch``) under ``prefix``."""
    out = {}
    for k, v in row.items():
        if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[prefix + k] = float(v)
    return out
