"""The Fisher information matrix of the model's predictive distribution: exact and Monte-Carlo."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from flatness._utils.validate import check_choice, check_positive, check_seed
from flatness.objective import NonFiniteLossError, _dist
from flatness.operators._base import CurvatureOperator
from flatness.operators._linearize import linearize
from flatness.operators.ggn import output_hvp

__all__ = ["LIKELIHOODS", "FisherOperator", "infer_likelihood"]

LIKELIHOODS = ("categorical", "gaussian")


def infer_likelihood(loss_fn: Any) -> str | None:
    """``"categorical"`` for cross-entropy and NLL, ``"gaussian"`` for MSE, else None."""
    if loss_fn is nn.functional.cross_entropy or isinstance(loss_fn, nn.CrossEntropyLoss):
        return "categorical"
    if loss_fn is nn.functional.nll_loss or isinstance(loss_fn, nn.NLLLoss):
        return "categorical"  # of log-probability outputs (see FisherOperator)
    if loss_fn is nn.functional.mse_loss or isinstance(loss_fn, nn.MSELoss):
        return "gaussian"
    return None


def _rows(t: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The outputs as (predictions, values): one row per predicted distribution.

    Categorical: the class dimension (dim 1, or dim 0 for a single unbatched prediction, as in
    ``F.cross_entropy``) becomes the last; every other position is a prediction. Gaussian: one
    row per sample (leading dimension), its outputs flattened.
    """
    if likelihood == "categorical":
        cdim = 1 if t.ndim >= 2 else 0
        return t.movedim(cdim, -1).reshape(-1, t.shape[cdim])
    return t.reshape(t.shape[0], -1) if t.ndim >= 1 else t.reshape(1, 1)


def _unrows(r: torch.Tensor, like: torch.Tensor, likelihood: str) -> torch.Tensor:
    if likelihood == "categorical":
        cdim = 1 if like.ndim >= 2 else 0
        moved = like.movedim(cdim, -1).shape
        return r.reshape(moved).movedim(-1, cdim)
    return r.reshape(like.shape)


