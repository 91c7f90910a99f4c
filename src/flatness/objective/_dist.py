"""torch.distributed support: each rank holds a shard of the data.

The full-dataset objective over all ranks is Σ_r Σ_b m_b ℓ_b / Σ_r Σ_b m_b, so a pass
all-reduces the weighted sums and the total size in one collective. Without an initialized
process group every function here is a no-op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sums", "broadcast", "check_same_size", "rank_and_world", "resolve_group"]


def resolve_group(group: Any) -> Any:
    """The group to reduce over: the given one, the world group if initialized, else None.

    ``False`` means this process alone (no collectives) even when torch.distributed is
    initialized: what rank-zero-only callers such as the training callbacks need.
    """
    if group is False:
        return None
    if group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group: given, but torch.distributed is not initialized")
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank_and_world(group: Any) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _device_for(group: Any, like: torch.Tensor | None) -> torch.device:
    """Where the collective's buffer must live: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_size(group: Any, n: int) -> None:
    """Raise a ValueError on every rank unless all ranks chose the same number of parameters."""
    if group is None:
        return
    dev = _device_for(group, None)
    t = torch.tensor([n, -n], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != n or int(-t[1]) != n:
        raise ValueError(
            f"params: ranks disagree on the number of parameters (this rank has {n}, others "
            f"between {int(-t[1])} and {int(t[0])}); every rank needs the same model"
        )


def all_reduce_sums(
    group: Any,
    loss: torch.Tensor,
    extra: torch.Tensor | None,
    size: int,
    *,
    empty: bool,
    bad: bool,
    differs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, int, int, int, int]:
    """Sum (loss, extra, size, #empty, #non-finite, #non-replaying ranks) in one collective.

    Every rank takes part even when its pass failed, so that all ranks raise together
    instead of some waiting forever.
    """
    if group is None:
        return loss, extra, size, int(empty), int(bad), int(differs)
    head = torch.tensor(
        [float(size), float(empty), float(bad), float(differs)], dtype=loss.dtype, device=loss.device
    )
    parts = [loss.reshape(1), head]
    if extra is not None:
        parts.append(extra.reshape(-1))
    flat = torch.cat(parts)
    buf = flat.to(_device_for(group, flat))
    dist.all_reduce(buf, group=group)
    buf = buf.to(flat.device)
    out_extra = None if extra is None else buf[5:].view_as(extra)
    flags = [round(float(x)) for x in buf[1:5]]
    return buf[0], out_extra, flags[0], flags[1], flags[2], flags[3]


def broadcast(group: Any, t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s copy of ``t`` on every rank (no-op without a group)."""
    if group is None:
        return t
    dev = _device_for(group, t)
    buf = t.detach().to(dev).clone()
    dist.broadcast(
        buf, src=dist.get_global_rank(group, src) if group is not dist.group.WORLD else src, group=group
    )
    return buf.to(t.device)
