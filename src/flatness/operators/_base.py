"""The common base of the model-level curvature operators.

A curvature operator is a symmetric n×n matrix A(θ₀) of the full-data objective at the model's
parameters θ₀ (a snapshot taken at construction), available only through products: ``op @ v``
for torch or NumPy vectors (or matrices whose columns are vectors), ``op.to_scipy()`` for
``scipy.sparse.linalg`` solvers, ``op.dense()`` for small n. Every operator is also a
:class:`flatness.algorithms.LinearOperator`, so the algorithms of :mod:`flatness.algorithms`
run on it directly.

A curvature is one subclass that defines one batch's product, :meth:`CurvatureOperator.batch_product`
(as curvlinops' ``_matmat_batch``); the base owns the pass over the data, which combines batches
with the size weights of :class:`flatness.Objective` (see docs/operators.md, "A new curvature").
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from flatness.objective import Objective, ParamSpec

__all__ = ["CurvatureOperator"]


class CurvatureOperator:
    """A curvature matrix of ``(model, loss_fn, data)`` at θ₀, as a linear operator.

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        **options: the objective's options (``params``, ``reduction``, ``dtype``, ...) and the
            operator's own (see each subclass).

    Attributes:
        shape: ``(n, n)`` with n the number of chosen parameters.
        n_matvec: products done so far (one full pass over the data each).
        objective: the underlying :class:`flatness.Objective`.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> op = flatness.curvature_operator(model, loss_fn, data, curvature="ggn")
        >>> isinstance(op, flatness.CurvatureOperator), op.shape
        (True, (4, 4))
        >>> (op @ torch.ones(4, dtype=torch.float64)).shape, op.n_matvec
        (torch.Size([4]), 1)
    """

    #: the ``curvature=`` name of the operator.
    name: ClassVar[str] = ""
    #: the operator's own keyword options (the rest go to :class:`flatness.Objective`).
    own_options: ClassVar[tuple[str, ...]] = ()
    #: the backend capabilities its products need (refused by name where missing, see
    #: :meth:`flatness.Objective.require`): computing at θ with tangents, by default.
    requires: ClassVar[tuple[str, ...]] = ("functional",)
    #: what one product is called in messages.
    product_name: ClassVar[str] = "curvature-vector product"

    def __init__(self, model: nn.Module, loss_fn: Any = None, data: Any = None, **options: Any) -> None:
        own = {k: options.pop(k) for k in list(options) if k in self.own_options}
        self._setup(Objective(model, loss_fn, data, **options), None, **own)

    @classmethod
    def from_objective(cls, objective: Objective, theta: Any = None, **own: Any) -> CurvatureOperator:
        """The operator of an existing objective at ``theta`` (default: its θ₀)."""
        op = cls.__new__(cls)
        op._setup(objective, theta, **own)
        return op

    def _setup(self, objective: Objective, theta: Any, **own: Any) -> None:
        unknown = [k for k in own if k not in self.own_options]
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected option {unknown[0]!r}")
        for capability in self.requires:
            objective.require(
                capability,
                "curvature",
                f"curvature={self.name!r} (its products need the model's outputs at θ with tangents)",
                "the Hessian (curvature='hessian') is available",
            )
        self.objective = objective
        self.theta = objective.theta0 if theta is None else objective.as_vector(theta, "theta").detach()
        #: the vectors' space (local shards on a sharded model; dot products over every rank).
        self.space = objective.space
        self.n_matvec = 0
        self._own = dict(own)
        self._init(**own)

    @contextlib.contextmanager
    def reusing_graph(self) -> Iterator[None]:
        """Inside the block, products may reuse what they share (the Hessian: the gradient graph).

        A no-op for operators whose products share nothing across vectors.
        """
        yield

    @property
    def graph_reused(self) -> bool:
        """Whether the products of the last :meth:`reusing_graph` block reused a kept graph."""
        return False

    def _init(self, **own: Any) -> None:
        """Validate and store the operator's own options (subclasses)."""

    def batch_product(self, batch: Any, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ_b, A_b v) of one batch at ``self.theta``: its loss and its product (subclasses).

        ``index`` is the batch's position in the pass (for per-batch seeds). The base weights
        the batches by size and sums them over the data (and the ranks).
        """
        raise NotImplementedError

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        """A v over one pass of the data: Σ_b w_b A_b v / Σ_b w_b."""
        counter = itertools.count()

        def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
            return self.batch_product(batch, v, next(counter))

        out = self.objective.sum_over_data(per_batch, self.product_name, self.objective.n_local)[1]
        assert out is not None
        return out

    # ------------------------------------------------------------------ the operator
    @property
    def shape(self) -> tuple[int, int]:
        return (self.objective.n, self.objective.n)

    @property
    def n_local(self) -> int:
        """How many entries of a vector this process holds (n unless the model is sharded)."""
        return self.objective.n_local

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def device(self) -> torch.device:
        return self.objective.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A v for a flat torch vector of length n (on any device; returned on A's device)."""
        v = self.objective.as_vector(v, "v")
        out = self._product(v)
        self.n_matvec += 1
        return out

    def block(self, params: ParamSpec) -> CurvatureOperator:
        """The diagonal block P_Bᵀ A P_B of the parameters ``params`` (same data and options).

        θ is restricted to the block, so a product costs no more than one of the whole operator
        (less: gradients flow only into the block).
        """
        return type(self).from_objective(self.objective.with_params(params), **self._own)

    def __matmul__(self, v: Any) -> Any:
        """A @ v for a torch tensor or NumPy array of shape (n,) or (n, k)."""
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
        """The full n×n matrix, by n products (for small models and tests; on every rank)."""
        n = self.shape[0]
        columns = torch.stack([self.matvec(self.space.basis(i)) for i in range(n)], dim=1)
        return self.space.gather_rows(columns)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
