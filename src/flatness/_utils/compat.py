"""The one module of flatness that touches private APIs of torch and scipy.

Every function here wraps one private name, says which versions it was checked on, and either
falls back to a public equivalent or raises a :class:`RuntimeError` that names the missing API,
so that a torch or scipy release that moves it fails loudly here rather than silently elsewhere.
``tests/test_compat.py`` checks each function against the behaviour it wraps.

Checked on torch 2.13 and scipy 1.17; each function says what it does on other versions.

The BLAS thread limit is :func:`single_threaded_blas`, a thin wrapper of the maintained
``threadpoolctl`` (public API).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from torch import nn

__all__ = [
    "fsdp_mp_policy",
    "fsdp_state_param_groups",
    "is_conv",
    "lbfgsb_kernel",
    "reparametrize",
    "shard_first_row",
    "single_threaded_blas",
    "tree_flatten",
    "tree_unflatten",
]


def _missing(api: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"flatness needs {api} ({what}), which this torch {torch.__version__} does not have (flatness "
        "was checked on torch 2.13). Install that torch version, or report this on the flatness "
        "issue tracker with your torch version."
    )


# --------------------------------------------------------------------------- BLAS threads
@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit every loaded BLAS thread pool to one thread inside the block; restore on exit.

    scipy's L-BFGS-B calls BLAS level-1 routines on vectors of length n; OpenBLAS threads them
    for large n and its worker threads then spin on the cores torch uses for the next pass
    (10-20 % of a sharpness run on 2 cores). ``threadpoolctl.threadpool_limits(limits=1,
    user_api="blas")`` (public API, threadpoolctl >= 3.1) restores the previous counts on exit,
    also when the block raises.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# --------------------------------------------------------------------------- torch.nn
try:  # torch >= 2.0: what torch.func.functional_call runs
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:  # pragma: no cover - a torch that moved it
    _reparametrize_module = None


@contextlib.contextmanager
def reparametrize(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run ``module`` with the tensors of ``state`` in place of its parameters and buffers.

    Wraps the private ``torch.nn.utils.stateless._reparametrize_module(module, state,
    tie_weights=False, strict=False)``: the context manager that
    :func:`torch.func.functional_call` enters around one call. As a context manager it lets
    several forward passes (and a backward through them) share one swap. Names missing from
    ``state`` keep the module's own tensors; the originals are back on exit, also when the block
    raises. Checked on torch 2.13.

    Args:
        module: the module to run.
        state: fully qualified names (as ``named_parameters()`` / ``named_buffers()``) → tensors.

    Raises:
        RuntimeError: when this torch has no ``_reparametrize_module``.
    """
    if _reparametrize_module is None:  # pragma: no cover
        raise _missing("torch.nn.utils.stateless._reparametrize_module", "functional_call's swap")
    with _reparametrize_module(module, dict(state), tie_weights=False, strict=False):
        yield


try:  # torch's pytrees: the nested containers torch.func.vmap maps over (no public module yet)
    from torch.utils import _pytree
except ImportError:  # pragma: no cover
    _pytree = None


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """The leaves of a nested tuple / list / dict (a batch) and its structure, as torch.func sees them.

    Wraps the private ``torch.utils._pytree.tree_flatten``: what :func:`torch.func.vmap` uses to
    match ``in_dims`` to nested inputs, so a structure rebuilt by :func:`tree_unflatten` is one
    ``vmap`` accepts. Checked on torch 2.13.

    Raises:
        RuntimeError: when this torch has no ``torch.utils._pytree``.
    """
    if _pytree is None:  # pragma: no cover
        raise _missing("torch.utils._pytree.tree_flatten", "the leaves of a nested batch")
    leaves, spec = _pytree.tree_flatten(tree)
    return list(leaves), spec


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    """The nested container of :func:`tree_flatten`'s structure ``spec`` with these leaves.

    Wraps the private ``torch.utils._pytree.tree_unflatten``. Checked on torch 2.13.

    Raises:
        RuntimeError: when this torch has no ``torch.utils._pytree``.
    """
    if _pytree is None:  # pragma: no cover
        raise _missing("torch.utils._pytree.tree_unflatten", "a nested batch from its leaves")
    return _pytree.tree_unflatten(list(leaves), spec)


