"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): the sharded backend.

A model sharded with ``fully_shard`` holds each parameter as a DTensor split along its first
dimension over the ranks of a 1-D device mesh; rank r holds rows [r·c, (r+1)·c) of every
parameter (c = ⌈rows / world⌉, ``torch.chunk``). Flattened in θ's order, the rank's part of each
parameter is a contiguous range of θ's global flat vector, so a rank's *local vector* is the
concatenation of its shards (``n_local`` numbers) and every vector of flatness's algorithms
(Lanczos bases, probes, directions) is kept as local vectors only. :class:`ShardedVectorSpace`
does their reductions (dot products and norms all-reduced over the mesh's group) and draws their
random entries for the local ranges alone.

:class:`FSDPBackend` is the :class:`flatness.objective._backend.Backend` of such a model: every
pass is an ordinary FSDP pass of the real module (the parameters' local shards overwritten with
θ's pieces, forward and backward as in training: all-gather, reduce-scatter), and the shards,
their ``.grad`` fields, the buffers and FSDP's gradient-reduction settings are restored
bit-exactly afterwards, also when the pass raises. No rank ever holds a full-length vector.
Hessian-vector products are finite differences of these gradients (double backward through
FSDP's collectives is not possible); the GGN, the Fisher, ``dtype=`` and kept graphs are not
available (:attr:`FSDPBackend.capabilities`), and :class:`flatness.Objective` refuses them by name.
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

from flatness._utils.compat import fsdp_mp_policy, fsdp_state_param_groups, shard_first_row
from flatness.algorithms._linalg import VectorSpace
from flatness.objective import _dist
from flatness.objective._backend import ACCUMULATED, Accumulated, Backend, Swap, _promote
from flatness.objective._data import DataSource, batch_size_of, move_batch
from flatness.objective._guard import model_guard
from flatness.objective._loss import LossModule, scalar_loss
from flatness.objective._params import ParamSpec, select_params

__all__ = ["FSDPBackend", "ShardedVectorSpace", "check_not_fsdp1", "is_sharded"]

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

    def norm64(self, a: torch.Tensor) -> float:
        """‖a‖₂ over every rank, accumulated in float64."""
        return math.sqrt(float(self.reduce(a.double().square().sum().reshape(1))))

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

    def basis(self, i: int) -> torch.Tensor:
        """This rank's entries of e_i (zeros unless i is in one of its ranges)."""
        e = torch.zeros(self.n_local, dtype=self.dtype, device=self.device)
        pos = 0
        for a, b in self.ranges:
            if a <= i < b:
                e[pos + i - a] = 1
            pos += b - a
        return e

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The whole (n, m) matrix on every rank: each rank's rows put in place, summed over ranks."""
        full = torch.zeros(self.n, rows.shape[1], dtype=rows.dtype, device=rows.device)
        pos = 0
        for a, b in self.ranges:
            full[a:b] = rows[pos : pos + b - a]
            pos += b - a
        return self.reduce(full)

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


_END = object()


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class FSDPBackend(Backend):
    """θ as this rank's shards of an FSDP2 model; passes are FSDP forward / backward passes.

    Each rank holds a shard of the data (as in DDP training) and of every parameter; all ranks
    must call every method together. Ranks with fewer batches take part in the others' extra
    steps with zero weight, so the collectives stay matched; an error fetching a batch on one
    rank is agreed over the ranks in the step's collective (every rank raises).
    """

    capabilities = frozenset()
    description = "a model sharded with fully_shard"

    def __init__(
        self, model: nn.Module, module: LossModule, *, params: ParamSpec, process_group: Any
    ) -> None:
        from torch.distributed.tensor import Shard

        dtensor = _dtensor_type()
        self.model = model
        self.module = module
        self._spec = (params, process_group)
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
        self.group = mesh.get_group()
        if process_group is not None and process_group is not False and process_group is not self.group:
            if dist.get_world_size(process_group) != dist.get_world_size(self.group):
                raise ValueError(
                    "process_group: differs from the FSDP mesh's group; the data must be sharded "
                    "over the same ranks as the parameters (omit process_group)"
                )
        if process_group is False:
            raise ValueError(
                "process_group: False (this rank's data alone) is not possible for a model sharded "
                "with fully_shard, whose every pass is collective; omit process_group"
            )
        self._world = dist.get_world_size(self.group)
        self._params = [p for _, p in chosen]
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
            first_row = shard_first_row(p, self._world, dist.get_rank(self.group))
            if loc.numel():
                start = offset + first_row * (math.prod(p.shape[1:]) if p.ndim > 1 else 1)
                ranges.append((start, start + loc.numel()))
            offset += p.numel()
        self.device = self._locals[0].device
        self.dtype = _promote([t.dtype for t in self._locals])
        compute = []
        for m in _fsdp_modules(model):
            policy = fsdp_mp_policy(m)
            if policy is not None and policy.param_dtype is not None:
                compute.append(policy.param_dtype)
        self.eps = max(torch.finfo(d).eps for d in (compute or [t.dtype for t in self._locals]))
        self.space = ShardedVectorSpace(
            ranges, self.n, group=self.group, device=self.device, dtype=self.dtype
        )
        with torch.no_grad():
            self.theta0 = torch.cat([t.detach().reshape(-1).to(self.dtype) for t in self._locals])
        sizes = torch.tensor([float(self.n)], dtype=torch.float64)
        if float(self.space.reduce(sizes)) != self.n * self._world:
            raise ValueError(
                "params: ranks disagree on the parameters chosen; every rank needs the same model"
            )
        self.buffers = dict(model.named_buffers())

    def with_params(self, params: ParamSpec) -> FSDPBackend:
        return FSDPBackend(self.model, self.module, params=params, process_group=self._spec[1])

    # ------------------------------------------------------------------ vectors
    def as_vector(self, v: Any, name: str) -> torch.Tensor:
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
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

    # ------------------------------------------------------------------ writing θ
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

    # ------------------------------------------------------------------ one batch
    def batch_loss(self, theta: torch.Tensor, batch: Any) -> torch.Tensor:
        self._write(theta)
        with torch.no_grad():
            return scalar_loss(self.module, self.module(batch))

    def batch_grad(self, theta: torch.Tensor, batch: Any, weight: float) -> tuple[torch.Tensor, Accumulated]:
        """ℓ_b(θ); w ∇ℓ_b(θ) goes to the ``.grad`` fields (reduce-scattered over the ranks)."""
        self._write(theta)
        with torch.enable_grad():
            loss = scalar_loss(self.module, self.module(batch))
            (loss * weight).backward()
        return loss.detach(), ACCUMULATED

    def take_gradient(self, out: torch.Tensor) -> torch.Tensor:
        """Σ_b w_b ∇ℓ_b(θ) over every rank's batches of this pass into ``out``: this rank's shard.

        Each ``.grad`` is cleared once read (the pass's session restores the user's afterwards).
        """
        pos = 0
        for p, k in zip(self._params, self.local_numels, strict=True):
            g = p.grad
            if g is None:
                out[pos : pos + k].zero_()
            else:
                out[pos : pos + k].copy_(g.to_local().reshape(-1))  # type: ignore[attr-defined]
            p.grad = None
            pos += k
        # FSDP averages the reduce-scattered gradient over the ranks: undo that.
        return out.mul_(self._world)

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def session(self, train: bool, *, with_grad: bool) -> Iterator[None]:
        """Guards and bit-exact restoration of shards, grads, buffers and FSDP's settings."""
        params = list(self.model.parameters())
        with model_guard(self.model):
            self.model.train(train)
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
                    for pg in fsdp_state_param_groups(m):
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

    def steps(
        self, data: DataSource, size_fn: Callable[[Any], int] | None
    ) -> Iterator[tuple[Any, int, bool]]:
        """(batch, size, real) per step; ranks out of batches replay their last one (weight 0).

        Whether each rank still has a batch is agreed in one small all-reduce per step; an
        error there (the loader's own, or a batch ``batch_size`` refuses) is agreed over the
        ranks in it: every rank raises, none is left waiting in the next collective.
        """
        it = iter(data)
        last = None
        first = True
        while True:
            error: Exception | None = None
            size = 0
            try:
                batch = next(it, _END)
                if batch is not _END:
                    size = batch_size_of(batch, size_fn)
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

    @contextlib.contextmanager
    def swapped(self, work: torch.Tensor) -> Iterator[Swap]:
        # The shards are the model's own (restored by the session): refilling writes them.
        yield Swap(lambda: self._write(work), self.buffers)
