"""Private APIs of torch and scipy, in one place (temporary: replaced by the compat helper's module)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def reparametrize(
    module: nn.Module, state: dict[str, torch.Tensor]
) -> contextlib.AbstractContextManager[Any]:
    from torch.nn.utils.stateless import _reparametrize_module

    return _reparametrize_module(module, state, tie_weights=False, strict=False)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def fsdp_state_param_groups(module: nn.Module) -> list[Any]:
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        one = getattr(state, "_fsdp_param_group", None)
        groups = [] if one is None else [one]
    return list(groups)


def fsdp_mp_policy(module: nn.Module) -> Any:
    return getattr(module._get_fsdp_state(), "_mp_policy", None)  # type: ignore[operator]


def shard_first_row(p: Any, world: int, rank: int) -> int:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0]) if len(offset) else 0
    except (ImportError, TypeError):  # pragma: no cover
        per_rank = -(-p.shape[0] // world)
        return min(per_rank * rank, p.shape[0])
