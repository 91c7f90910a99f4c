"""Hugging Face ``Trainer`` callback and token-weighted language-model losses.

.. code-block:: python

    from flatness.integrations.huggingface import FlatnessTrainerCallback, lm_loss

    probe = [collator([train[i] for i in range(16)])]          # one fixed dict batch
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    FlatnessTrainerCallback(
        None, probe, every=50, measures=["loss", "top_eigenvalue"], **lm_loss("causal")
    ).attach(trainer)
    trainer.train()     # "flatness/<measure>" beside the Trainer's own rows: log_history, report_to

    hessian_topk(model, None, probe, **lm_loss("causal"))       # any flatness function

Needs ``pip install "flatness[hf]"`` (``transformers`` and ``accelerate``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        'flatness.integrations.huggingface needs transformers: pip install "flatness[hf]" '
        "(the `transformers` and `accelerate` packages)"
    ) from e

from flatness.integrations._common import build_monitor, metrics_of, optimizer_lr
from flatness.monitor import Monitor

__all__ = ["FlatnessTrainerCallback", "lm_loss"]

KINDS = ("causal", "masked")


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2:
        raise TypeError(
            "lm_loss: the model's output has no logits tensor (expected an output with .logits, a "
            f"tuple starting with the logits, or a tensor); got {type(output).__name__}"
        )
    return logits


def lm_loss(
    kind: str = "causal", *, label_key: str = "labels", ignore_index: int = -100
) -> dict[str, Callable[..., Any]]:
    """A language-model batch loss and its weight, the number of predicted tokens.

    .. math::
        \\ell_b = \\frac{1}{n_b}\\sum_{t \\in P_b} -\\log p_\\theta(y_t \\mid \\text{batch } b),
        \\qquad m_b = n_b = |P_b|,
        \\qquad L = \\frac{\\sum_b m_b \\ell_b}{\\sum_b m_b}
        = \\frac{1}{\\sum_b n_b}\\sum_b\\sum_{t \\in P_b} -\\log p_\\theta(y_t)

    where :math:`P_b` are the predicted positions of batch b: labels ≠ ``ignore_index``, after
    the causal shift (logits at position t predict the label at t + 1) for ``kind="causal"``,
    unshifted for ``kind="masked"``. Weighting each batch by :math:`n_b` makes flatness's
    full-data loss the token mean over the whole dataset whatever the padding, as the
    ``Trainer`` weights tokens across accumulated batches; weighting by sequences
    (the default for dict batches) would give batches with more padding too much weight.

    The batch loss states its split into the model's outputs (the shifted logits, one row per
    position) and ``nn.CrossEntropyLoss(ignore_index=...)``, so the same one line serves every
    curvature: the Hessian, the GGN, the Fisher (categorical likelihood, inferred) and the
    empirical Fisher (per sequence, each weighted by its number of predicted tokens; see
    docs/operators.md) of the token-mean loss.

    Args:
        kind: ``"causal"`` (GPT-style, labels = input ids) or ``"masked"`` (BERT-style).
        label_key: the labels' key in the dict batches; every other key is passed to the
            model as a keyword argument.
        ignore_index: the label of positions not predicted (padding, unmasked tokens).

    Returns:
        ``{"batch_loss": f(model, batch), "batch_size": g(batch)}``, keyword arguments for any
        flatness function (``hessian_topk(model, None, data, curvature="ggn", **lm_loss())``) or
        ``Monitor(None, data, options={"*": lm_loss()})``.

    Raises:
        ValueError: an unknown ``kind``. The returned functions raise ``TypeError`` for a batch
            that is not a dict with ``label_key`` and ``ValueError`` for one with no predicted token.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: got {kind!r}; expected one of {KINDS}")
    if not isinstance(label_key, str):
        raise TypeError(f"label_key: expected a str, got {label_key!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    shift = kind == "causal"
    loss_fn = nn.CrossEntropyLoss(ignore_index=ignore_index)

    def labels_of(batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping) or label_key not in batch:
            keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise TypeError(f"lm_loss: expected dict batches with a {label_key!r} key, got {keys}")
        labels = batch[label_key]
        return labels[..., 1:] if shift else labels

    def batch_outputs(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels_of(batch)
        inputs = {k: v for k, v in batch.items() if k != label_key}
        logits = _logits(model(**inputs))
        if shift:
            logits = logits[..., :-1, :]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # as transformers' own losses: the softmax in float32
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)

    def batch_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return loss_fn(*batch_outputs(model, batch))

    def per_row(batch: Mapping[str, Any]) -> torch.Tensor:
        """The number of predicted tokens of each row (sequence) of a batch."""
        labels = labels_of(batch)
        return (labels != ignore_index).reshape(labels.shape[0], -1).sum(1)

    def batch_size(batch: Mapping[str, Any]) -> int:
        n = int((labels_of(batch) != ignore_index).sum())
        if n == 0:
            after = " after the causal shift" if shift else ""
            raise ValueError(
                f"lm_loss: a batch has no predicted token (every {label_key!r} is {ignore_index}"
                f"{after}); remove it from the data"
            )
        return n

    batch_loss.__qualname__ = f"lm_loss({kind!r}).batch_loss"
    batch_outputs.__qualname__ = f"lm_loss({kind!r}).batch_outputs"
    batch_size.__qualname__ = f"lm_loss({kind!r}).batch_size"
    # The split the GGN and the Fisher need (flatness.Objective reads it), and the per-row
    # sizes the empirical Fisher weights its per-sequence gradients with.
    batch_loss.split = (batch_outputs, loss_fn)  # type: ignore[attr-defined]
    batch_size.per_row = per_row  # type: ignore[attr-defined]
    return {"batch_loss": batch_loss, "batch_size": batch_size}


class FlatnessTrainerCallback(transformers.TrainerCallback):
    """Records flatness measures every ``every`` optimizer steps (or epochs) of ``Trainer.train``.

    Each record runs a :class:`flatness.Monitor` on the model the ``Trainer`` trains over
    ``data`` and logs the row as ``<prefix><measure>`` through ``Trainer.log``: into
    ``trainer.state.log_history`` and every ``report_to`` integration (TensorBoard, W&B, ...).
    Register it with :meth:`attach` so that it can reach ``Trainer.log``; passed only in
    ``Trainer(callbacks=[...])`` its rows go to ``state.log_history`` alone. Either way it logs
    beside the Trainer, never instead of it: the Trainer's own rows (``loss``, ``grad_norm``,
    ``learning_rate``, ``train_loss``) are those of a run without the callback. Only the world
    process zero measures and logs, on its own ``data`` in full with no collective
    (``process_group=False``). The model, its modes and gradients, the optimizer and the RNG
    states are left exactly as they were: a run ends bit-identical to one without the callback.

    Args:
        loss_fn: the loss, as for every flatness function; ``None`` with
            ``**lm_loss("causal")`` (or another ``batch_loss=``) for dict batches.
        data: the probe the measures are computed on, e.g. a list of collated dict batches.
        every: record every ``every`` optimizer steps (``interval="step"``) or epochs.
        measures: as for :class:`flatness.Monitor`.
        options: per-measure keyword options, as for :class:`flatness.Monitor`.
        interval: ``"step"`` (after optimizer steps ``every``, ``2·every``, ... and before
            training, at step 0) or ``"epoch"`` (at the end of every ``every``-th epoch).
        learning_rate: η for a ``two_over_lr`` = 2/η column: a number, a ``callable()``, or
            ``"auto"`` (the optimizer's first parameter group at record time).
        warm_start: warm-start ``top_eigenvalue`` records (see :class:`flatness.Monitor`).
        prefix: prepended to every logged name.
        progress: as for :class:`flatness.Monitor`.
        **shared: the options every flatness function takes (``batch_loss``, ``batch_size``,
            ``dtype``, ``params``, ``max_batches``, ...), for every built-in measure, as for
            :class:`flatness.Monitor`.

    Attributes:
        monitor: the :class:`flatness.Monitor` (its ``records`` are also ``self.records``).
        trainer: the ``Trainer`` it logs through (set by :meth:`attach`), or None.

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
        self.trainer: Any = None
        self._auto_lr = learning_rate == "auto"
        self._last_step: int | None = None
        self._warned = False

    @property
    def every(self) -> int:
        return self.monitor.every

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.monitor.records

    def attach(self, trainer: Any) -> FlatnessTrainerCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log``; returns self."""
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"trainer: expected a transformers.Trainer, got {type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _record(self, state: Any, control: Any, model: nn.Module | None, optimizer: Any) -> None:
        step = int(state.global_step)
        self._last_step = step
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("FlatnessTrainerCallback: the Trainer passed no model to the callback")
        if self._auto_lr:
            self.monitor.learning_rate = lambda: optimizer_lr(optimizer)
        epoch = {} if state.epoch is None else {"epoch": float(state.epoch)}
        row = self.monitor.measure(model, step=step, **epoch)
        metrics = metrics_of(row, self.prefix)
        if self.trainer is not None:
            # Trainer.log (log_history, report_to integrations, the progress printer) ends in
            # CallbackHandler.on_log, which clears control.should_log: called from on_step_end or
            # on_epoch_end, it would make the Trainer skip its own loss row at this step (and
            # average the next one over more steps). The flag is put back as the Trainer set it.
            should_log = self.trainer.control.should_log
            self.trainer.log(metrics)
            self.trainer.control.should_log = should_log
            if control is not None:  # the same object as trainer.control inside Trainer.train
                control.should_log = should_log
        else:
            state.log_history.append({**metrics, **epoch, "step": step})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.trainer is None and not self._warned and state.is_world_process_zero:
            reporters = [r for r in (args.report_to or []) if r != "none"]
            if reporters:
                warnings.warn(
                    "FlatnessTrainerCallback: not attached to the Trainer, so its values go to "
                    f"trainer.state.log_history only, not to {reporters}; register it with "
                    "FlatnessTrainerCallback(...).attach(trainer)",
                    UserWarning,
                    stacklevel=2,
                )
            self._warned = True
        if self.interval == "step" and state.global_step % self.every == 0:
            self._record(state, control, model, kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = int(state.global_step)
        if self.interval == "step" and step != self._last_step and step % self.every == 0:
            self._record(state, control, model, kwargs.get("optimizer"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # state.epoch is the progress in epochs: 2.0 after the second, 2.5 after a partial third.
        epoch = math.ceil((state.epoch or 0.0) - 1e-6)
        if self.interval == "epoch" and epoch > 0 and epoch % self.every == 0:
            self._record(state, control, model, kwargs.get("optimizer"))

    def __repr__(self) -> str:
        return (
            f"FlatnessTrainerCallback(every={self.every}, interval={self.interval!r}, "
            f"measures={list(self.monitor.measures)}, records={len(self.records)})"
        )
