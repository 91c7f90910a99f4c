"""The empirical Fisher (1/N) Σᵢ gᵢ gᵢᵀ from per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from flatness._data import batch_size_of
from flatness.operators._base import CurvatureOperator
from flatness.operators._linearize import linearize

__all__ = ["EmpiricalFisherOperator"]


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher: the uncentred second moment of the per-sample gradients.

    .. math:: \\tilde F = \\frac1N \\sum_{i=1}^N g_i g_i^\\top,\\qquad g_i = \\nabla_\\theta \\ell_i(\\theta_0)

    over all N samples of the data (``reduction="sum"``: without the 1/N), with ℓ_i the loss of
    the batch made of sample i alone and the *true* labels. It is not the Fisher: it can differ
    from it arbitrarily away from a perfect fit, and preconditioning with it is no natural
    gradient (Kunstner, Hennig & Balles 2019, "Limitations of the empirical Fisher
    approximation for natural gradient descent", arXiv 1905.12558).

    A product needs no N × n matrix of gradients: the per-sample losses of a batch are computed
    with ``torch.func.vmap`` in one forward pass that also carries (gᵢᵀ v)ᵢ in forward mode, and
    one backward pass gives Σᵢ gᵢ (gᵢᵀ v). Batches are split into samples along the leading
    dimension of every tensor whose leading size is the batch size (other tensors are shared).
    Per-sample losses see one sample at a time, so train-mode BatchNorm cannot be used.
    Works with ``loss_fn``, ``batch_outputs`` and ``batch_loss`` alike.
    """

    name = "empirical_fisher"

    def _init(self) -> None:
        self._state: dict[str, Any] = {}

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        obj = self.objective
        mean = obj.reduction == "mean"

        def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            m = batch_size_of(batch, obj._size_fn)
            leaves, spec = pytree.tree_flatten(batch)
            mapped = [isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == m for t in leaves]
            dims = pytree.tree_unflatten([0 if b else None for b in mapped], spec)

            def one(sample: Any) -> torch.Tensor:
                parts = pytree.tree_flatten(sample)[0]
                parts = [t.unsqueeze(0) if b else t for t, b in zip(parts, mapped, strict=True)]
                return obj._scalar_loss(obj._module(pytree.tree_unflatten(parts, spec))).reshape(())

            def compute() -> tuple[torch.Tensor, None]:
                return torch.func.vmap(one, in_dims=(dims,), randomness="different")(batch), None

            lin = linearize(obj, self.theta, v, compute, self._state)
            losses = lin.outputs
            scale = 1.0 / m if mean else 1.0
            out = lin.vjp(lin.jvp * scale)
            return (losses.mean() if mean else losses.sum()), out

        out = obj._pass(per_batch, "empirical-Fisher-vector product", extra_numel=obj.n)[1]
        assert out is not None
        return out
