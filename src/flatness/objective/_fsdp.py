"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): a sharded objective.

A model sharded with ``fully_shard`` holds each parameter as a DTensor split along its first
dimension over the ranks of a 1-D device mesh; rank r holds rows [r·c, (r+1)·c) of every
parameter (c = ⌈rows / world⌉, ``torch.chunk``). Flattened in θ's order, the rank's part of each
parameter is a contiguous range of θ's global flat vector, so a rank's *local vector* is the
concatenation of its shards (``n_local`` numbers) and every vector of flatness's algorithms
(Lanczos bases, probes, directions) is kept as local vectors only. :class:`ShardedVectorSpace`
does their reductions (dot products and norms all-reduced over the mesh's group) and draws their
random entries for the local ranges alone.

:class:`ShardedObjective` evaluates the full-data loss, gradient and finite-difference
Hessian-vector product (H v ≈ ‖v‖ (∇L(θ + h v̂) − ∇L(θ − h v̂)) / 2h, see :mod:`flatness.objective._fd`) by
ordinary FSDP passes of the real module: the parameters' local shards are overwritten with θ's
pieces, forward and backward run as in training (all-gather, reduce-scatter), and the shards,
their ``.grad`` fields, the buffers and FSDP's gradient-reduction settings are restored
bit-exactly afterwards, also when the pass raises. No rank ever holds a full-length vector.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flatness._utils.validate import check_choice, check_loss_reduction, check_seed
from flatness.algorithms._linalg import VectorSpace
from flatness.objective import _dist
from flatness.objective._data import DataSource, batch_size_of, move_batch
from flatness.objective._fd import KinkGuard, fd_step
from flatness.objective._guard import model_guard, seed_everything
from flatness.objective._objective import BatchLoss, LossFn, NonFiniteLossError, _LossModule, _promote
from flatness.objective._params import ParamSpec, select_params

__all__ = ["ShardedObjective", "ShardedVectorSpace", "is_sharded", "make_objective", "random_direction"]

_BLOCK = 1 << 22  # random numbers are drawn this many at a time (bounded host memory)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (sharded with ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def check_not_fsdp1(model: nn.Module) -> None:
    """FSDP1 (``FullyShardedDataParallel``) flattens parameters; point to ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            "model: FullyShardedDataParallel (FSDP1) flattens the parameters into per-rank "
            "buffers; flatness supports FSDP2: shard the model with "
            "torch.distributed.fsdp.fully_shard (DTensor parameters) instead"
        )


# ---------------------------------------------------------------------------- random numbers
def _uniforms(key: int, start: int, count: int) -> np.ndarray:
    """Uniform [0, 1) doubles number start..start+count−1 of the Philox stream with ``key``."""
    bits = np.random.Philox(key=np.array([key, 0x5EED], dtype=np.uint64), counter=start // 4)
    gen = np.random.Generator(bits)
    skip = start % 4
    return gen.random(skip + count)[skip:]


def _normal_range(key: int, start: int, stop: int) -> np.ndarray:
    """Standard normal entries start..stop−1 of the vector drawn with ``key`` (Box–Muller).

    Entry e is ρ_p cos(2π u_{2p+1}) (e = 2p) or ρ_p sin(2π u_{2p+1}) (e = 2p + 1), with
    ρ_p = √(−2 ln(1 − u_{2p})) and u the Philox stream of ``key``: any range of entries is drawn
    without the others.
    """
    p0, p1 = start // 2, (stop - 1) // 2 + 1
    u = _uniforms(key, 2 * p0, 2 * (p1 - p0))
    rho = np.sqrt(-2.0 * np.log1p(-u[0::2]))
    angle = 2.0 * np.pi * u[1::2]
    z = np.empty(2 * (p1 - p0))
    z[0::2] = rho * np.cos(angle)
    z[1::2] = rho * np.sin(angle)
    return z[start - 2 * p0 : stop - 2 * p0]


def _sign_range(key: int, start: int, stop: int) -> np.ndarray:
    """Rademacher entries start..stop−1 of the vector drawn with ``key``: −1 where u < ½."""
    return np.where(_uniforms(key, start, stop - start) < 0.5, -1.0, 1.0)


class ShardedVectorSpace(VectorSpace):
    """Vectors of n numbers of which this process holds the entries in ``ranges``.

    A vector is stored as the *local vector*: its entries in the global index ranges
    ``ranges`` (sorted, disjoint), concatenated (``n_local`` numbers). Reductions (dot
    products, norms, coefficients, Gram matrices) are summed over ``group`` — all ranks
    together hold every entry once; with ``group=None`` and the one range (0, n) this is a
    single-process space with the same random vectors.

    Random vectors are drawn entry by entry from a counter-based generator (Philox, keyed by a
    number drawn from the caller's ``torch.Generator``): entry e of a draw is a function of
    (key, e) only, so each rank draws its ranges alone, in O(n_local) time and memory, and the
    vector is the same for any number of ranks. Normal entries use the Box–Muller transform of
    pairs of uniforms. (These are other numbers than :class:`VectorSpace` draws for the same
    seed: an unsharded model and a sharded one start from different random vectors.)

    Orthonormalization is Cholesky QR applied twice (CholeskyQR2; Fukaya et al. 2014), whose
    only reduction is the s×s Gram matrix.
    """

    def __init__(
        self,
        ranges: Sequence[tuple[int, int]],
        n: int,
        *,
        group: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(int(n), dtype=dtype, device=device)
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self.n_local = sum(b - a for a, b in self.ranges)
        self.group = group

    # -------------------------------------------------------------- reductions
    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over the ranks of ``t`` (a small tensor: a number, coefficients, a Gram matrix)."""
        if self.group is None:
            return t
        buf = t.detach().to(_dist._device_for(self.group, t)).clone()
        dist.all_reduce(buf, group=self.group)
        return buf.to(t.device)

    def orthonormalize(self, rows: torch.Tensor) -> torch.Tensor:
        """Orthonormal rows spanning ``rows`` by CholeskyQR2 (zero rows for a rank deficiency)."""
        Q = rows
        for _ in range(2):
            G = self.gram(Q, Q).double().cpu()
            G = (G + G.T) / 2
            chol, info = torch.linalg.cholesky_ex(G)
            if int(info) == 0:
                L = chol.to(device=Q.device, dtype=Q.dtype)
                Q = torch.linalg.solve_triangular(L, Q, upper=False, left=True)
                continue
            # Rank deficient: Q ← Λ^(-1/2) Uᵀ Q on the numerically nonzero eigenvalues.
            lam, U = torch.linalg.eigh(G)
            keep = lam > lam.max().clamp_min(0) * G.shape[0] * torch.finfo(Q.dtype).eps
            scale = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
            M = (U * scale).T.to(device=Q.device, dtype=Q.dtype)
            Q = M @ Q
        return Q

    # -------------------------------------------------------------- random vectors
    def _draw(
        self, gen: torch.Generator, rows: int | None, entries: Callable[[int, int, int], np.ndarray]
    ) -> torch.Tensor:
        count = 1 if rows is None else rows
        keys = torch.randint(0, 2**62, (count,), generator=gen, dtype=torch.int64).tolist()
        out = torch.empty(count, self.n_local, dtype=self.dtype, device=self.device)
        for r, key in enumerate(keys):
            pos = 0
            for a, b in self.ranges:
                for s in range(a, b, _BLOCK):
                    e = min(b, s + _BLOCK)
                    chunk = torch.from_numpy(entries(key, s, e))
                    out[r, pos : pos + e - s] = chunk.to(device=self.device, dtype=self.dtype)
                    pos += e - s
        return out[0] if rows is None else out

    def randn(self, gen: torch.Generator, rows: int | None = None) -> torch.Tensor:
        """This process's entries of standard normal vector(s): (n_local,) or (rows, n_local)."""
        return self._draw(gen, rows, _normal_range)

    def rademacher(self, gen: torch.Generator, rows: int | None = None) -> torch.Tensor:
        """This process's entries of Rademacher (±1) vector(s): (n_local,) or (rows, n_local)."""
        return self._draw(gen, rows, _sign_range)

    def __repr__(self) -> str:
        return f"ShardedVectorSpace(n={self.n}, n_local={self.n_local}, dtype={self.dtype}, device={self.device})"


# ---------------------------------------------------------------------------- the objective
_END = object()


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_groups(module: nn.Module) -> list[Any]:
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        one = getattr(state, "_fsdp_param_group", None)
        groups = [] if one is None else [one]
    return list(groups)


def _first_row(p: Any, world: int, rank: int) -> int:
    """The global index of the first row of this rank's shard of a Shard(0) DTensor."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0]) if len(offset) else 0
    except (ImportError, TypeError):  # pragma: no cover - torch.chunk's split, as DTensor's
        per_rank = -(-p.shape[0] // world)
        return min(per_rank * rank, p.shape[0])


class ShardedObjective:
    """The loss of an FSDP2-sharded model as functions of θ's local shards.

    .. math::
        L(\\theta) = \\frac{\\sum_r \\sum_b m_b \\ell_b(\\theta)}{\\sum_r \\sum_b m_b},\\qquad
        \\nabla^2 L\\, v \\approx \\|v\\| \\frac{\\nabla L(\\theta + h\\hat v)
        - \\nabla L(\\theta - h\\hat v)}{2h}

    with each rank r holding a shard of the data (as in DDP training) and of every parameter.
    Vectors (θ, v, gradients) are *local vectors*: this rank's shards of the chosen
    parameters, flattened and concatenated (``n_local`` numbers; see :class:`ShardedVectorSpace`,
    ``self.space``). Every pass is an ordinary FSDP forward (and backward) of the model with
    its shards set to θ's; all ranks must call every method together. Ranks with fewer batches
    take part in the others' extra steps with zero weight, so the collectives stay matched.
    Every pass goes through one process's replay check (each rank's pass against its first,
    :meth:`flatness.objective._data.DataSource.end_pass`), agreed over the ranks in the pass's reduction.

    Args:
        model: a model sharded with ``fully_shard`` on a 1-D device mesh (DTensor parameters).
        loss_fn, data, batch_loss, params, reduction, train, max_batches, batch_size,
        data_seed: as for :class:`flatness.Objective`.
        dtype: must be None (an FSDP model computes in its own, or its mixed-precision, dtype).
        hvp_mode: ``"auto"`` or ``"finite_difference"`` (the only mode for sharded models).
        process_group: ignored beyond a check: the reductions use the mesh's group.

    Raises:
        TypeError, ValueError: naming the argument, for bad input or unsupported sharding.
            A pass raises the ``data`` ValueError on every rank when any rank's pass over its
            data differs from its first.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Any = None,
        *,
        batch_loss: BatchLoss | None = None,
        params: ParamSpec = None,
        reduction: str = "mean",
        train: bool = False,
        max_batches: int | None = None,
        batch_size: Callable[[Any], int] | None = None,
        dtype: torch.dtype | None = None,
        hvp_mode: str = "auto",
        data_seed: int = 0,
        process_group: Any = None,
    ) -> None:
        from torch.distributed.tensor import Shard

        dtensor = _dtensor_type()
        if (loss_fn is None) == (batch_loss is None):
            raise TypeError(
                "loss_fn / batch_loss: pass exactly one: loss_fn(outputs, targets) or "
                "batch_loss(model, batch)"
            )
        check_choice("reduction", reduction, ("mean", "sum"))
        check_loss_reduction(loss_fn, reduction)
        check_choice("hvp_mode", hvp_mode, ("auto", "forward", "reverse", "finite_difference"))
        if hvp_mode in ("forward", "reverse"):
            raise ValueError(
                f"hvp_mode: {hvp_mode!r} is not possible for a model sharded with fully_shard "
                "(double backward through FSDP's collectives); use 'auto' or 'finite_difference'"
            )
        if dtype is not None:
            raise ValueError(
                "dtype: not supported for a model sharded with fully_shard; it computes in its "
                "parameters' (or its MixedPrecisionPolicy's) dtype"
            )
        data_seed = check_seed(data_seed, "data_seed")
        self.model = model
        self._options = {
            "loss_fn": loss_fn,
            "batch_loss": batch_loss,
            "reduction": reduction,
            "train": train,
            "max_batches": max_batches,
            "batch_size": batch_size,
            "hvp_mode": hvp_mode,
            "data_seed": data_seed,
        }
        self.data = DataSource(data, max_batches=max_batches)
        self.reduction = reduction
        self.train = bool(train)
        self.data_seed = data_seed
        self.hvp_mode = hvp_mode
        self._size_fn = batch_size
        self._module = _LossModule(model, loss_fn, batch_loss)

        chosen = select_params(model, params)
        not_sharded = [n for n, p in chosen if not isinstance(p, dtensor)]  # type: ignore[arg-type]
        if not_sharded:
            raise ValueError(
                f"params: {not_sharded[:3]} are not sharded (plain tensors) while others are "
                "DTensors; apply fully_shard to the root module so that every parameter is sharded"
            )
        mesh = chosen[0][1].device_mesh  # type: ignore[attr-defined]
        for n, p in chosen:
            if p.device_mesh != mesh or p.device_mesh.ndim != 1:  # type: ignore[attr-defined]
                raise ValueError(
                    f"model: parameter {n!r} is on a device mesh of {p.device_mesh.ndim} dims "  # type: ignore[attr-defined]
                    "or on another mesh; flatness supports fully_shard on one 1-D mesh (no HSDP / "
                    "tensor parallelism)"
                )
            if tuple(p.placements) != (Shard(0),):  # type: ignore[attr-defined]
                raise ValueError(
                    f"model: parameter {n!r} has placements {p.placements}; expected (Shard(dim=0),) "  # type: ignore[attr-defined]
                    "as fully_shard makes by default"
                )
            if not p.is_floating_point():
                raise TypeError(f"params: parameter {n!r} has dtype {p.dtype}; expected floating")
        self._group = mesh.get_group()
        if process_group is not None and process_group is not self._group:
            if dist.get_world_size(process_group) != dist.get_world_size(self._group):
                raise ValueError(
                    "process_group: differs from the FSDP mesh's group; the data must be sharded "
                    "over the same ranks as the parameters"
                )
        self._world = dist.get_world_size(self._group)
        self._params = [p for _, p in chosen]
        self._chosen_ids = {id(p) for p in self._params}
        self.names = [n for n, _ in chosen]
        self.shapes = [p.shape for p in self._params]
        self.numels = [p.numel() for p in self._params]
        self.n = sum(self.numels)
        with torch.no_grad():
            self._locals = [p.to_local() for p in self._params]  # type: ignore[attr-defined]
        self.local_shapes = [t.shape for t in self._locals]
        self.local_numels = [t.numel() for t in self._locals]
        self.n_local = sum(self.local_numels)
        ranges = []
        offset = 0
        for p, loc in zip(self._params, self._locals, strict=True):
            # Dim-0 sharding: the local shard is rows [first_row, first_row + rows) of p.
            first_row = _first_row(p, self._world, dist.get_rank(self._group))
            if loc.numel():
                start = offset + first_row * (math.prod(p.shape[1:]) if p.ndim > 1 else 1)
                ranges.append((start, start + loc.numel()))
            offset += p.numel()
        self.device = self._locals[0].device
        self.dtype = _promote([t.dtype for t in self._locals])
        self._compute_dtypes = self._find_compute_dtypes()
        self.space = ShardedVectorSpace(
            ranges, self.n, group=self._group, device=self.device, dtype=self.dtype
        )
        with torch.no_grad():
            self.theta0 = torch.cat([t.detach().reshape(-1).to(self.dtype) for t in self._locals])
        sizes = torch.tensor([float(self.n)], dtype=torch.float64)
        if float(self.space.reduce(sizes)) != self.n * self._world:
            raise ValueError(
                "params: ranks disagree on the parameters chosen; every rank needs the same model"
            )
        self.n_loss = 0
        self.n_grad = 0
        self.n_hvp = 0
        self.n_passes = 0
        self.last_vectorized: bool | None = False
        eps = max(torch.finfo(d).eps for d in self._compute_dtypes)
        self._kinks = KinkGuard(self.space.norm, eps, sharded=True)  # see flatness.objective._fd
        self._buffers = dict(model.named_buffers())

    def _find_compute_dtypes(self) -> list[torch.dtype]:
        out = []
        for m in _fsdp_modules(self.model):
            policy = getattr(m._get_fsdp_state(), "_mp_policy", None)  # type: ignore[operator]
            if policy is not None and policy.param_dtype is not None:
                out.append(policy.param_dtype)
        return out or [t.dtype for t in self._locals]

    hvp_mode_used = "finite_difference"

    def with_params(self, params: ParamSpec) -> ShardedObjective:
        """The same model, loss, data and options with θ restricted to another selection."""
        return ShardedObjective(self.model, data=self.data.source, params=params, **self._options)

    # ------------------------------------------------------------------ vectors
    def _as_vector(self, v: Any, name: str) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor (this rank's local vector), got {type(v).__name__}"
            )
        if v.ndim != 1 or v.shape[0] != self.n_local:
            raise ValueError(
                f"{name}: got shape {tuple(v.shape)}; expected this rank's local vector of shape "
                f"({self.n_local},) (its shards of the {self.n} parameters)"
            )
        return v.detach().to(device=self.device, dtype=self.dtype)

    def _theta(self, theta: Any) -> torch.Tensor:
        return self.theta0 if theta is None else self._as_vector(theta, "theta")

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """A local vector as this rank's shards, keyed like ``named_parameters``."""
        theta = self._as_vector(theta, "theta")
        pieces = torch.split(theta, self.local_numels)
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.local_shapes, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's shards (local shapes, or DTensors) keyed by name, as a local vector."""
        dtensor = _dtensor_type()
        out = []
        for n, s in zip(self.names, self.local_shapes, strict=True):
            if n not in tensors:
                raise ValueError(f"dict keys do not match the parameters: missing {n!r}")
            t = tensors[n]
            if dtensor is not None and isinstance(t, dtensor):
                t = t.to_local()
            t = torch.as_tensor(t)
            if t.shape != s:
                raise ValueError(
                    f"tensor {n!r} has shape {tuple(t.shape)}; expected this rank's shard {tuple(s)}"
                )
            out.append(t.reshape(-1).to(device=self.device, dtype=self.dtype))
        return torch.cat(out)

    def fd_step(self, theta: Any = None) -> float:
        """h = ε^(1/3) · max(1, ‖θ‖/√n), ε of the dtype the model computes in."""
        eps = max(torch.finfo(d).eps for d in self._compute_dtypes)
        return fd_step(self.space.norm(self._theta(theta)), self.n, eps)

    # ------------------------------------------------------------------ passes
    def _reshard(self) -> None:
        # The root module keeps its gathered parameters after a forward (reshard_after_forward
        # is False for the root): free them so that the next forward gathers the shards again.
        for m in _fsdp_modules(self.model):
            m.reshard()  # type: ignore[operator]

    def _write(self, theta: torch.Tensor) -> None:
        self._reshard()
        with torch.no_grad():
            for loc, piece in zip(self._locals, torch.split(theta, self.local_numels), strict=True):
                loc.copy_(piece.view(loc.shape))

    @contextlib.contextmanager
    def _session(self, with_grad: bool) -> Iterator[None]:
        """Guards, seeded data, and bit-exact restoration of shards, grads, buffers, settings."""
        params = list(self.model.parameters())
        with model_guard(self.model):
            self.model.train(self.train)
            saved_data = self.data.save_generators()
            # FSDP may re-point a parameter's local tensor (lazy initialization re-pads the
            # shards): fetch the views afresh for every pass.
            self._reshard()
            with torch.no_grad():
                self._locals = [p.to_local() for p in self._params]  # type: ignore[attr-defined]
            # The shards are restored from θ₀ when they still equal it (no copy), else a copy.
            with torch.no_grad():
                pieces = torch.split(self.theta0, self.local_numels)
                same = all(
                    loc.dtype == self.dtype and torch.equal(loc.reshape(-1), piece)
                    for loc, piece in zip(self._locals, pieces, strict=True)
                )
                saved_params = None if same else [loc.clone() for loc in self._locals]
            saved_grads = [p.grad for p in params]
            saved_buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
            settings = []
            if with_grad:
                for m in _fsdp_modules(self.model):
                    for pg in _param_groups(m):
                        names = ("reduce_grads", "all_reduce_grads", "gradient_divide_factor")
                        settings.append((pg, {k: getattr(pg, k) for k in names if hasattr(pg, k)}))
                        # Gradients reduce-scattered and averaged over the ranks, as in training.
                        for k, value in (("reduce_grads", True), ("all_reduce_grads", True)):
                            if hasattr(pg, k):
                                setattr(pg, k, value)
                        if hasattr(pg, "gradient_divide_factor"):
                            pg.gradient_divide_factor = None
            try:
                for p in params:
                    p.grad = None
                seed_everything(self.data_seed)
                yield
            finally:
                with torch.no_grad():
                    if saved_params is None:
                        for loc, piece in zip(self._locals, pieces, strict=True):
                            loc.copy_(piece.view(loc.shape))
                    else:
                        for loc, old in zip(self._locals, saved_params, strict=True):
                            loc.copy_(old)
                    for b, old in saved_buffers:
                        b.copy_(old)
                for p, g in zip(params, saved_grads, strict=True):
                    p.grad = g
                for pg, values in settings:
                    for k, value in values.items():
                        setattr(pg, k, value)
                self._reshard()
                self.data.restore_generators(saved_data)

    def _steps(self) -> Iterator[tuple[Any, int, bool]]:
        """(batch, size, real) per step; ranks out of batches replay their last one (weight 0).

        Fetching a batch and reading its size happen before the step's collective, and an error
        there (the loader's own, or a batch ``batch_size`` refuses) is agreed over the ranks in
        it: every rank raises, none is left waiting in the next collective.
        """
        it = iter(self.data)
        last = None
        first = True
        while True:
            error: Exception | None = None
            size = 0
            try:
                batch = next(it, _END)
                if batch is not _END:
                    size = batch_size_of(batch, self._size_fn)
            except Exception as e:  # raised below, on every rank together
                error, batch = e, _END
            have = batch is not _END
            flags = self.space.reduce(
                torch.tensor([float(have), float(error is not None)], dtype=torch.float64)
            )
            count, n_error = round(float(flags[0])), round(float(flags[1]))
            if error is not None:
                raise error
            if n_error:
                raise ValueError(
                    f"data: fetching a batch, or reading its size, failed on {n_error} other rank(s), "
                    "whose error names the cause and the fix"
                )
            if first and count < self._world:
                missing = self._world - count
                raise ValueError(
                    f"data: the data yielded no batches on {missing} rank(s); every rank needs a shard"
                )
            first = False
            if count == 0:
                return
            if have:
                last = move_batch(batch, self.device, None)
                yield last, size, True
            else:
                yield last, 0, False

    def _loss_of(self, batch: Any) -> torch.Tensor:
        loss = self._module(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            name = "loss_fn" if self._module._batch_loss is None else "batch_loss"
            raise ValueError(f"{name}: the loss of a batch must be a tensor holding one number")
        return loss.reshape(())

    def _finish(self, total: torch.Tensor, size: int, bad: bool, what: str) -> tuple[torch.Tensor, float]:
        """After a complete pass: sum (losses, sizes, flags) over ranks; raise together if any is bad.

        Runs the replay check of one process (:meth:`DataSource.end_pass`: this pass against
        the first, by fingerprints) on every rank, and raises on all ranks when any rank's
        pass differs, before the non-finite check (``bad``).
        """
        differs = self.data.end_pass()
        flags = [float(size), float(bad), float(differs is not None)]
        head = torch.cat([total.double().cpu().reshape(-1), torch.tensor(flags, dtype=torch.float64)])
        head = self.space.reduce(head)
        self.n_passes += 1
        self.data.check_replay(differs, round(float(head[-1])))
        if float(head[-2]):
            raise NonFiniteLossError(f"the {what} is not finite (on {round(float(head[-2]))} rank(s))")
        count = float(head[-3])
        scale = 1.0 / count if self.reduction == "mean" else 1.0
        return head[:-3] * scale, scale

    def _grad_pass(self, theta: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=torch.float64)
        size = 0
        with self._session(with_grad=True):
            self._write(theta)
            bad = False
            for batch, m, real in self._steps():
                with torch.enable_grad():
                    loss = self._loss_of(batch)
                    w = (float(m) if self.reduction == "mean" else 1.0) if real else 0.0
                    (loss * w).backward()
                if real:
                    value = loss.detach().double().cpu()
                    bad = bad or not bool(torch.isfinite(value))
                    total = total + w * value
                    size += m
            pieces = []
            for p, loc in zip(self._params, self._locals, strict=True):
                g = p.grad
                g = torch.zeros_like(loc) if g is None else g.to_local().detach()  # type: ignore[attr-defined]
                pieces.append(g.reshape(-1).to(self.dtype))
            grad = torch.cat(pieces)  # one copy; the .grad fields are restored below
            del pieces
            bad = bad or not bool(torch.isfinite(grad).all())
        loss, scale = self._finish(total, size, bad, what)
        # FSDP averages the reduce-scattered gradient over the ranks: undo that, then weight.
        return loss[0], grad.mul_(self._world * scale)

    def loss(self, theta: Any = None) -> torch.Tensor:
        """L(θ) over one full pass of every rank's data (a 0-d float64 tensor)."""
        theta = self._theta(theta)
        total = torch.zeros((), dtype=torch.float64)
        size = 0
        bad = False
        with self._session(with_grad=False), torch.no_grad():
            self._write(theta)
            for batch, m, real in self._steps():
                loss = self._loss_of(batch)
                if real:
                    value = loss.double().cpu()
                    bad = bad or not bool(torch.isfinite(value))
                    total = total + (float(m) if self.reduction == "mean" else 1.0) * value
                    size += m
        self.n_loss += 1
        return self._finish(total, size, bad, "loss")[0][0]

    def loss_and_grad(self, theta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ), this rank's shard of ∇L(θ)) over one full pass."""
        self.n_grad += 1
        return self._grad_pass(self._theta(theta), "gradient")

    def grad(self, theta: Any = None) -> torch.Tensor:
        """This rank's shard of ∇L(θ)."""
        return self.loss_and_grad(theta)[1]

    def hvp(self, v: Any, theta: Any = None) -> torch.Tensor:
        """This rank's shard of ‖v‖ (∇L(θ + h v̂) − ∇L(θ − h v̂)) / 2h (two FSDP gradient passes)."""
        v = self._as_vector(v, "v")
        theta = self._theta(theta)
        vnorm = self.space.norm(v)
        if not math.isfinite(vnorm):
            raise ValueError("v: the vector has non-finite entries")
        self.n_hvp += 1
        if vnorm == 0.0:
            return torch.zeros_like(theta)
        h = self.fd_step(theta)
        what = "finite-difference Hessian-vector product"
        point = torch.add(theta, v, alpha=h / vnorm)  # θ + h v̂, then θ − h v̂ in the same buffer
        _, g_plus = self._grad_pass(point, what)
        torch.add(theta, v, alpha=-h / vnorm, out=point)
        _, g_minus = self._grad_pass(point, what)
        del point
        g_plus.sub_(g_minus)
        # The non-smoothness guard (flatness.objective._fd.KinkGuard), as in the one-process product.
        if not self._kinks.warned:
            g0 = self._kinks.base_gradient(theta, self.grad)
            self._kinks.check(g_minus.mul_(2.0).add_(g_plus).sub_(g0, alpha=2.0), g_plus)
        return g_plus.mul_(vnorm / (2.0 * h))

    # ------------------------------------------------------------------ many points
    def evaluate_many(
        self,
        thetas: Any,
        *,
        directions: Any = None,
        origin: Any = None,
        buffers: dict[str, torch.Tensor] | None = None,
        metrics: dict[str, Callable[[Any, Any], Any]] | None = None,
        vectorize: Any = "auto",
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L(θ_i) and metrics at k points in one pass: each batch is evaluated at every point.

        ``thetas`` is a (k, n_local) matrix of local vectors or, with ``directions`` (r, n_local),
        (k, r) coordinates: θ_i = origin + Σ_j c_ij d_j. Per-point ``buffers`` (replicated, not
        sharded) are written into the model's buffers for each point. Points are evaluated one
        after another (``vectorize`` and ``chunk_size`` are accepted and ignored).
        """
        del vectorize, chunk_size
        thetas = torch.as_tensor(thetas)
        if thetas.ndim != 2 or thetas.shape[0] == 0:
            raise ValueError(f"thetas: got shape {tuple(thetas.shape)}; expected (k, ...) with k >= 1")
        if directions is None:
            if thetas.shape[1] != self.n_local:
                raise ValueError(f"thetas: got shape {tuple(thetas.shape)}; expected (k, {self.n_local})")
            dirs, base = None, None
            points = thetas.to(device=self.device, dtype=self.dtype)
        else:
            dirs = torch.as_tensor(directions).to(device=self.device, dtype=self.dtype)
            if dirs.ndim != 2 or dirs.shape[1] != self.n_local or thetas.shape[1] != dirs.shape[0]:
                raise ValueError(
                    f"directions: got shape {tuple(dirs.shape)} with coordinates {tuple(thetas.shape)}; "
                    f"expected (r, {self.n_local}) and (k, r)"
                )
            base = self.theta0 if origin is None else self._as_vector(origin, "origin")
            points = thetas.detach().cpu().double()
        k = thetas.shape[0]
        metrics = dict(metrics or {})
        names = list(metrics)
        if names and self._module._batch_loss is not None:
            raise TypeError(
                "metrics: metrics need model outputs, which the batch_loss path does not expose; "
                "pass loss_fn(outputs, targets) instead of batch_loss to use metrics"
            )
        bufs = {}
        for name, value in (buffers or {}).items():
            if name not in self._buffers:
                raise ValueError(f"buffers: unknown buffer {name!r}")
            bufs[name] = torch.as_tensor(value).to(self._buffers[name].device, self._buffers[name].dtype)
        width = 1 + len(names)
        totals = torch.zeros(k, width, dtype=torch.float64)
        size = 0
        work = torch.empty(self.n_local, dtype=self.dtype, device=self.device)
        fresh = [(b, b.detach().clone()) for b in self._buffers.values()]
        with self._session(with_grad=False), torch.no_grad():
            for batch, m, real in self._steps():
                rng = torch.random.get_rng_state() if self.train and k > 1 else None
                for i in range(k):
                    if dirs is None:
                        work.copy_(points[i])
                    else:
                        work.copy_(base)  # type: ignore[arg-type]
                        for j in range(dirs.shape[0]):
                            work.add_(dirs[j], alpha=float(points[i, j]))
                    self._write(work)
                    if self.train:
                        for b, old in fresh:
                            b.copy_(old)
                    for name, value in bufs.items():
                        self._buffers[name].copy_(value[i])
                    if rng is not None:
                        torch.random.set_rng_state(rng)
                    if names:
                        inputs, targets = batch
                        outputs = self.model(inputs)
                        row = [self._module._loss_fn(outputs, targets)]  # type: ignore[misc]
                        row += [metrics[name](outputs, targets) for name in names]
                    else:
                        row = [self._loss_of(batch)]
                    if real:
                        w = float(m) if self.reduction == "mean" else 1.0
                        values = torch.tensor([float(x) for x in row], dtype=torch.float64)
                        totals[i] += w * values
                if real:
                    size += m
        # Non-finite values are returned as they are (landscape grids keep NaN): bad=False.
        sums, _ = self._finish(totals.reshape(-1), size, False, "loss")
        self.n_loss += k
        table = sums.reshape(k, width).to(self.dtype)
        return table[:, 0].clone(), {m: table[:, j + 1].clone() for j, m in enumerate(names)}

    def __repr__(self) -> str:
        return (
            f"ShardedObjective(n={self.n}, n_local={self.n_local}, dtype={self.dtype}, "
            f"device={self.device}, world={self._world})"
        )


# ---------------------------------------------------------------------------- model-level helpers
def make_objective(model: nn.Module, loss_fn: Any = None, data: Any = None, **options: Any) -> Any:
    """:class:`ShardedObjective` for a model sharded with ``fully_shard``, else :class:`Objective`."""
    from flatness.objective._objective import Objective

    check_not_fsdp1(model)
    if is_sharded(model):
        return ShardedObjective(model, loss_fn, data, **options)
    return Objective(model, loss_fn, data, **options)


def unsupported(what: str, model: nn.Module, hint: str = "") -> None:
    """Raise a ValueError naming ``what`` if ``model`` is sharded (a feature not available there)."""
    if is_sharded(model):
        raise ValueError(
            f"{what}: not available for a model sharded with fully_shard (DTensor parameters)"
            + (f"; {hint}" if hint else "")
        )


def normalize_local(
    obj: ShardedObjective, direction: torch.Tensor, normalization: str | None, ignore_1d: bool
) -> dict[str, torch.Tensor]:
    """Filter / layer normalization of a local direction vector, as this rank's shards.

    Dim-0 sharding keeps every filter (a first-axis slice) whole on one rank, so filter norms
    are local; layer norms and 1-D tensors (when kept) need the norm over all ranks.
    """
    d = obj.unflatten(direction)
    w = obj.unflatten(obj.theta0)
    out = {}
    for name, shape in zip(obj.names, obj.shapes, strict=True):
        di, wi = d[name], w[name]
        if len(shape) <= 1:
            if ignore_1d:
                out[name] = torch.zeros_like(di)
                continue
            if normalization is None:
                out[name] = di.clone()
                continue
        if normalization is None:
            out[name] = di.clone()
        elif normalization == "filter" and len(shape) > 1:
            dims = tuple(range(1, di.ndim))
            wn = torch.linalg.vector_norm(wi, dim=dims, keepdim=True)
            dn = torch.linalg.vector_norm(di, dim=dims, keepdim=True)
            out[name] = di * (wn / (dn + 1e-10))
        else:  # layer, or a kept 1-D tensor: one norm over all ranks
            norms = torch.stack([wi.double().square().sum(), di.double().square().sum()])
            wn, dn = obj.space.reduce(norms).sqrt().tolist()
            out[name] = di * (wn / (dn + 1e-10))
    return out


def random_direction(
    obj: ShardedObjective, *, normalization: str | None, ignore_1d: bool, seed: int
) -> dict[str, torch.Tensor]:
    """A seeded Gaussian direction of a sharded model, as this rank's shards, normalized.

    Drawn by the objective's :class:`ShardedVectorSpace` (the same vector for any number of
    ranks; other numbers than the unsharded :func:`flatness.random_direction` for this seed).
    """
    gen = torch.Generator().manual_seed(check_seed(seed))
    return normalize_local(obj, obj.space.randn(gen), normalization, ignore_1d)
