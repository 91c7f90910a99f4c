"""Linear operators as the algorithms see them, and the one place where vectors are combined.

An algorithm of this layer takes any symmetric linear operator A in one of these forms:

- an object with ``matvec(v) -> A v``, ``shape == (n, n)``, ``dtype`` and ``device`` (the
  :class:`LinearOperator` protocol; every operator of :mod:`flatness.operators` is one);
- a square ``torch.Tensor``, or a square NumPy array / ``scipy.sparse.linalg.LinearOperator``
  (applied in float64 on the CPU);
- a plain callable ``matvec(v)`` together with the size ``n``.

Every operation that combines the entries of vectors — dot products, norms, the coefficients of a
vector in a basis, orthonormalization, random vectors — goes through a :class:`VectorSpace`. The
default space holds whole vectors in one process. An operator whose vectors are split across
processes (each rank holding its shard) supplies its own space through a ``space`` attribute, whose
reductions are collective; the algorithms need no change for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from flatness._utils.validate import check_positive, check_seed

__all__ = [
    "LinearOperator",
    "Matvec",
    "Operator",
    "VectorSpace",
    "as_operator",
    "generator",
]

Matvec = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class LinearOperator(Protocol):
    """What an operator needs for the algorithms: a product, a size, a dtype and a device.

    An optional ``space`` attribute (a :class:`VectorSpace`) says how its vectors are stored
    and combined; without it they are whole vectors of length n in one process.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import LinearOperator, lanczos_eigsh
        >>> class Scaled:
        ...     shape = (4, 4)
        ...     dtype = torch.float64
        ...     device = torch.device("cpu")
        ...     def matvec(self, v):
        ...         return torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=v.dtype) * v
        >>> isinstance(Scaled(), LinearOperator)
        True
        >>> round(lanczos_eigsh(Scaled(), k=1, tol=1e-10).eigenvalues.item(), 6)
        4.0
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (results never depend on the global RNG)."""
    return torch.Generator().manual_seed(check_seed(seed))


class VectorSpace:
    """The vectors an algorithm works with: where they live, and every way of combining them.

    Args:
        n: the operator's size.
        dtype: of the vectors.
        device: as ``dtype``.

    Attributes:
        n: the global length of a vector.
        n_local: how many of its entries this process holds (``n`` here; less in a sharded space).

    Examples:
        >>> import torch
        >>> from flatness.algorithms import VectorSpace
        >>> space = VectorSpace(3, dtype=torch.float64, device="cpu")
        >>> space.norm(torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)), space.n_local
        (5.0, 3)
    """

    def __init__(self, n: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.n = n
        self.n_local = n
        self.dtype = dtype
        self.device = torch.device(device)

    # -- reductions: a sharded space sums these over the ranks -------------------------------
    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the processes that share the vectors (here: ``t`` itself)."""
        return t

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """aᵀb as a 0-d tensor."""
        return self.reduce(torch.dot(a, b))

    def norm(self, a: torch.Tensor) -> float:
        """‖a‖₂ as a Python float."""
        return math.sqrt(max(float(self.dot(a, a)), 0.0))

    def norm64(self, a: torch.Tensor) -> float:
        """‖a‖₂ accumulated in float64 (no overflow or rounding of low-precision vectors)."""
        return float(torch.linalg.vector_norm(a, dtype=torch.float64))

    def coeffs(self, V: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """V w: the inner products of w with the rows of V."""
        return self.reduce(V @ w)

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """A Bᵀ: the inner products of the rows of A with the rows of B."""
        return self.reduce(A @ B.T)

    def orthonormalize(self, rows: torch.Tensor) -> torch.Tensor:
        """Orthonormal rows spanning the rows of ``rows`` (same number of rows)."""
        return torch.linalg.qr(rows.T).Q.T

    # -- random vectors: a sharded space draws this process's part only ---------------------
    def randn(self, gen: torch.Generator, rows: int | None = None) -> torch.Tensor:
        """Standard normal entries from ``gen`` (drawn on the CPU, then moved)."""
        shape = (self.n,) if rows is None else (rows, self.n)
        return torch.randn(shape, generator=gen, dtype=self.dtype).to(self.device)

    def rademacher(self, gen: torch.Generator, rows: int | None = None) -> torch.Tensor:
        """Independent ±1 entries with probability ½ each, from ``gen``."""
        shape = (self.n,) if rows is None else (rows, self.n)
        return (torch.randint(0, 2, shape, generator=gen).to(self.dtype) * 2 - 1).to(self.device)

    def basis(self, i: int) -> torch.Tensor:
        """This process's entries of the i-th standard basis vector e_i."""
        e = torch.zeros(self.n_local, dtype=self.dtype, device=self.device)
        e[i] = 1
        return e

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The whole (n, m) matrix from this process's rows (n_local, m) of it, on every process."""
        return rows

    def empty(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.n_local, device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, dtype={self.dtype}, device={self.device})"


class Operator:
    """An operator in the algorithms' normal form: a checked ``matvec`` and its :class:`VectorSpace`.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import Operator, as_operator
        >>> op = as_operator(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
        >>> isinstance(op, Operator), op.matvec(torch.ones(2, dtype=torch.float64)).tolist()
        (True, [1.0, 2.0])
    """

    def __init__(self, matvec: Matvec, space: VectorSpace) -> None:
        self._matvec = matvec
        self.space = space
        self.n = space.n

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A v, checked for type and size, as a flat vector in v's dtype and device."""
        out = self._matvec(v)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"matvec: returned {type(out).__name__}; expected a torch.Tensor")
        out = out.reshape(-1)
        if out.shape[0] != self.space.n_local:
            raise ValueError(
                f"matvec: returned {out.shape[0]} numbers for a vector of size n={self.space.n_local}"
            )
        out = out.to(device=v.device, dtype=v.dtype)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(
                f"matvec: returned {bad} non-finite value(s) (NaN or inf) out of {out.shape[0]}; the "
                "operator must map finite vectors to finite vectors (check its scale and the dtype)"
            )
        return out


