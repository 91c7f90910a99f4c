"""The Hessian of a model's loss as a linear operator.

``HessianOperator(model, loss_fn, data)`` is H = ∇²L(θ₀) at the model's current
parameters θ₀ (a snapshot taken at construction): ``op @ v`` for torch or NumPy vectors
(or matrices whose columns are vectors), ``op.to_scipy()`` for
``scipy.sparse.linalg`` solvers, and ``op.n_hvp`` counting the products done.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from flatness.objective import Objective

__all__ = ["HessianOperator"]


class HessianOperator:
    """H = ∇²L(θ₀), the full-data Hessian at the model's parameters, as an operator.

    Each product is one exact pass over the data (forward-over-reverse or double backward,
    see :class:`flatness.Objective`). Keyword options are those of
    :class:`flatness.Objective` (``params``, ``reduction``, ``dtype``, ``hvp_mode``...).

    Attributes:
        shape: ``(n, n)`` with n the number of chosen parameters.
        n_hvp: Hessian-vector products done so far.
        objective: the underlying :class:`flatness.Objective`.
    """

    def __init__(self, model: nn.Module, loss_fn: Any = None, data: Any = None, **options: Any) -> None:
        self.objective = Objective(model, loss_fn, data, **options)
        self.theta = self.objective.theta0

    @classmethod
    def from_objective(cls, objective: Objective, theta: torch.Tensor | None = None) -> HessianOperator:
        """The Hessian of an existing objective at ``theta`` (default: its θ₀)."""
        op = cls.__new__(cls)
        op.objective = objective
        op.theta = objective.theta0 if theta is None else objective._as_vector(theta, "theta").detach()
        return op

    @property
    def shape(self) -> tuple[int, int]:
        return (self.objective.n, self.objective.n)

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def device(self) -> torch.device:
        return self.objective.device

    @property
    def n_hvp(self) -> int:
        return self.objective.n_hvp

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat torch vector of length n (on any device; returned on H's device)."""
        return self.objective.hvp(v, self.theta)

    def __matmul__(self, v: Any) -> Any:
        """H @ v for a torch tensor or NumPy array of shape (n,) or (n, k)."""
        is_numpy = isinstance(v, np.ndarray)
        if not is_numpy and not isinstance(v, torch.Tensor):
            raise TypeError(f"v: expected a torch.Tensor or numpy array, got {type(v).__name__}")
        t = torch.from_numpy(np.ascontiguousarray(v)) if is_numpy else v
        if t.ndim == 2 and t.shape[0] == self.shape[0]:
            out = torch.stack([self.matvec(t[:, j]) for j in range(t.shape[1])], dim=1)
        elif t.ndim == 1:
            out = self.matvec(t)
        else:
            raise ValueError(
                f"v: got shape {tuple(t.shape)}; expected ({self.shape[0]},) or ({self.shape[0]}, k)"
            )
        if is_numpy:
            return out.detach().cpu().numpy().astype(v.dtype if v.dtype.kind == "f" else np.float64)
        return out

    def to_scipy(self, dtype: Any = np.float64) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 by default) for eigsh, cg, ..."""
        n = self.shape[0]

        def mv(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x).reshape(-1)
            out = self.matvec(torch.from_numpy(np.ascontiguousarray(x)))
            return out.detach().cpu().numpy().astype(dtype)

        return LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.dtype(dtype))

    def dense(self) -> torch.Tensor:
        """The full n×n matrix, by n products (for small models and tests)."""
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[i]) for i in range(self.shape[0])], dim=1)

    def __repr__(self) -> str:
        return f"HessianOperator(shape={self.shape}, dtype={self.dtype}, device={self.device})"
