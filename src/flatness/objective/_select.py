"""The backend of a model: the one place that tells a sharded model from a model in one process."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flatness.objective._backend import Backend, LocalBackend
from flatness.objective._fsdp import FSDPBackend, check_not_fsdp1, is_sharded
from flatness.objective._loss import LossModule
from flatness.objective._params import ParamSpec

__all__ = ["backend_for", "parameter_backend"]


def backend_for(
    model: nn.Module, module: LossModule, *, params: ParamSpec, dtype: torch.dtype | None, process_group: Any
) -> Backend:
    """The backend of ``model``: FSDP2 shards (``fully_shard``) or the whole model in this process."""
    check_not_fsdp1(model)
    if is_sharded(model):
        return FSDPBackend(model, module, params=params, process_group=process_group)
    return LocalBackend(model, module, params=params, dtype=dtype, process_group=process_group)


def parameter_backend(model: nn.Module, params: ParamSpec = None) -> Backend | None:
    """The backend of a model whose parameters are split over processes, or None.

    For functions that take a model but no loss or data (random and eigenvector directions):
    None when this process holds the whole θ (the model's own tensors serve, nothing is
    copied); else the backend's layout, vector space and local vectors, as an
    :class:`flatness.Objective` of the model has them (every rank calls together).
    """
    from flatness.objective._params import unwrap

    model = unwrap(model)
    check_not_fsdp1(model)
    if not is_sharded(model):
        return None
    return FSDPBackend(model, LossModule(model, None, None), params=params, process_group=None)