def _dtype(dtype: Any) -> torch.dtype:
    dtype = torch.float64 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    return dtype


def _numpy_matvec(apply: Callable[[np.ndarray], Any]) -> Matvec:
    def mv(v: torch.Tensor) -> torch.Tensor:
        out = np.asarray(apply(v.detach().cpu().double().numpy()), dtype=np.float64)
        return torch.from_numpy(out.reshape(-1))

    return mv


def as_operator(
    A: Any,
    n: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Operator:
    """Bring any supported form of a symmetric operator into :class:`Operator` form.

    Args:
        A: a :class:`LinearOperator`-like object, a square tensor, a square NumPy array or
            ``scipy.sparse.linalg.LinearOperator``, or a callable ``matvec(v)`` (then ``n`` is needed).
        n: the size, for a plain callable (checked against the shape otherwise).
        device: where and in which precision the algorithm's vectors live; default: the
            operator's own (CPU and float64 for callables, arrays and scipy operators).
        dtype: as ``device``.

    Raises:
        TypeError, ValueError: for an unsupported or non-square operator, or a size mismatch.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import as_operator
        >>> op = as_operator(lambda v: 2 * v, n=3)  # a plain callable needs its size
        >>> op.n, op.space.dtype, op.matvec(torch.ones(3, dtype=torch.float64)).tolist()
        (3, torch.float64, [2.0, 2.0, 2.0])
    """
    space: VectorSpace | None = None
    if isinstance(A, torch.Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1] or not A.is_floating_point():
            raise ValueError(f"A: expected a square floating matrix, got shape {tuple(A.shape)}, {A.dtype}")
        size, mv = A.shape[0], (lambda v, A=A: A @ v.to(A.dtype))
        dtype = A.dtype if dtype is None else dtype
        device = A.device if device is None else device
    elif callable(getattr(A, "matvec", None)) and hasattr(A, "shape"):
        shape = tuple(A.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"A: expected a square operator, got shape {shape}")
        size = int(shape[0])
        space = getattr(A, "space", None)
        op_dtype = getattr(A, "dtype", None)
        if isinstance(op_dtype, torch.dtype):
            mv = A.matvec
            dtype = op_dtype if dtype is None else dtype
            device = getattr(A, "device", None) if device is None else device
        else:  # scipy LinearOperator or similar NumPy-world operator
            mv = _numpy_matvec(A.matvec)
    elif isinstance(A, np.ndarray):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A: expected a square matrix, got shape {A.shape}")
        return as_operator(torch.from_numpy(np.asarray(A, dtype=np.float64)), device=device, dtype=dtype)
    elif callable(A):
        if n is None:
            raise TypeError("n: a plain matvec callable needs the operator's size n")
        size, mv = n, A
    else:
        raise TypeError(
            "A: expected a linear operator (an object with matvec and shape), a square tensor or "
            f"array, a scipy LinearOperator, or a callable matvec with n; got {type(A).__name__}"
        )
    if n is not None and n != size:
        check_positive("n", n, integer=True)
        raise ValueError(f"n: got {n}, but the operator has size {size}")
    check_positive("n", size, integer=True)
    if space is None:
        space = VectorSpace(size, dtype=_dtype(dtype), device=device or "cpu")
    elif dtype is not None and dtype != space.dtype:
        raise ValueError(f"dtype: the operator's vector space is {space.dtype}; got dtype={dtype}")
    return Operator(mv, space)
