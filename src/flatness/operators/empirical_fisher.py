"""The empirical Fisher Σᵢ aᵢ gᵢ gᵢᵀ from per-sample gradients."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from flatness._utils.compat import tree_flatten, tree_unflatten
from flatness.objective._data import batch_size_of
from flatness.operators._base import CurvatureOperator
from flatness.operators._linearize import linearize

__all__ = ["EmpiricalFisherOperator"]


#: torch's words when a tensor made inside ``vmap`` is used after it (activation checkpointing).
_ESCAPED = "escaped from inside a function being vmapped"


def _no_batching_rule(error: BaseException) -> bool:
    """Whether an error of ``torch.func.vmap`` means "this op cannot be vectorized"."""
    msg = str(error).lower()
    return "batching rule" in msg or "vmap" in msg


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher: the uncentred second moment of the per-sample gradients.

    .. math::
        \\tilde F = \\sum_b \\frac{m_b}{M} \\sum_{i \\in b} a_i\\, g_i g_i^\\top,\\qquad
        g_i = \\nabla_\\theta \\ell_i(\\theta_0),\\qquad a_i = \\frac{s_i}{\\sum_{j \\in b} s_j}

    with ℓ_i the loss of the batch made of row i alone (a "sample" is a row: the leading
    dimension of the batch's tensors) and the *true* labels, m_b / M the batch weights of
    :class:`flatness.Objective`, and s_i the size of sample i: 1 by default, ``batch_size(row)``
    when ``batch_size=`` is given (e.g. its predicted tokens with ``lm_loss``). A sample without
    a loss — all its targets ``ignore_index``, so that its mean loss is 0/0 — has s_i = 0 and
    counts nothing. Without ignored targets and with the default sizes,
    F̃ = (1/N) Σᵢ gᵢ gᵢᵀ over all N samples; ``reduction="sum"``: Σᵢ gᵢ gᵢᵀ. It is not the
    Fisher: it can differ from it arbitrarily away from a perfect fit, and preconditioning with
    it is no natural gradient (Kunstner, Hennig & Balles 2019, "Limitations of the empirical
    Fisher approximation for natural gradient descent", arXiv 1905.12558).

    A product needs no N × n matrix of gradients: the per-sample losses of a batch are computed
    with ``torch.func.vmap`` in one forward pass that also carries (gᵢᵀ v)ᵢ in forward mode, and
    one backward pass gives Σᵢ aᵢ gᵢ (gᵢᵀ v). Batches are split into rows along the leading
    dimension of every tensor whose leading size is the number of rows (other tensors are
    shared). Models with ops that ``vmap`` cannot batch (e.g. ``nn.GRU``, ``nn.LSTM``) are run
    one sample at a time instead (the same numbers, slower). Per-sample losses see one sample at
    a time, so train-mode BatchNorm cannot be used. Works with ``loss_fn``, ``batch_outputs``
    and ``batch_loss`` alike.

    Raises:
        ValueError: ``batch_size`` is not a sum over the rows of a batch, or gives a batch whose
            rows all have size 0.
        NonFiniteLossError: (from the pass) a sample with a loss whose loss or gradient is not
            finite.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> op = flatness.EmpiricalFisherOperator(model, loss_fn, data)
        >>> def sample_grad(x, y):
        ...     model.zero_grad()
        ...     loss_fn(model(x[None]), y[None]).backward()
        ...     return torch.cat([model.weight.grad.flatten(), model.bias.grad])
        >>> g = torch.stack([sample_grad(x, y) for x, y in zip(X, y)])
        >>> torch.allclose(op.dense(), g.T @ g / 16)  # (1/N) sum_i g_i g_i^T
        True
    """

    name = "empirical_fisher"
    product_name = "empirical-Fisher-vector product"

    def _init(self) -> None:
        self._state: dict[str, Any] = {}

    def _sizes(self, batch: Any, rows: int, sample: Callable[[int], Any]) -> torch.Tensor | None:
        """s_i of every row of a batch (None: the default sizes, all 1)."""
        size_fn = self.objective.size_fn
        if size_fn is None:
            return None
        per_row = getattr(size_fn, "per_row", None)  # lm_loss's: every row at once
        if per_row is not None:
            sizes = torch.as_tensor(per_row(batch)).reshape(-1).tolist()
        else:
            sizes = []
            for i in range(rows):
                s = size_fn(sample(i))
                if isinstance(s, torch.Tensor) and s.numel() == 1:
                    s = s.item()
                sizes.append(s)
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        total = batch_size_of(batch, size_fn)
        if bad or len(sizes) != rows or sum(sizes) != total:
            raise ValueError(
                f"batch_size: the empirical Fisher splits a batch into its {rows} rows (samples) and "
                f"weights each by batch_size(row); batch_size(batch) = {total} but batch_size over "
                f"its rows gives {sizes if len(sizes) <= 8 else str(sizes[:8])[:-1] + ', ...]'}, not "
                "non-negative ints summing to it. Pass a batch_size that counts per row (samples, "
                "or predicted tokens as lm_loss does), or none"
            )
        return torch.tensor(sizes, dtype=torch.float64)

    def batch_product(self, batch: Any, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        obj = self.objective
        mean = obj.reduction == "mean"
        state = self._state
        with warnings.catch_warnings():  # the pass itself warns about ambiguous sizes
            warnings.simplefilter("ignore")
            rows = batch_size_of(batch)  # the rows, whatever batch_size= counts
        leaves, spec = tree_flatten(batch)
        mapped = [isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == rows for t in leaves]
        dims = tree_unflatten([0 if b else None for b in mapped], spec)

        def row(i: int) -> Any:
            parts = [t[i : i + 1] if b else t for t, b in zip(leaves, mapped, strict=True)]
            return tree_unflatten(parts, spec)

        sizes = self._sizes(batch, rows, row)

        def one(sample: Any) -> torch.Tensor:
            parts = tree_flatten(sample)[0]
            parts = [t.unsqueeze(0) if b else t for t, b in zip(parts, mapped, strict=True)]
            return obj.batch_loss(tree_unflatten(parts, spec))

        def loop() -> torch.Tensor:
            return torch.stack([obj.batch_loss(row(i)) for i in range(rows)])

        def compute() -> tuple[torch.Tensor, None]:
            if not state.get("loop"):
                try:
                    return torch.func.vmap(one, in_dims=(dims,), randomness="different")(batch), None
                except (RuntimeError, NotImplementedError) as e:
                    if not _no_batching_rule(e):
                        raise
                    # an op vmap cannot batch (nn.GRU, nn.LSTM, data-dependent control flow)
                    state["loop"] = True
            return loop(), None

        lin = linearize(obj, self.theta, v, compute, state)
        losses, jvp = lin.outputs, lin.jvp
        if sizes is None:
            sizes = self._default_sizes(batch, losses)
        sizes = sizes.to(device=losses.device, dtype=losses.dtype)
        counted = sizes > 0
        if not bool(counted.any()):
            raise ValueError(
                f"batch_size: every row of a batch has size 0 (batch_size gives {batch_size_of(batch, obj.size_fn)} "
                "for the batch): the empirical Fisher has no sample to weight; remove the batch"
            )
        a = sizes / sizes.sum() if mean else counted.to(losses.dtype)
        # samples without a loss (0/0) count nothing: their NaNs must not reach the sums
        losses = torch.where(counted, losses, torch.zeros_like(losses))
        jvp = torch.where(counted, jvp, torch.zeros_like(jvp))
        try:
            out = lin.vjp(a * jvp)
        except RuntimeError as e:
            # Activation checkpointing recomputes its segments in the backward, outside vmap:
            # torch calls the vmapped tensors escaped. The loop over rows has no such problem.
            if state.get("loop") or _ESCAPED not in str(e):
                raise
            state["loop"] = True
            out = linearize(obj, self.theta, v, compute, state).vjp(a * jvp)
        return (a * losses).sum(), out

    def _default_sizes(self, batch: Any, losses: torch.Tensor) -> torch.Tensor:
        """s_i = 1, or 0 for a sample without a loss (its mean over no target is 0/0).

        A non-finite per-sample loss is such a sample only where the batch's own loss is
        finite (the batch loss does not see it); otherwise it is left to the pass, which
        raises a ``NonFiniteLossError`` naming the batch.
        """
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return torch.ones_like(losses, dtype=torch.float64)
        obj = self.objective
        with torch.no_grad(), obj.at(self.theta):
            batch_loss = obj.batch_loss(batch)
        if not bool(torch.isfinite(batch_loss)):
            return torch.ones_like(losses, dtype=torch.float64)
        return finite.to(torch.float64)
