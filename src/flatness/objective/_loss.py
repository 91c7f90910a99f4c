"""One batch's loss as a module: the user's model and loss function bound together.

:class:`LossModule` is what every backend calls on a batch (``functional_call`` swaps θ into
it, or FSDP runs it as it is); ``scalar_loss`` checks that a batch loss is one number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "BatchLoss",
    "BatchOutputs",
    "LossFn",
    "LossModule",
    "NonFiniteLossError",
    "math_attention",
    "scalar_loss",
]

LossFn = Callable[[Any, Any], torch.Tensor]
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]
BatchOutputs = Callable[[nn.Module, Any], tuple[Any, Any]]


class NonFiniteLossError(ValueError):
    """The loss (or its derivative) is NaN or infinite on some batch.

    Attributes:
        best: where the sharpness measures met a non-finite loss at a perturbed point (not at
            θ), their result at the best finite point found before it (its ``value`` is a
            lower bound of the measure); otherwise None.

    Examples:
        >>> import torch, flatness
        >>> model = torch.nn.Linear(2, 1)
        >>> data = [(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 1))]
        >>> try:
        ...     flatness.Objective(model, torch.nn.functional.mse_loss, data).loss()
        ... except flatness.NonFiniteLossError as e:
        ...     print(str(e)[:30])
        the loss is nan on batch 0 (of
    """

    def __init__(self, message: str, *, best: Any = None) -> None:
        super().__init__(message)
        self.best = best


_NEEDS_OUTPUTS = (
    "batch_loss: {what} needs the model's outputs separately from the loss (it is built on the "
    "Hessian of the loss with respect to the outputs, or on per-sample losses), which an opaque "
    "batch_loss(model, batch) does not expose. Pass batch_outputs=lambda model, batch: "
    "(outputs, targets) together with loss_fn(outputs, targets) instead of batch_loss"
)


class LossModule(nn.Module):
    """Wraps ``model`` so that one ``functional_call`` computes one batch's loss.

    The loss of a batch is ``loss_fn(outputs, targets)`` with ``(outputs, targets)`` from
    :meth:`outputs` — ``model(inputs)`` for ``(inputs, targets)`` batches, or the user's
    ``batch_outputs(model, batch)`` — unless an opaque ``batch_loss(model, batch)`` is given.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        batch_loss: BatchLoss | None,
        batch_outputs: BatchOutputs | None = None,
    ):
        super().__init__()
        # A batch_loss that states its own split (``batch_loss.split = (batch_outputs, loss_fn)``,
        # as lm_loss's does) is that pair: the GGN and the Fisher can use it too.
        split = getattr(batch_loss, "split", None)
        if split is not None and loss_fn is None and batch_outputs is None:
            (batch_outputs, loss_fn), batch_loss = split, None
        self.model = model
        self._loss_fn = loss_fn
        self._batch_loss = batch_loss
        self._batch_outputs = batch_outputs

    def outputs(self, batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` of a batch: what ``loss_fn`` is applied to."""
        if self._batch_loss is not None:
            raise TypeError(_NEEDS_OUTPUTS.format(what="this measure"))
        if self._batch_outputs is not None:
            out = self._batch_outputs(self.model, batch)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError(
                    "batch_outputs: must return a pair (outputs, targets) that loss_fn(outputs, "
                    f"targets) takes; got {type(out).__name__}"
                )
            return out[0], out[1]
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            kind = type(batch).__name__
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise TypeError(
                f"data: a batch is a {kind}{length}; loss_fn needs (inputs, targets) batches. "
                "For other batches pass batch_outputs=lambda model, batch: (outputs, targets), "
                "or batch_loss=lambda model, batch: <scalar loss>"
            )
        inputs, targets = batch
        return self.model(inputs), targets

    def forward(self, batch: Any) -> torch.Tensor:
        if self._batch_loss is not None:
            return self._batch_loss(self.model, batch)
        outputs, targets = self.outputs(batch)
        return self._loss_fn(outputs, targets)  # type: ignore[misc]


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """``scaled_dot_product_attention`` by its plain math kernel inside the block.

    The fused kernels (flash, memory-efficient; CPU and CUDA) have no second derivative
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), so Hessian-vector products of attention models need the math kernel. The
    backend choice is restored on exit; torch without ``torch.nn.attention`` gets a no-op.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def scalar_loss(module: LossModule, loss: Any) -> torch.Tensor:
    """``loss`` as a 0-d tensor; a ValueError / TypeError naming the user's function otherwise."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(())
    name = "loss_fn" if module._batch_loss is None else "batch_loss"
    if isinstance(loss, torch.Tensor):
        raise ValueError(
            f"{name}: the loss of a batch is a tensor of shape {tuple(loss.shape)}; expected one "
            "number (use a reduction='mean' criterion, or reduction='sum' here for summed losses)"
        )
    raise TypeError(
        f"{name}: the loss of a batch is a {type(loss).__name__}; expected a torch tensor holding "
        "one number, computed with torch operations so that it can be differentiated "
        "(e.g. return F.cross_entropy(outputs, targets), not float(...) or .item())"
    )
