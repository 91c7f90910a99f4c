"""Record flatness measures every N steps of a plain PyTorch training loop, with one line.

.. code-block:: python

    monitor = Monitor(loss_fn, eval_data, every=100, measures=["loss", "top_eigenvalue"])
    for step, (x, y) in enumerate(loader):
        ...                     # forward, backward, optimizer.step() as usual
        monitor.step(model)     # records at steps 0, 100, 200, ...
    monitor.to_csv("curvature.csv")

Every measure runs through flatness's model-level functions, which never write the model's
parameters, buffers, flags, gradients or modes and restore the global RNG states. The optimizer is
never seen. So a run with the monitor ends with bit-identical weights to a run without it.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatness._guard import model_guard

__all__ = ["BUILTIN_MEASURES", "Monitor"]

Measure = Callable[[nn.Module], Any]


def _loss(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> float:
    from flatness.objective import Objective

    return float(Objective(model, loss_fn, data, **options).loss())


def _grad_norm(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> float:
    from flatness.objective import Objective

    return float(Objective(model, loss_fn, data, **options).grad().norm())


def _sharpness(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> float:
    from flatness import sharpness

    return float(sharpness(model, loss_fn, data, **options).value)


def _top_eigenvalue(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> float:
    from flatness import hessian_topk

    return float(hessian_topk(model, loss_fn, data, k=1, **options).eigenvalues[0])


def _trace(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> float:
    from flatness import hessian_trace

    return float(hessian_trace(model, loss_fn, data, **options).estimate)


BUILTIN_MEASURES: dict[str, Callable[[nn.Module, Any, Any, dict[str, Any]], float]] = {
    "loss": _loss,
    "grad_norm": _grad_norm,
    "sharpness": _sharpness,
    "top_eigenvalue": _top_eigenvalue,
    "trace": _trace,
}


class Monitor:
    """Records chosen measures every ``every`` steps into a list of rows (JSON / CSV).

    Args:
        loss_fn: the loss, as for every flatness function (``None`` with ``batch_loss`` in
            ``options``).
        data: the data the measures are computed on (a held-out or training subset; a fixed
            list of batches is cheapest).
        every: record when the step counter is a multiple of ``every``.
        measures: names of built-in measures (``"loss"``, ``"grad_norm"``, ``"sharpness"``,
            ``"top_eigenvalue"``, ``"trace"``) and/or a mapping name → ``callable(model)``
            returning a number.
        options: per built-in measure, keyword options for its function, e.g.
            ``{"sharpness": {"epsilon": 5e-4}, "trace": {"n_hvp": 30}}``; the key ``"*"``
            applies to all (e.g. ``{"*": {"max_batches": 4}}``).

    Raises:
        ValueError: unknown measure names, ``every`` < 1, empty ``measures``.
    """

    def __init__(
        self,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 100,
        measures: Sequence[str] | Mapping[str, Measure] = ("loss",),
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: got {every!r}; expected an int >= 1")
        if isinstance(measures, str):
            measures = [measures]
        chosen: dict[str, Measure | str] = {}
        if isinstance(measures, Mapping):
            for name, fn in measures.items():
                if not callable(fn):
                    raise TypeError(f"measures: {name!r} maps to {fn!r}; expected a callable(model)")
                chosen[str(name)] = fn
        else:
            for name in measures:
                if name not in BUILTIN_MEASURES:
                    raise ValueError(
                        f"measures: unknown measure {name!r}; built-ins are {sorted(BUILTIN_MEASURES)}, "
                        "or pass a mapping name -> callable(model)"
                    )
                chosen[name] = name
        if not chosen:
            raise ValueError("measures: got none; name at least one measure")
        options = dict(options or {})
        unknown = [k for k in options if k != "*" and k not in chosen]
        if unknown:
            raise ValueError(f"options: keys {unknown} name no chosen measure; chosen are {list(chosen)}")
        self.loss_fn = loss_fn
        self.data = data
        self.every = every
        self.measures = chosen
        self.options = options
        self.records: list[dict[str, Any]] = []
        self._step = 0

    def _options_for(self, name: str) -> dict[str, Any]:
        return {**self.options.get("*", {}), **self.options.get(name, {})}

    def measure(self, model: nn.Module, *, step: int | None = None) -> dict[str, Any]:
        """Compute every measure now and append a row ``{"step", "time_s", <measures>}``."""
        row: dict[str, Any] = {"step": self._step if step is None else step}
        t0 = time.perf_counter()
        with model_guard(model):
            for name, fn in self.measures.items():
                if isinstance(fn, str):
                    row[name] = BUILTIN_MEASURES[fn](model, self.loss_fn, self.data, self._options_for(name))
                else:
                    value = fn(model)
                    if isinstance(value, torch.Tensor):
                        value = value.detach()
                    row[name] = float(value) if isinstance(value, (int, float, torch.Tensor)) else value
        row["time_s"] = time.perf_counter() - t0
        self.records.append(row)
        return row

    def step(self, model: nn.Module) -> dict[str, Any] | None:
        """Call once per training step; measures when the step is a multiple of ``every``."""
        row = self.measure(model) if self._step % self.every == 0 else None
        self._step += 1
        return row

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.records, indent=1))

    def to_csv(self, path: str | Path) -> None:
        keys: list[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.records)

    def __repr__(self) -> str:
        return f"Monitor(every={self.every}, measures={list(self.measures)}, records={len(self.records)})"
