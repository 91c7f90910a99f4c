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

``top_eigenvalue`` records are warm-started: Lanczos starts from the previous record's top
eigenvector plus 0.3 times a seeded standard Gaussian vector (so a new top eigenvector after an
eigenvalue crossing is still found), which costs fewer Hessian-vector products than a cold
start when λ₁'s convergence is slow, and about as many otherwise (docs: "monitor").
Lightning and Hugging Face callbacks built on this class live in :mod:`flatness.integrations`.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatness.objective._guard import model_guard

__all__ = ["BUILTIN_MEASURES", "Monitor"]

Measure = Callable[[nn.Module], Any]
MeasureSpec = str | Measure | Mapping[str, "str | Measure"]
# Columns every row may carry besides the measures; no measure may take these names.
RESERVED = ("step", "time_s", "two_over_lr", "epoch")


def _loss(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> tuple[float, Any]:
    from flatness.objective import Objective

    return float(Objective(model, loss_fn, data, **options).loss()), None


def _grad_norm(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> tuple[float, Any]:
    from flatness.objective import Objective

    obj = Objective(model, loss_fn, data, **options)
    g = obj.grad()
    if obj.supports("whole_vectors"):
        return float(g.norm()), None
    return obj.space.norm64(g), None  # ‖∇L‖ over every rank: the vector is this rank's part


def _sharpness(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> tuple[float, Any]:
    from flatness.sharpness import sharpness

    res = sharpness(model, loss_fn, data, **options)
    return float(res.value), res


def _top_eigenvalue(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> tuple[float, Any]:
    from flatness.spectrum import hessian_topk

    res = hessian_topk(model, loss_fn, data, k=1, **options)
    return float(res.eigenvalues[0]), res


def _trace(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> tuple[float, Any]:
    from flatness.spectrum import hessian_trace

    res = hessian_trace(model, loss_fn, data, **options)
    return float(res.estimate), res


# name -> fn(model, loss_fn, data, options) -> (value, full result or None)
BUILTIN_MEASURES: dict[str, Callable[[nn.Module, Any, Any, dict[str, Any]], tuple[float, Any]]] = {
    "loss": _loss,
    "grad_norm": _grad_norm,
    "sharpness": _sharpness,
    "top_eigenvalue": _top_eigenvalue,
    "trace": _trace,
}

# A warm start is the previous eigenvector; hessian_topk adds v0_mix (0.3) times a seeded
# standard Gaussian vector, so every eigendirection (the new top one after a crossing
# included) starts with weight ≈ 0.3 against the previous vector's 1, and keeps the default
# basis, whose guard of 11 products finds a crossing (benchmarks/bench_monitor_warmstart.py).
# The seed of that random part changes from record to record.


def _parse_measures(measures: Any) -> dict[str, Measure | str]:
    """{column name: built-in name or callable(model)} from names, mappings or a list of both."""
    if isinstance(measures, (str, Mapping)):
        items: list[Any] = [measures]
    elif isinstance(measures, (list, tuple)):
        items = list(measures)
    else:
        raise TypeError(
            f"measures: got a {type(measures).__name__}; expected built-in names, a mapping "
            "name -> built-in name or callable(model), or a list of both"
        )
    chosen: dict[str, Measure | str] = {}

    def add(name: Any, spec: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"measures: a measure name must be a non-empty str, got {name!r}")
        if name in chosen:
            raise ValueError(f"measures: {name!r} is named twice; give each measure its own name")
        if name in RESERVED:
            raise ValueError(f"measures: {name!r} is a reserved column {RESERVED}; choose another name")
        if isinstance(spec, str):
            if spec not in BUILTIN_MEASURES:
                raise ValueError(
                    f"measures: unknown measure {spec!r}; built-ins are {sorted(BUILTIN_MEASURES)}, "
                    "or map a name to a callable(model)"
                )
        elif not callable(spec):
            raise TypeError(
                f"measures: {name!r} maps to {spec!r}; expected a built-in name "
                f"{sorted(BUILTIN_MEASURES)} or a callable(model) returning a number"
            )
        chosen[name] = spec

    for item in items:
        if isinstance(item, str):
            add(item, item)
        elif isinstance(item, Mapping):
            for name, spec in item.items():
                add(name, spec)
        else:
            raise TypeError(
                f"measures: got {item!r} in the list; expected a built-in name or a mapping "
                "name -> built-in name or callable(model)"
            )
    if not chosen:
        raise ValueError("measures: got none; name at least one measure")
    return chosen


def _shared_keywords() -> list[str]:
    """The keywords every flatness function takes: :class:`flatness.Objective`'s options."""
    from flatness.objective import Objective

    params = inspect.signature(Objective.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and not p.name.startswith("_")]


def _merge_shared(shared: dict[str, Any], star: dict[str, Any]) -> dict[str, Any]:
    """``options["*"]`` with the keywords given to the constructor (each named once)."""
    accepted = _shared_keywords()
    unknown = [k for k in shared if k not in accepted]
    if unknown:
        raise TypeError(
            f"Monitor got an unexpected keyword argument {unknown[0]!r}. Its keywords go to every "
            f"built-in measure, so it takes those every flatness function takes: {accepted}; give "
            f"an option of one measure as options={{'<measure>': {{{unknown[0]!r}: ...}}}}"
        )
    both = [k for k in shared if k in star]
    if both:
        raise ValueError(
            f"{both[0]}: given both as a keyword and in options['*']; give it once (options of "
            "one measure, options['<measure>'], still override it for that measure)"
        )
    return {**shared, **star}


def _check_learning_rate(learning_rate: Any) -> None:
    if learning_rate is None or callable(learning_rate):
        return
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not learning_rate > 0
        or learning_rate == float("inf")
    ):
        raise ValueError(
            f"learning_rate: got {learning_rate!r}; expected a positive number, a callable() -> "
            "number (for schedules) or None"
        )


Layout = tuple[tuple[str, tuple[int, ...]], ...]


def _layout(model: nn.Module, options: Mapping[str, Any]) -> Layout | None:
    """(name, shape) of the parameters a measure differentiates (``params``), or None if unknown."""
    from flatness.objective._params import select_params, unwrap

    try:
        chosen = select_params(unwrap(model), options.get("params"))
    except (TypeError, ValueError):  # the measure itself will name the problem
        return None
    return tuple((n, tuple(p.shape)) for n, p in chosen)


def _map_start(prev: tuple[Layout | None, torch.Tensor], layout: Layout | None) -> torch.Tensor | None:
    """The previous eigenvector as a start for today's parameter ``layout``, or None.

    Unchanged parameters: the vector as it is (also a sharded model's local piece). Changed ones
    (a layer unfrozen or frozen between records): each parameter's piece by name, zeros for new
    ones (the start's random part covers them); None when no piece is left or the previous
    vector is not laid out like its parameters (a sharded model), i.e. a cold start.
    """
    old, vector = prev
    if old is None or layout is None:
        return None
    if old == layout:
        return vector
    sizes = [math.prod(s) for _, s in old]
    if sum(sizes) != vector.numel():
        return None
    pieces = dict(zip([n for n, _ in old], torch.split(vector, sizes), strict=True))
    shapes = dict(old)
    out = [pieces[n] if n in pieces and shapes[n] == s else vector.new_zeros(math.prod(s)) for n, s in layout]
    start = torch.cat(out)
    return start if bool(start.any()) else None


class Monitor:
    """Records chosen measures every ``every`` steps into a list of rows (JSON / CSV).

    Each row is ``{"step", <measures>, "time_s"}`` (plus ``"two_over_lr"`` with a learning
    rate): 2/η beside λ₁ shows the edge of stability of gradient descent with step size η (Cohen
    et al. 2021, arXiv 2103.00065). Cost per record: that of each measure's function (e.g.
    :func:`flatness.hessian_topk` for ``top_eigenvalue``, warm-started from the previous record's
    eigenvector); nothing between records. The model is left as it was.

    Args:
        loss_fn: the loss, as for every flatness function (``None`` with ``batch_loss=``).
        data: the data the measures are computed on (a fixed list of batches is cheapest).
        every: record when the step counter is a multiple of ``every``.
        measures: built-in names (``"loss"``, ``"grad_norm"``, ``"sharpness"``,
            ``"top_eigenvalue"``, ``"trace"``), a mapping column name → built-in name or
            ``callable(model)`` returning a number, or a list mixing both, e.g.
            ``["loss", {"weight_norm": fn}]``. A ``trace`` column comes with its standard error
            as ``<name>_std_error``.
        options: per column name, keyword options for its function, e.g.
            ``{"trace": {"n_hvp": 30}}``; the key ``"*"`` applies to all built-ins.
        learning_rate: η, a number or a ``callable() -> number`` read at each record; each row
            then holds ``two_over_lr`` = 2/η (no such column where η = 0).
        warm_start: start each ``top_eigenvalue`` record from the previous record's eigenvector
            (mapped by parameter name) plus 0.3 times a seeded Gaussian (``v0_mix``); cold
            starts when False, or when ``options`` give ``v0``.
        progress: ``True`` prints a line per record to stderr; a callable receives
            ``(number of records, None, row)`` after each record.
        **shared: options of :class:`flatness.Objective` (``batch_loss``, ``dtype``, ``params``,
            ``max_batches``, ...) for every built-in measure, as ``options={"*": {...}}``;
            options of one measure still override them for it.

    Attributes:
        records: the rows, oldest first.
        last_results: the full result of the latest record of each built-in measure that has
            one (``sharpness``, ``top_eigenvalue``, ``trace``), e.g. ``n_matvec`` and residuals.

    Raises:
        ValueError, TypeError: unknown measure names, a name given twice, ``every`` < 1, empty
            ``measures``, ``options`` keys naming no measure, a bad ``learning_rate``, a keyword
            not every function takes, or one given both as a keyword and in ``options["*"]``.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> monitor = flatness.Monitor(loss_fn, data, every=2, measures=["loss", "top_eigenvalue"])
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(4):
        ...     _ = monitor.step(model)
        ...     opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
        >>> [r["step"] for r in monitor.records], sorted(monitor.records[0])
        ([0, 2], ['loss', 'step', 'time_s', 'top_eigenvalue'])
    """

    def __init__(
        self,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 100,
        measures: MeasureSpec | Sequence[MeasureSpec] = ("loss",),
        options: Mapping[str, Mapping[str, Any]] | None = None,
        learning_rate: float | Callable[[], float] | None = None,
        warm_start: bool = True,
        progress: bool | Callable[[int, int | None, dict[str, Any]], None] = False,
        **shared: Any,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: got {every!r}; expected an int >= 1")
        chosen = _parse_measures(measures)
        if not isinstance(options, (Mapping, type(None))):
            raise TypeError(f"options: expected a mapping measure name -> dict of options, got {options!r}")
        options = {k: dict(v) for k, v in (options or {}).items()}
        if shared:
            options["*"] = _merge_shared(shared, options.get("*", {}))
        unknown = [k for k in options if k != "*" and k not in chosen]
        if unknown:
            raise ValueError(f"options: keys {unknown} name no chosen measure; chosen are {list(chosen)}")
        clash = [f"{n}_std_error" for n, f in chosen.items() if f == "trace" and f"{n}_std_error" in chosen]
        if clash:
            raise ValueError(f"measures: {clash[0]!r} is the column of a trace's standard error; rename it")
        custom_options = [k for k in options if k != "*" and not isinstance(chosen[k], str)]
        if custom_options:
            raise ValueError(
                f"options: {custom_options} are custom measures (callables); they take no options"
            )
        _check_learning_rate(learning_rate)
        if not isinstance(warm_start, bool):
            raise TypeError(f"warm_start: expected a bool, got {warm_start!r}")
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress: expected a bool or a callable(step, total, info), got {progress!r}")
        self.loss_fn = loss_fn
        self.data = data
        self.every = every
        self.measures = chosen
        self.options = options
        self.learning_rate = learning_rate
        self.warm_start = warm_start
        self.progress = progress
        self.records: list[dict[str, Any]] = []
        self.last_results: dict[str, Any] = {}
        self._step = 0
        # per top_eigenvalue column: (parameter layout, eigenvector) of the latest record
        self._v0: dict[str, tuple[Layout | None, torch.Tensor]] = {}

    def _options_for(self, name: str) -> dict[str, Any]:
        return {**self.options.get("*", {}), **self.options.get(name, {})}

    def _warm_options(self, name: str, options: dict[str, Any], layout: Layout | None) -> dict[str, Any]:
        """``options`` with ``v0`` = the previous eigenvector (mapped to today's parameters) and a
        seed for its random part (``v0_mix``) that changes from record to record."""
        prev = self._v0.get(name)
        if not self.warm_start or prev is None or "v0" in options:
            return options
        v0 = _map_start(prev, layout)
        if v0 is None:  # nothing of the previous vector fits today's parameters: a cold start
            return options
        return {**options, "v0": v0, "seed": int(options.get("seed", 0)) + len(self.records)}

    def _learning_rate(self) -> float:
        lr = self.learning_rate() if callable(self.learning_rate) else self.learning_rate
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"learning_rate: the callable returned {lr!r}; expected a number >= 0")
        return float(lr)

    def measure(self, model: nn.Module, *, step: int | None = None, **extra: Any) -> dict[str, Any]:
        """Compute every measure now and append a row ``{"step", <extra>, <measures>, "time_s"}``.

        Args:
            model: the model to measure (left untouched).
            step: the row's step (default: the monitor's own step counter).
            **extra: further columns for the row, e.g. ``epoch=3``.

        Returns:
            The row.
        """
        row: dict[str, Any] = {"step": self._step if step is None else int(step), **extra}
        if self.learning_rate is not None:
            lr = self._learning_rate()
            if lr > 0:  # at η = 0 (a schedule's last step) 2/η is infinite: no column
                row["two_over_lr"] = 2.0 / lr
        t0 = time.perf_counter()
        with model_guard(model):
            for name, fn in self.measures.items():
                if isinstance(fn, str):
                    options = self._options_for(name)
                    if fn == "top_eigenvalue":
                        layout = _layout(model, options)
                        options = self._warm_options(name, options, layout)
                    value, result = BUILTIN_MEASURES[fn](model, self.loss_fn, self.data, options)
                    row[name] = value
                    if fn == "trace":  # an estimate: its standard error beside it
                        row[f"{name}_std_error"] = float(result.std_error)
                    if result is not None:
                        self.last_results[name] = result
                    if fn == "top_eigenvalue":
                        self._v0[name] = (layout, result.eigenvectors[0].detach().clone())
                else:
                    value = fn(model)
                    if isinstance(value, torch.Tensor):
                        value = value.detach()
                    row[name] = float(value) if isinstance(value, (int, float, torch.Tensor)) else value
        row["time_s"] = time.perf_counter() - t0
        self.records.append(row)
        self._report(row)
        return row

    def _report(self, row: dict[str, Any]) -> None:
        if self.progress is False:
            return
        if self.progress is not True:
            self.progress(len(self.records), None, dict(row))
            return
        cells = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "step"
        )
        print(f"monitor: record {len(self.records)} step {row['step']}: {cells}", file=sys.stderr)

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

    def plot(self, measures: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The records over steps: :func:`flatness.plot.plot_monitor` (needs ``[plot]``)."""
        from flatness.plot import plot_monitor

        return plot_monitor(self, measures=measures, **kwargs)

    def __repr__(self) -> str:
        return f"Monitor(every={self.every}, measures={list(self.measures)}, records={len(self.records)})"
