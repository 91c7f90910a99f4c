"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos that stops when it is done.

Lanczos with full reorthogonalization builds an orthonormal basis V_j of the Krylov space
K_j(H, v₀) and the projection T_j = V_jᵀ H V_j; the Ritz pairs (θ, y = V_j s) of T_j approximate
H's extreme eigenpairs. When the basis holds ``ncv`` = m vectors, the thick restart (Wu & Simon
2000, "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix Anal.
Appl. 22(2); equivalent to Stewart's Krylov–Schur for symmetric H) keeps the p best Ritz vectors
and the last residual direction and goes on.

Convergence is checked after every step, not only when the basis is full (after a minimum of
min(m, 11) steps for k = 1, m for k > 1, see :func:`default_min_steps`):

- the *estimate*: the residual the Lanczos relation H V_j = V_{j+1} C_j implies,
  ‖C_j s − θ [s; 0]‖ (|β_j s_j| in the unrestarted case, the classical bound of Paige 1971),
  from the stored coordinates C_j (small, on the CPU), without a product;
- the *confirmation*, once every wanted estimate is below the tolerance: the true residual
  ‖H y − θ y‖, from one product per wanted pair (or from stored products H V, see
  ``keep_products``). Only confirmed pairs are returned.

A pair is accepted when its true residual ‖H y − θ y‖ ≤ tol · max(|θ|, tiny), with
tiny = ε^(1/3) · max|θ| (ε the dtype's machine epsilon) so that eigenvalues at or near zero can
converge: the test of ARPACK's ``eigsh`` (relative to |θ|), with the true residual in place of
ARPACK's estimate.

Memory: the basis grows block by block as it is used, so a run that stops after j steps holds
j + 1 basis vectors (never more than m + 1), plus k Ritz vectors at the end; the restart
rotates the basis in place (column slices), needing no second copy. With ``keep_products`` the
m products H V are kept as well.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import torch

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import check_choice, check_positive
from flatness.algorithms._linalg import Operator, VectorSpace, as_operator, generator
from flatness.results import Result

__all__ = ["LanczosResult", "lanczos_eigsh", "lanczos_step", "lanczos_tridiagonal"]

Which = Literal["largest", "smallest", "magnitude"]
WHICH = ("largest", "smallest", "magnitude")

#: Krylov directions beyond the k wanted ones explored before any pair may be accepted.
GUARD_STEPS = 10
#: vectors taking at most this many bytes in all are "small": their memory does not matter, so
#: the defaults spend it to save products (a larger basis, stored products H V).
SMALL_BYTES = 256 * 2**20
#: a large basis is allocated in blocks of this many vectors as it grows (a small one at once).
_BLOCK = 4
#: the in-place restart works on column slices of about this many numbers of the basis.
_SLICE_NUMBERS = 2**22


@dataclasses.dataclass(frozen=True)
class LanczosResult(Result):
    """k eigenpairs of a symmetric operator and the evidence that they are converged.

    Attributes:
        eigenvalues: (k,) sorted by ``which`` (descending, ascending, or by descending |λ|).
        eigenvectors: (k, n), unit rows, ``eigenvectors[i]`` belongs to ``eigenvalues[i]``
            (on ``basis_device``).
        residuals: (k,) true residual norms ‖H v − λ v‖ of the returned pairs.
        n_matvec: operator products used (the confirmations included).
        converged: whether every pair met ``residual ≤ tol · max(|λ|, tiny)``.
        n_restarts: thick restarts done.
        which, k, tol, ncv: the options used.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import LanczosResult, lanczos_eigsh
        >>> res = lanczos_eigsh(torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)), k=1)
        >>> isinstance(res, LanczosResult), res.eigenvectors.shape, bool(res.residuals[0] <= 1e-3 * 20)
        (True, torch.Size([1, 20]), True)
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    n_matvec: int
    converged: bool
    n_restarts: int
    which: str
    k: int
    tol: float
    ncv: int


def default_ncv(k: int, n: int, bytes_per_vector: int = 0) -> int:
    """Basis size m: max(2k + 1, 20) (ARPACK's usual choice) if those m + 1 vectors are small
    (≤ 256 MiB), else max(2k + 1, 10); at most n.

    Thick restart keeps p = k + ⌊(m − k)/2⌋ Ritz vectors, so a smaller basis costs few products
    at the default tolerance (measured: ≤ 10% more for k = 1 at tol 1e-3, equal on the benchmark
    models) for half the memory.
    """
    m = max(2 * k + 1, 20)
    if (m + 1) * bytes_per_vector > SMALL_BYTES:
        m = max(2 * k + 1, 10)
    return min(m, n)


def default_min_steps(k: int, m: int) -> int:
    """Lanczos steps before a pair may be accepted: min(m, 11) for k = 1, m for k > 1.

    A small Krylov space can hold a pair that passes the residual test but is not the extreme
    one: the start's weight c₁ on the top eigenvector has not yet been amplified over its weight
    c₂ on the next. After j steps it has grown like T_{j−k}(1 + 2γ), γ = (λ₁ − λ₂)/(λ₂ − λ_min)
    (Kaniel–Paige–Saad), so for a random start (c₁/c₂ Cauchy-distributed) the risk is about
    (2/π)(tol·|λ|/(λ₁ − λ₂)) / T_{j−k}(1 + 2γ): negligible for a separated top, a few percent
    when λ₁ − λ₂ is a few ``tol``, for every Krylov method. For k = 1 the guard is k + 10 = 11
    steps; for k > 1 it is the basis size m, ARPACK's first check, since the last of k wanted
    pairs can be displaced by an eigenvalue that enters the space late. Never more than m: a
    basis chosen smaller (``ncv``) is checked once full. Steps count across restarts;
    ``min_steps=`` overrides the default. Measured failure rates against the guard:
    ``benchmarks/README.md`` (``bench_topk.py``, ``bench_monitor_warmstart.py``).

    Args:
        k: the number of wanted eigenpairs.
        m: the basis size (``ncv``).

    Returns:
        The number of steps.
    """
    return min(m, k + GUARD_STEPS) if k == 1 else m


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    if which == "largest":
        return torch.argsort(theta, descending=True, stable=True)
    if which == "smallest":
        return torch.argsort(theta, stable=True)
    return torch.argsort(theta.abs(), descending=True, stable=True)


def _order_np(theta: np.ndarray, which: str) -> np.ndarray:
    """As :func:`_order`, for NumPy arrays."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def check_v0_mix(v0_mix: Any) -> None:
    """``v0_mix`` must be a finite number ≥ 0 (TypeError for a non-number, ValueError otherwise)."""
    if isinstance(v0_mix, bool) or not isinstance(v0_mix, (int, float, np.floating, np.integer)):
        raise TypeError(
            f"v0_mix: expected a number ≥ 0 (the weight of the random part of a given v0), got {v0_mix!r}"
        )
    if not 0 <= v0_mix < math.inf:
        raise ValueError(
            f"v0_mix: got {v0_mix!r}; expected a finite number ≥ 0 (the weight of the random part "
            "of a given v0; 0 starts from v0 exactly)"
        )


def check_which(which: str) -> None:
    check_choice("which", which, WHICH)


def resolve_basis_device(basis_device: Any, space: VectorSpace) -> torch.device:
    """The device of the Lanczos basis: ``basis_device``, or the operator's vectors' by default."""
    if basis_device is None:
        return space.device
    try:
        return torch.device(basis_device)
    except (TypeError, RuntimeError) as err:
        raise TypeError(
            f"basis_device: expected a torch.device or a device string such as 'cpu', got {basis_device!r}"
        ) from err


class Basis:
    """Rows v_0, v_1, … of ``n_local`` numbers, allocated block by block as they are first written.

    The algorithms combine rows only through the methods below, which reduce through the
    operator's :class:`VectorSpace` (so a sharded space keeps working), and never hold a second
    copy of the basis.

    Args:
        space: the operator's vector space.
        rows: the most rows that will be used.
        device: where the rows live (may differ from the operator's device; see ``basis_device``).
        block: rows per allocation; default: all at once when they take at most 256 MiB (fewer
            operations per step), else 4.
    """

    def __init__(
        self, space: VectorSpace, rows: int, device: torch.device | None = None, block: int | None = None
    ) -> None:
        self.space = space
        self.rows = rows
        self.device = space.device if device is None else device
        self.dtype = space.dtype
        if block is None:
            small = rows * space.n_local * torch.finfo(space.dtype).bits // 8 <= SMALL_BYTES
            block = rows if small else _BLOCK
        self.block = max(1, block)
        self.blocks: list[torch.Tensor] = []
        self.allocated = 0

    @classmethod
    def of(cls, space: VectorSpace, V: torch.Tensor) -> Basis:
        """The rows of an existing (rows, n_local) tensor, as one block (no copy)."""
        basis = cls(space, V.shape[0], V.device, block=V.shape[0])
        basis.blocks = [V]
        basis.allocated = V.shape[0]
        return basis

    def __getitem__(self, i: int) -> torch.Tensor:
        b, o = divmod(i, self.block)
        return self.blocks[b][o]

    def __setitem__(self, i: int, x: torch.Tensor) -> None:
        while self.allocated <= i:
            size = min(self.block, self.rows - self.allocated)
            self.blocks.append(torch.empty(size, self.space.n_local, device=self.device, dtype=self.dtype))
            self.allocated += size
        self[i].copy_(x)

    def _parts(self, j: int) -> list[tuple[int, torch.Tensor]]:
        """(first row, block of rows) covering rows 0..j-1."""
        if len(self.blocks) == 1:
            return [(0, self.blocks[0][:j])]
        out, start = [], 0
        for blk in self.blocks:
            if start >= j:
                break
            out.append((start, blk[: min(len(blk), j - start)]))
            start += len(blk)
        return out

    def coeffs(self, w: torch.Tensor, j: int) -> np.ndarray:
        """(v_i ᵀ w) for i < j, float64 (reduced through the space)."""
        parts = [self.space.coeffs(blk, w) for _, blk in self._parts(j)]
        c = parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
        return c.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)

    def combine(self, c: np.ndarray | torch.Tensor, j: int) -> torch.Tensor:
        """Σ_{i<j} c_i v_i, a new local vector on the basis device."""
        c = torch.as_tensor(c).to(device=self.device, dtype=self.dtype)
        out: torch.Tensor | None = None
        for start, blk in self._parts(j):
            part = c[start : start + len(blk)]
            if out is None:
                out = blk.T @ part
            else:
                out.addmv_(blk.T, part)
        assert out is not None
        return out

    def combine_many(self, S: np.ndarray | torch.Tensor, j: int) -> torch.Tensor:
        """Sᵀ V_{0:j}: the rows Σ_i S[i, c] v_i for each column c of S, a new (cols, n_local) tensor."""
        S = torch.as_tensor(S).to(device=self.device, dtype=self.dtype)
        out: torch.Tensor | None = None
        for start, blk in self._parts(j):
            part = S[start : start + len(blk)]
            if out is None:
                out = part.T @ blk
            else:
                out.addmm_(part.T, blk)
        assert out is not None
        return out

    def rotate(self, S: np.ndarray | torch.Tensor, j: int) -> None:
        """Rows 0..p-1 ← Sᵀ V_{0:j} (S is j × p, p ≤ j), in place, one column slice at a time."""
        S = torch.as_tensor(S).to(device=self.device, dtype=self.dtype)
        p = S.shape[1]
        n_local = self.space.n_local
        width = max(1, _SLICE_NUMBERS // max(j, 1))
        for a in range(0, n_local, width):
            b = min(n_local, a + width)
            X = torch.cat([blk[:, a:b] for _, blk in self._parts(j)])
            new = S.T @ X
            for start, blk in self._parts(p):
                blk[:, a:b] = new[start : start + len(blk)]


def lanczos_step(
    op: Operator, V: torch.Tensor | Basis, j: int, *, keep_product: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, float]:
    """One Lanczos step with full reorthogonalization: the new direction after v_j.

    .. math:: w = A v_j,\\quad h = V_{0:j}^\\top w,\\quad r = w - V_{0:j} h,\\quad \\beta = \\|r\\|

    Classical Gram–Schmidt applied twice ("twice is enough", Giraud et al. 2005), so the basis
    stays orthonormal to working precision. Shared by the thick-restart eigensolver and by the
    tridiagonalization of stochastic Lanczos quadrature. When the basis lives on another device
    than the operator (``basis_device``), v_j is moved to the operator for the product and the
    product back.

    Args:
        op: the operator (:func:`flatness.algorithms.as_operator` form).
        V: the basis rows v_0..v_j, a (rows, n) tensor or a :class:`Basis`.
        j: the index of the vector to multiply.
        keep_product: return w (else ``None``, and w is freed as soon as possible).

    Returns:
        ``(w, h, r, beta)`` with w = A v_j (on the basis device), h the coefficients of w in
        v_0..v_j (float64, CPU), r the residual direction (not normalized) and β = ‖r‖.

    Raises:
        ValueError: when the product is not finite.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import as_operator, lanczos_step
        >>> op = as_operator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> V = torch.ones(1, 3, dtype=torch.float64) / 3 ** 0.5
        >>> w, h, r, beta = lanczos_step(op, V, 0)
        >>> round(h[0].item(), 6), round(beta, 6)
        (2.0, 0.816497)
    """
    space = op.space
    basis = V if isinstance(V, Basis) else Basis.of(space, V)
    v = basis[j]
    w = op.matvec(v.to(space.device) if v.device != space.device else v)
    if w.device != basis.device:
        w = w.to(basis.device)
    h = basis.coeffs(w, j + 1)
    r = basis.combine(h, j + 1).neg_().add_(w)  # w − V h, without a third vector
    if not keep_product:
        w = None  # type: ignore[assignment]
    h2 = basis.coeffs(r, j + 1)
    r.sub_(basis.combine(h2, j + 1))
    h = h + h2
    beta = space.norm(r)
    if not (math.isfinite(beta) and bool(np.isfinite(h).all())):
        raise ValueError(
            f"matvec: the product with Lanczos vector {j} is not finite (NaN or inf); the operator "
            "overflowed or is not defined there (for a model: check the loss and its scale)"
        )
    return w, torch.from_numpy(h), r, beta


def _keep_products(keep_products: Any, m: int, space: VectorSpace) -> bool:
    if keep_products == "auto":
        size = m * space.n_local * torch.finfo(space.dtype).bits // 8
        return size <= SMALL_BYTES
    if not isinstance(keep_products, bool):
        raise TypeError(f"keep_products: expected True, False or 'auto', got {keep_products!r}")
    return keep_products


def lanczos_eigsh(
    A: Any,
    n: int | None = None,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-3,
    ncv: int | None = None,
    max_matvec: int | None = None,
    v0: torch.Tensor | None = None,
    v0_mix: float = 0.3,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    keep_products: bool | Literal["auto"] = "auto",
    min_steps: int | None = None,
    progress: ProgressArg = False,
) -> LanczosResult:
    """The k extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    .. math::
        H V_j = V_j T_j + \\beta_j v_{j+1} e_j^\\top,\\qquad
        T_j s = \\theta s,\\quad y = V_j s,\\quad
        \\|H y - \\theta y\\| \\le \\mathrm{tol}\\cdot\\max(|\\theta|, \\mathrm{tiny})

    Lanczos (1950) with full reorthogonalization (classical Gram–Schmidt, twice) and thick
    restart (Wu & Simon 2000), keeping p = k + ⌊(m − k)/2⌋ Ritz vectors per restart (m =
    ``ncv``). The residuals implied by the Lanczos relation (|β_j s_j|, Paige 1971) are checked
    after every step; once all k pass and at least ``min_steps`` steps are done (see
    :func:`default_min_steps`), the true residuals are confirmed and the pairs returned.

    Cost: one matvec per step, plus k for the confirmation unless the products are stored.
    Memory, in vectors of n numbers: j + 1 on ``basis_device`` after j steps (at most m + 1), k
    Ritz vectors, m more with ``keep_products``.

    Args:
        A: the symmetric operator: a linear operator (``matvec``, ``shape``, ``dtype``,
            ``device``), a square tensor / array, a scipy ``LinearOperator``, or a callable
            ``matvec(v) -> H v`` with ``n`` (see :func:`flatness.algorithms.as_operator`).
        n: the size of H (only for a plain callable).
        k: how many eigenpairs, 1 ≤ k < n.
        which: ``"largest"`` / ``"smallest"`` (algebraic) or ``"magnitude"`` (largest |λ|).
        tol: relative residual tolerance, > 0.
        ncv: basis size m (k < m ≤ n); default max(2k + 1, 20), or max(2k + 1, 10) when
            m + 1 vectors would take more than 256 MiB (see :func:`default_ncv`), capped at n.
        max_matvec: stop after this many products (``converged=False``); default 100·m. Without
            stored products, k of them are kept back for the final confirmation.
        v0: starting vector (default: seeded Gaussian), e.g. a previous eigenvector (a warm
            start); it is normalized and ``v0_mix`` times a seeded standard Gaussian is added.
        v0_mix: weight of that random part (default 0.3; 0 starts from v0 exactly): every
            eigendirection then starts with weight ≈ ``v0_mix`` against v0's 1, so that an
            eigenvector v0 misses (after an eigenvalue crossing) is still found.
        seed: seed of the local generator for the start (and any breakdown) vector.
        device: where and in which precision the operator's vectors live (default: the
            operator's; CPU and float64 for callables and arrays).
        dtype: as ``device``.
        basis_device: where the basis and the returned eigenvectors live (default: ``device``),
            e.g. ``"cpu"`` while the operator is on a GPU (two transfers of n numbers per step).
        keep_products: store the products H V (m more vectors) so that true residuals need no
            extra product: ``True``, ``False``, or ``"auto"`` (when they take ≤ 256 MiB).
        min_steps: steps before any pair may be accepted; default min(m, 11) for k = 1 and m
            for k > 1. Raise it (e.g. to 20) when the top eigenvalues may be a few ``tol`` apart.
        progress: ``True`` for a progress line, a callable ``(step, total, info)``, or False.

    Returns:
        :class:`LanczosResult` with eigenvalues, eigenvectors (k × n), true residuals,
        n_matvec, converged.

    Raises:
        ValueError, TypeError: for k outside [1, n), tol ≤ 0, unknown ``which``, bad ncv /
            max_matvec / v0 / v0_mix / basis_device / keep_products / min_steps, or a matvec
            returning the wrong size.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import lanczos_eigsh
        >>> H = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
        >>> res = lanczos_eigsh(H, k=2, tol=1e-8)
        >>> [round(v, 6) for v in res.eigenvalues.tolist()], res.converged
        ([30.0, 29.0], True)
    """
    op = as_operator(A, n, device=device, dtype=dtype)
    space = op.space
    n = op.n
    dtype = space.dtype
    check_positive("k", k, integer=True)
    if k >= n:
        raise ValueError(f"k: got {k}; expected 1 ≤ k < n = {n} (for all eigenvalues use a dense eigh)")
    check_which(which)
    check_positive("tol", tol)
    if ncv is None:
        m = default_ncv(k, n, space.n_local * torch.finfo(dtype).bits // 8)
    else:
        check_positive("ncv", ncv, integer=True)
        if not k < ncv <= n:
            raise ValueError(f"ncv: got {ncv}; expected k < ncv ≤ n, here {k} < ncv ≤ {n}")
        m = ncv
    bdev = resolve_basis_device(basis_device, space)
    keep_w = _keep_products(keep_products, m, space)
    reserve = 0 if keep_w else k  # products kept back for the final confirmation
    check_positive("max_matvec", max_matvec, integer=True, allow_none=True)
    check_positive("min_steps", min_steps, integer=True, allow_none=True)
    check_v0_mix(v0_mix)
    budget = 100 * m if max_matvec is None else max_matvec
    if budget < reserve + 1:
        raise ValueError(
            f"max_matvec: got {max_matvec}; without stored products (keep_products) the solver "
            f"needs at least k + 1 = {k + 1}: one Lanczos step and k products to confirm residuals"
        )
    gen = generator(seed)
    if v0 is None:
        start = space.randn(gen, 1)[0]
    else:
        if not isinstance(v0, torch.Tensor) or v0.numel() != space.n_local:
            raise ValueError(f"v0: expected a tensor of {space.n_local} numbers, got {v0!r:.60}")
        start = v0.detach().reshape(-1).to(device=space.device, dtype=dtype)
    norm0 = space.norm(start)
    if not norm0 > 0 or not math.isfinite(norm0):
        raise ValueError("v0: the starting vector must be finite and nonzero")
    if v0 is not None and v0_mix > 0:
        # Every eigendirection gets weight ≈ v0_mix next to v0's 1 (not v0_mix/√n: a unit
        # random vector would leave a crossing's new top eigenvector √n times weaker).
        start = start / norm0 + v0_mix * space.randn(gen, 1)[0]
        norm0 = space.norm(start)

    eps = torch.finfo(dtype).eps
    keep = min(k + (m - k) // 2, m - 1)
    least = default_min_steps(k, m) if min_steps is None else min(min_steps, n)
    V = Basis(space, m + 1, bdev)
    W = Basis(space, m, bdev) if keep_w else None
    # C[:, i] holds the coordinates of H v_i in the basis v_0..v_{i+1} (float64, NumPy: the
    # small dense algebra of every step costs microseconds there).
    C = np.zeros((m + 1, m))
    V[0] = (start / norm0).to(bdev)
    del start
    j = 0
    n_mv = 0
    steps = 0
    n_restarts = 0
    # After a confirmation fails, the gap between true residual and estimate it revealed
    # (e.g. a product that is not exactly linear or symmetric): added to later estimates.
    slack = 0.0
    bar = Progress(progress, total=budget, desc=f"lanczos k={k}")
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    try:
        while True:
            w, h, r, beta = lanczos_step(op, V, j, keep_product=keep_w)
            n_mv += 1
            steps += 1
            if W is not None:
                W[j] = w
            del w
            C[: j + 1, j] = h.numpy()
            C[j + 1, j] = beta
            j += 1

            T = C[:j, :j]
            theta, S = np.linalg.eigh((T + T.T) / 2)
            order = _order_np(theta, which)
            want = order[: min(k, j)]
            scale = float(np.abs(theta).max())
            tiny = eps ** (1 / 3) * scale
            floor = np.maximum(np.abs(theta[want]), tiny)
            thresh = tol * floor
            # The residual the Lanczos relation implies: ‖C s − θ [s; 0]‖ (= |β_j s_j| unrestarted).
            Sw = S[:, want]
            full = C[: j + 1, :j] @ Sw
            full[:j] -= Sw * theta[want]
            est = np.sqrt((full * full).sum(axis=0))
            # (a zero operator has floor 0 and residual 0: report 0, not 0/0)
            bar.update(1, rel_residual=float((est / np.where(floor > 0, floor, 1.0)).max()))

            invariant = beta <= eps**0.75 * max(scale, 1e-300)
            left = budget - n_mv - reserve  # Lanczos steps still affordable
            ready = j >= k and (steps >= least or j == n)
            if ready and (bool((est + slack <= thresh).all()) or left <= 0):
                vals, vecs, res, used = _confirm(op, V, W, j, theta[want], Sw)
                n_mv += used
                if used:
                    bar.update(used, confirming=True)
                best = (vals, vecs, res)
                res64 = res.double().cpu().numpy()
                if bool((res64 <= thresh).all()) or left <= 0 or j == n:
                    break
                slack = max(slack, float((res64 - est).max()))
                del vecs
                left = budget - n_mv - reserve
            if left <= 0:
                break

            if invariant:
                # An invariant subspace: continue from a fresh direction orthogonal to V.
                C[j, j - 1] = 0.0
                r = space.randn(gen, 1)[0].to(bdev)
                for _ in range(2):
                    r = r - V.combine(V.coeffs(r, j), j)
                beta = space.norm(r)
            V[j] = r.div_(beta)
            del r

            if j == m:
                p = keep
                Sp = S[:, order[:p]]
                V.rotate(Sp, m)
                V[p] = V[m]
                if W is not None:
                    W.rotate(Sp, m)
                Cn = np.zeros_like(C)
                Cn[:p, :p] = Sp.T @ C[:m, :m] @ Sp
                Cn[p, :p] = C[m, :m] @ Sp
                C = Cn
                j = p
                n_restarts += 1
    finally:
        bar.close()

    if best is None:  # the budget ran out before a confirmation
        vals, vecs, res, used = _confirm(op, V, W, j, theta[want], S[:, want])
        n_mv += used
    else:
        vals, vecs, res = best
    thresh = tol * np.maximum(np.abs(vals.double().cpu().numpy()), eps ** (1 / 3) * scale)
    return LanczosResult(
        eigenvalues=vals,
        eigenvectors=vecs,
        residuals=res,
        n_matvec=n_mv,
        converged=bool(len(vals) == k and (res.double().cpu().numpy() <= thresh).all()),
        n_restarts=n_restarts,
        which=which,
        k=k,
        tol=float(tol),
        ncv=m,
    )


def _confirm(
    op: Operator, V: Basis, W: Basis | None, j: int, theta: np.ndarray, S: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Ritz vectors y = V s (normalized) and their true residuals ‖H y − θ y‖, and products used.

    From the stored products (‖(H V) s − θ y‖) when ``W`` is given, else by one product each.
    """
    space = op.space
    Y = V.combine_many(S, j)
    vals = torch.from_numpy(np.ascontiguousarray(theta)).to(device=V.device, dtype=V.dtype)
    res = torch.empty(len(vals), dtype=V.dtype, device=V.device)
    HY = W.combine_many(S, j) if W is not None else None
    for i in range(len(vals)):
        norm = space.norm(Y[i])
        Y[i] /= norm
        if HY is not None:
            hy = HY[i] / norm
        else:
            y = Y[i]
            hy = op.matvec(y.to(space.device) if y.device != space.device else y)
            if hy.device != V.device:
                hy = hy.to(V.device)
        res[i] = space.norm(hy - vals[i] * Y[i])  # hy may be the operator's own tensor
        del hy
    return vals, Y, res, 0 if HY is not None else len(vals)


def lanczos_tridiagonal(
    op: Operator, v: torch.Tensor, steps: int, *, basis_device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``steps`` Lanczos steps from the unit vector v: the tridiagonal T as (α, β), and matvecs.

    .. math:: A V_m = V_m T_m + \\beta_m v_{m+1} e_m^\\top,\\quad
        T_m = \\mathrm{tridiag}(\\beta_{1:m-1}, \\alpha_{1:m}, \\beta_{1:m-1})

    Stops early when the Krylov space becomes invariant (β ≤ ε^¾ · max|α|). Memory: up to
    ``steps`` vectors on ``basis_device`` (default: the operator's), allocated as they are used
    (full reorthogonalization, :func:`lanczos_step`).

    Examples:
        >>> import torch
        >>> from flatness.algorithms import as_operator, lanczos_tridiagonal
        >>> op = as_operator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> v = torch.ones(3, dtype=torch.float64) / 3 ** 0.5
        >>> alpha, beta, n_matvec = lanczos_tridiagonal(op, v, 3)
        >>> T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        >>> [round(x, 6) for x in torch.linalg.eigvalsh(T).tolist()], n_matvec
        ([1.0, 2.0, 3.0], 3)
    """
    space = op.space
    eps = torch.finfo(space.dtype).eps
    V = Basis(space, steps, basis_device)
    V[0] = v
    alpha: list[float] = []
    beta: list[float] = []
    used = 0
    for j in range(steps):
        _w, h, r, b = lanczos_step(op, V, j, keep_product=False)
        used += 1
        alpha.append(float(h[j]))
        if j == steps - 1 or b <= eps**0.75 * max(abs(x) for x in [*alpha, 1e-300]):
            break
        beta.append(b)
        V[j + 1] = r.div_(b)
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64), used
