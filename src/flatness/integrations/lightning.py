"""A Lightning callback that records flatness measures during ``Trainer.fit``.

.. code-block:: python

    from flatness.integrations.lightning import FlatnessCallback

    callback = FlatnessCallback(F.cross_entropy, probe, every=100, measures=["loss", "top_eigenvalue"])
    best = ModelCheckpoint(monitor="flatness/loss", every_n_train_steps=100)   # or EarlyStopping
    trainer = lightning.Trainer(max_epochs=10, callbacks=[callback, best], logger=CSVLogger("logs"))
    trainer.fit(module, train_loader)
    callback.records    # the rows; also "flatness/<measure>" in every logger and trainer.callback_metrics

Needs ``pip install "flatness[lightning]"`` (the ``lightning`` package).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        'flatness.integrations.lightning needs Lightning: pip install "flatness[lightning]" '
        "(the `lightning` package)"
    ) from e

from flatness.integrations._common import build_monitor, metrics_of, optimizer_lr
from flatness.monitor import Monitor

__all__ = ["FlatnessCallback"]


class FlatnessCallback(pl.Callback):
    """Records flatness measures every ``every`` optimizer steps (or epochs) of ``Trainer.fit``.

    Each record runs a :class:`flatness.Monitor` on the ``LightningModule`` (so the measures
    see ``module(inputs)``, or ``batch_loss=``) over ``data``, and logs the row as
    ``<prefix><measure>`` to every logger of the trainer (``logger.log_metrics(...,
    step=trainer.global_step)``) and into ``trainer.callback_metrics``, where ``ModelCheckpoint``
    and ``EarlyStopping`` can monitor it (list this callback before an ``EarlyStopping`` that
    checks at the same hook; Lightning runs checkpoint callbacks last). Only the global-zero
    process measures and logs; it uses its own ``data`` in full and no collective
    (``process_group=False``), so give every rank the same probe or none; the row then reaches
    every rank's ``callback_metrics`` by one broadcast. The model, its modes and gradients, the
    optimizer and the RNG states are left exactly as they were: a run ends bit-identical to one
    without the callback.

    Args:
        loss_fn: the loss, as for every flatness function (``None`` with ``batch_loss=``).
        data: the probe the measures are computed on (a fixed list of batches is cheapest).
        every: record every ``every`` optimizer steps (``interval="step"``) or epochs.
        measures: as for :class:`flatness.Monitor`: built-in names, a mapping name → built-in
            name or ``callable(module)``, or a list of both.
        options: per-measure keyword options, as for :class:`flatness.Monitor`.
        interval: ``"step"`` (after optimizer steps ``every``, ``2·every``, ... and before
            training, at step 0) or ``"epoch"`` (at the end of every ``every``-th epoch).
        learning_rate: η for a ``two_over_lr`` = 2/η column: a number, a ``callable()``, or
            ``"auto"`` (the first optimizer's first parameter group at record time).
        warm_start: warm-start ``top_eigenvalue`` records (see :class:`flatness.Monitor`).
        prefix: prepended to every logged name.
        progress: as for :class:`flatness.Monitor`.
        **shared: the options every flatness function takes (``batch_loss``, ``batch_size``,
            ``dtype``, ``params``, ``max_batches``, ...), for every built-in measure, as for
            :class:`flatness.Monitor`.

    Attributes:
        monitor: the :class:`flatness.Monitor` (its ``records`` are also ``self.records``).

    Raises:
        ValueError, TypeError: as :class:`flatness.Monitor`, and for an unknown ``interval``.
    """

    def __init__(
        self,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 100,
        measures: Any = ("loss",),
        options: Mapping[str, Mapping[str, Any]] | None = None,
        interval: str = "step",
        learning_rate: float | Callable[[], float] | str | None = None,
        warm_start: bool = True,
        prefix: str = "flatness/",
        progress: bool | Callable[[int, int | None, dict[str, Any]], None] = False,
        **shared: Any,
    ) -> None:
        super().__init__()
        self.monitor: Monitor = build_monitor(
            loss_fn,
            data,
            every=every,
            measures=measures,
            options=options,
            interval=interval,
            learning_rate=learning_rate,
            warm_start=warm_start,
            progress=progress,
            prefix=prefix,
            shared=shared,
        )
        self.interval = interval
        self.prefix = prefix
        self._auto_lr = learning_rate == "auto"
        self._last_step: int | None = None

    @property
    def every(self) -> int:
        return self.monitor.every

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.monitor.records

    def _record(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        self._last_step = step
        metrics: dict[str, float] | None = None
        if trainer.is_global_zero:
            if self._auto_lr:
                optimizer = trainer.optimizers[0] if trainer.optimizers else None
                self.monitor.learning_rate = lambda: optimizer_lr(optimizer)
            row = self.monitor.measure(module, step=step, epoch=int(trainer.current_epoch))
            metrics = metrics_of(row, self.prefix)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        # Every rank reaches this point at the same step; the values go from rank zero to all,
        # since ModelCheckpoint and EarlyStopping read them (and agree on stopping) on every rank.
        if trainer.world_size > 1:
            metrics = trainer.strategy.broadcast(metrics, src=0)
        # What ModelCheckpoint(monitor=...), EarlyStopping(monitor=...) and LR schedulers with a
        # monitor read. Float64 0-d tensors, as Lightning keeps its metrics as tensors.
        trainer.callback_metrics.update(
            {k: torch.tensor(v, dtype=torch.float64) for k, v in (metrics or {}).items()}
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "step" and trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        # With gradient accumulation several batches end on the same optimizer step.
        if self.interval == "step" and step != self._last_step and step % self.every == 0:
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch" and (trainer.current_epoch + 1) % self.every == 0:
            self._record(trainer, pl_module)

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several callbacks can save their records."""
        return self._generate_state_key(
            every=self.every, interval=self.interval, measures=list(self.monitor.measures), prefix=self.prefix
        )

    def state_dict(self) -> dict[str, Any]:
        """The records, saved in Lightning checkpoints."""
        return {"records": [dict(r) for r in self.monitor.records]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.records[:] = [dict(r) for r in state_dict.get("records", [])]

    def __repr__(self) -> str:
        return (
            f"FlatnessCallback(every={self.every}, interval={self.interval!r}, "
            f"measures={list(self.monitor.measures)}, records={len(self.records)})"
        )