class FisherOperator(CurvatureOperator):
    """The Fisher information of the model's predictive distribution, exact or Monte-Carlo.

    .. math::
        F = \\sum_b \\frac{m_b}{M} J_b^\\top \\Big( c_b \\odot
            \\mathbb{E}_{\\hat y \\sim p(y|z_b)}\\big[\\nabla_z \\log p(\\hat y|z_b)\\,
            \\nabla_z \\log p(\\hat y|z_b)^\\top\\big] \\Big) J_b

    with z_b the outputs of batch b, J_b = ∂z_b/∂θ, and c_b the loss's own weight of each
    prediction (1/N for a mean over N predictions, 0 for ignored targets), read off the loss's
    Hessian in the outputs so that any reduction, ``ignore_index`` or label smoothing is
    followed. For a categorical likelihood (softmax cross-entropy) the expectation is
    diag(p) − ppᵀ per prediction; for a Gaussian one (MSE) it is the identity per sample — in
    both cases F equals the GGN exactly (Martens 2020, arXiv 1412.1193, §9.2). Outputs that are
    log-probabilities with a loss linear in them (``F.nll_loss`` after ``LogSoftmax``: its
    Hessian in z is 0) are logits of the same distribution, softmax(log p) = p: c is then read off
    ``loss_fn(log_softmax(z))`` and F is the Fisher of softmax(z).

    ``mc_samples=None`` (default) gives that exact F. ``mc_samples=S`` gives the Monte-Carlo
    Fisher: S labels ŷ per prediction drawn from p(y|z), seeded by ``mc_seed``, the batch's
    position and the rank under torch.distributed, so that every product uses the same draws and
    the operator is a fixed symmetric matrix; unbiased for F, at the cost of a GGN product. Unlike
    the empirical Fisher it uses sampled labels, not the data's (Kunstner et al. 2019, arXiv 1905.12558).

    Args (besides the objective's):
        mc_samples: ``None`` for the exact Fisher, or labels drawn per prediction (int ≥ 1).
        likelihood: ``"categorical"`` (softmax cross-entropy, or NLL of log-probabilities),
            ``"gaussian"`` (MSE) or ``None`` to infer it from ``loss_fn`` (``F.cross_entropy`` /
            ``nn.CrossEntropyLoss``, ``F.nll_loss`` / ``nn.NLLLoss``, ``F.mse_loss`` / ``nn.MSELoss``).
        mc_seed: seed of the label draws.

    Raises:
        ValueError: when the likelihood cannot be inferred, or when the loss's Hessian in the
            outputs is not that of the stated likelihood (e.g. ``likelihood="categorical"``
            with a loss that is not softmax cross-entropy), or a loss linear in outputs that are
            not log-probabilities (``F.nll_loss`` of raw logits).
        NonFiniteLossError: (Monte-Carlo) outputs that are not finite: no distribution to draw from.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 4).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randint(0, 4, (16,))
        >>> data, loss_fn = [(X, y)], torch.nn.functional.cross_entropy
        >>> F = flatness.FisherOperator(model, loss_fn, data)
        >>> G = flatness.GGNOperator(model, loss_fn, data)
        >>> torch.allclose(F.dense(), G.dense())  # softmax cross-entropy: F = GGN
        True
        >>> F_mc = flatness.FisherOperator(model, loss_fn, data, mc_samples=64)
        >>> F_mc.shape
        (16, 16)
    """

    name = "fisher"
    product_name = "Fisher-vector product"
    own_options = ("mc_samples", "likelihood", "mc_seed")

    def _init(self, mc_samples: int | None = None, likelihood: str | None = None, mc_seed: int = 0) -> None:
        obj = self.objective
        obj.require_outputs("curvature='fisher'")
        check_positive("mc_samples", mc_samples, integer=True, allow_none=True)
        self.mc_seed = check_seed(mc_seed, "mc_seed")
        if likelihood is None:
            likelihood = infer_likelihood(obj.loss_fn)
            if likelihood is None:
                raise ValueError(
                    f"likelihood: cannot tell the predictive distribution of loss_fn={obj.loss_fn!r}; "
                    f"pass likelihood= one of {LIKELIHOODS} (softmax cross-entropy or MSE), or use "
                    "curvature='ggn'"
                )
        check_choice("likelihood", likelihood, LIKELIHOODS)
        self.likelihood = likelihood
        self.mc_samples = None if mc_samples is None else int(mc_samples)
        self._state: dict[str, Any] = {}

    def _weights(self, z: torch.Tensor, targets: Any, index: int) -> torch.Tensor:
        """c: the loss's weight of each prediction (categorical) or output (Gaussian), as rows.

        Found from two output-space Hessian products with seeded probes, and checked: the loss's
        Hessian must be c times the likelihood's curvature, row by row.
        """
        obj = self.objective
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([7, index]).generate_state(1)[0]))
        probes = torch.randn((2, *z.shape), generator=gen, dtype=torch.float64).to(z.device, z.dtype)
        with torch.enable_grad():
            zl = z.detach().requires_grad_(True)
            loss = obj.output_loss(zl, targets)
            hu = output_hvp(loss, zl, *probes)
            if self.likelihood == "categorical" and all(not bool(h.any()) for h in hu):
                hu = self._log_probability_hvp(zl, targets, probes)
        p = self._probs(z)
        bu = [_rows(self._curvature(p, u), self.likelihood) for u in probes]
        hr = [_rows(h, self.likelihood) for h in hu]
        if self.likelihood == "categorical":
            # one weight per prediction row: least squares c = <Hu, Bu> / <Bu, Bu>
            den = (bu[0] * bu[0]).sum(-1)
            c = torch.where(den > 0, (hr[0] * bu[0]).sum(-1) / den.clamp_min(torch.finfo(z.dtype).tiny), 0.0)
            c = c[:, None]
        else:
            c = torch.where(bu[0] != 0, hr[0] / bu[0], torch.zeros_like(bu[0]))
        # the second probe checks that the loss's Hessian is c · B (else the likelihood is wrong)
        err = float((hr[1] - c * bu[1]).norm())
        scale = float(hr[1].norm()) + float((c * bu[1]).norm())
        tol = 10 * math.sqrt(torch.finfo(z.dtype).eps)
        if err > tol * max(scale, torch.finfo(z.dtype).tiny):
            raise ValueError(
                f"likelihood: the Hessian of loss_fn in the outputs is not that of a {self.likelihood} "
                f"likelihood (relative mismatch {err / max(scale, 1e-300):.2e}); pass the right "
                f"likelihood= ({LIKELIHOODS}) or use curvature='ggn' for this loss"
            )
        return c

    def _log_probability_hvp(self, z: torch.Tensor, targets: Any, probes: torch.Tensor) -> list[torch.Tensor]:
        """H_ℓ u for a loss linear in the outputs: the NLL of log-probabilities z.

        ``F.nll_loss(z, y)`` takes z = log p; its Hessian in z is 0, but z are logits of the
        same distribution (softmax(log p) = p), and loss_fn(log_softmax(z)) equals loss_fn(z)
        at such z with the Hessian c ⊙ (diag(p) − ppᵀ) of cross-entropy: the weights c follow.
        Outputs that are not log-probabilities are refused (the Fisher of what?).
        """
        cdim = 1 if z.ndim >= 2 else 0
        loss = self.objective.output_loss(torch.log_softmax(z, dim=cdim), targets)
        hu = output_hvp(loss, z, *probes)
        if all(not bool(h.any()) for h in hu):
            return hu  # no prediction counts (e.g. every target ignored)
        lse = torch.logsumexp(z.detach(), dim=cdim)
        worst = float(lse.abs().max())
        if not worst <= 10 * math.sqrt(torch.finfo(z.dtype).eps):
            raise ValueError(
                "likelihood: loss_fn is linear in the model's outputs (its Hessian in them is 0), as "
                "F.nll_loss is, which takes log-probabilities; but the outputs are not log-probabilities "
                f"(logsumexp over the classes is {worst:.3g} away from 0). End the model with "
                "log_softmax, or use F.cross_entropy on the logits"
            )
        return hu

    def _probs(self, z: torch.Tensor) -> torch.Tensor | None:
        if self.likelihood != "categorical":
            return None
        cdim = 1 if z.ndim >= 2 else 0
        return torch.softmax(z, dim=cdim)

    def _curvature(self, p: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """B u: the likelihood's Fisher in the outputs, (diag(p) − ppᵀ) u per prediction, or u."""
        if p is None:
            return u
        cdim = 1 if u.ndim >= 2 else 0
        return p * u - p * (p * u).sum(dim=cdim, keepdim=True)

    def _sampled(self, z: torch.Tensor, p: torch.Tensor | None, index: int) -> torch.Tensor:
        """(S, rows, values): ∇_z −log p(ŷ_s|z) per prediction for S seeded label draws."""
        S = self.mc_samples
        assert S is not None
        # the rank too: shards of the data on different ranks draw independent labels
        rank = _dist.rank_and_world(self.objective.backend.group)[0]
        seed = int(np.random.SeedSequence([self.mc_seed, rank, index]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        if p is None:  # Gaussian: ∇ = (z − ŷ)/σ² with ŷ ~ N(z, σ²): a standard normal vector
            shape = _rows(z, self.likelihood).shape
            return torch.randn((S, *shape), generator=gen, dtype=torch.float64).to(z.device, z.dtype)
        pr = _rows(p, "categorical")
        if not bool(torch.isfinite(pr).all()):
            raise NonFiniteLossError(
                f"mc_samples: cannot draw labels on batch {index}: the model's outputs there are not "
                "finite (a NaN or infinite parameter or input), so p(y|z) is no distribution; check "
                "the model, the data and the parameters"
            )
        labels = torch.multinomial(pr.detach().double().cpu(), S, replacement=True, generator=gen)
        onehot = torch.nn.functional.one_hot(labels.T, pr.shape[-1]).to(device=z.device, dtype=z.dtype)
        return pr[None] - onehot

    def batch_product(self, batch: Any, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        obj = self.objective
        lin = linearize(obj, self.theta, v, lambda: obj.batch_outputs(batch), self._state)
        z = lin.outputs
        c = self._weights(z, lin.targets, index)
        p = self._probs(z)
        if self.mc_samples is None:
            u = c * _rows(self._curvature(p, lin.jvp), self.likelihood)
        else:
            # √c ⊙ ∇ log p(ŷ_s|z): then (1/S) Σ_s a_s a_sᵀ has expectation c ⊙ B
            a = c.clamp_min(0).sqrt() * self._sampled(z, p, index)  # (S, rows, values)
            jv = _rows(lin.jvp, self.likelihood)
            coef = torch.einsum("srd,rd->sr", a, jv)
            u = torch.einsum("sr,srd->rd", coef, a) / a.shape[0]
        with torch.no_grad():
            loss = obj.output_loss(z, lin.targets)
        return loss, lin.vjp(_unrows(u, z, self.likelihood))