_PUBLIC_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution (any dimension, transposed or not, lazy or not).

    ``isinstance(module, torch.nn.modules.conv._ConvNd)`` (private base class; checked on
    torch 2.13); without it, an instance of one of the public ``nn.Conv*d`` /
    ``nn.ConvTranspose*d`` classes (their lazy variants subclass them).
    """
    base = getattr(getattr(nn.modules, "conv", None), "_ConvNd", None)
    return isinstance(module, base if isinstance(base, type) else _PUBLIC_CONVS)


# --------------------------------------------------------------------------- FSDP2
def _fsdp_state(module: nn.Module) -> Any:
    get = getattr(module, "_get_fsdp_state", None)
    if not callable(get):
        raise _missing(
            "FSDPModule._get_fsdp_state()",
            f"the FSDP2 state of a fully_shard module; got a {type(module).__name__}",
        )
    return get()


def fsdp_state_param_groups(module: nn.Module) -> list[Any]:
    """The FSDP2 parameter groups (``FSDPParamGroup``) that ``fully_shard`` made for ``module``.

    Reads the private ``module._get_fsdp_state()._fsdp_param_groups`` (a list) or, where that is
    missing, ``._fsdp_param_group`` (one group or None; older FSDP2). Each
    group's ``fsdp_params`` are the parameters this module shards (not those of nested
    ``fully_shard`` modules); flatness sets a group's gradient-reduction flags for one pass.
    Checked on torch 2.13.

    Args:
        module: an ``FSDPModule`` (a module passed to ``fully_shard``).

    Returns:
        list: the groups, empty when the module shards no parameter itself.

    Raises:
        RuntimeError: when ``module`` has no FSDP2 state, or the state has neither attribute.
    """
    state = _fsdp_state(module)
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        if not hasattr(state, "_fsdp_param_group"):
            raise _missing("FSDPState._fsdp_param_groups / _fsdp_param_group", "FSDP2's parameter groups")
        one = state._fsdp_param_group
        groups = [] if one is None else [one]
    return list(groups)


def fsdp_mp_policy(module: nn.Module) -> Any:
    """The ``MixedPrecisionPolicy`` that ``fully_shard(module, mp_policy=...)`` was given, or None.

    Reads the private ``module._get_fsdp_state()._mp_policy`` (checked on torch 2.13; FSDP2 stores the
    default policy, all fields None, when none was given). flatness takes the compute dtype
    (``param_dtype``) from it to size finite-difference steps.

    Raises:
        RuntimeError: when ``module`` has no FSDP2 state or the state no ``_mp_policy``.
    """
    state = _fsdp_state(module)
    if not hasattr(state, "_mp_policy"):
        raise _missing("FSDPState._mp_policy", "the mixed-precision policy of a fully_shard module")
    return state._mp_policy


def _chunk_first_row(rows: int, world: int, rank: int) -> int:
    # torch.chunk's split, which DTensor's Shard(0) uses: ceil(rows / world) rows per rank.
    per_rank = -(-rows // world)
    return min(per_rank * rank, rows)


def shard_first_row(p: Any, world: int, rank: int) -> int:
    """The global index of the first row of this rank's shard of a ``Shard(0)`` DTensor.

    Uses the private ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset(
    p.shape, p.device_mesh, p.placements)`` (checked on torch 2.13); where it is missing or has
    another signature, torch.chunk's split (ceil(rows / world) rows per rank), which is what
    ``Shard(0)`` does on a 1-D mesh.

    Args:
        p: a DTensor parameter sharded on dimension 0 (as ``fully_shard`` makes).
        world: the number of ranks of the mesh.
        rank: this rank's index in the mesh.
    """
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0]) if len(offset) else 0
    except (ImportError, TypeError, AttributeError):
        return _chunk_first_row(int(p.shape[0]), world, rank)


# --------------------------------------------------------------------------- scipy
# The argument list of scipy's C kernel that flatness.algorithms.maximize drives (scipy >= 1.15).
_SETULB_SIGNATURE = "setulb(m,x,l,u,nbd,f,g,factr,pgtol,wa,iwa,task,lsave,isave,dsave,maxls,ln_task)"


@functools.lru_cache(maxsize=1)
def lbfgsb_kernel() -> tuple[Callable[..., Any], Mapping[int, str], Any] | None:
    """scipy's L-BFGS-B kernel and message tables, or None where their interface differs.

    Private APIs: ``scipy.optimize._lbfgsb.setulb`` (the C kernel, with the argument list
    ``setulb(m, x, l, u, nbd, f, g, factr, pgtol, wa, iwa, task, lsave, isave, dsave, maxls,
    ln_task)`` of scipy >= 1.15, recognized by its docstring; checked on scipy 1.17) and
    ``scipy.optimize._lbfgsb_py.status_messages`` / ``task_messages`` (the tables that turn
    ``task`` codes into ``minimize``'s message). Driving the kernel directly avoids
    ``scipy.optimize.minimize``'s O(n) Python bounds conversion (about 6 s and a GB per million
    parameters); where this returns None, callers use ``minimize(method="L-BFGS-B")``.

    Returns:
        ``(setulb, status_messages, task_messages)``, or None.
    """
    try:
        from scipy.optimize import _lbfgsb
        from scipy.optimize._lbfgsb_py import status_messages, task_messages
    except ImportError:
        return None
    setulb = getattr(_lbfgsb, "setulb", None)
    doc = (getattr(setulb, "__doc__", None) or "").replace(" ", "")
    if not doc.startswith(_SETULB_SIGNATURE) or not isinstance(status_messages, dict) or not task_messages:
        return None
    return setulb, status_messages, task_messages


# --------------------------------------------------------------------------- autograd.Function
def is_once_differentiable(backward: Any) -> bool:
    """Whether a custom Function's ``backward`` is wrapped by ``@once_differentiable``.

    torch marks nothing public on the wrapper: it is recognised as the ``wrapper`` closure that
    ``torch.autograd.function.once_differentiable`` returns (``functools.wraps`` keeps the
    original as ``__wrapped__``). Checked on torch 2.13; False when the shape differs.
    """
    import torch.autograd.function as function_module

    code = getattr(backward, "__code__", None)
    return (
        getattr(backward, "__wrapped__", None) is not None
        and code is not None
        and code.co_name == "wrapper"
        and code.co_filename == function_module.__file__
    )
