"""Which parameters form θ, and θ as a flat vector ↔ parameter-shaped tensors.

θ ∈ Rⁿ is the chosen parameters flattened in ``model.named_parameters()`` order. A
:class:`ParamLayout` records the names, shapes and sizes of the pieces, and converts between
the flat vector and dicts keyed like ``named_parameters()``; every part of flatness that needs
that conversion (objective, operators, directions, eigenvector results) uses this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["ParamLayout", "ParamSpec", "alias_map", "select_params", "unwrap"]

ParamSpec = None | Sequence[str] | Sequence[torch.Tensor] | Callable[[str, torch.Tensor], bool]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def select_params(model: nn.Module, params: ParamSpec) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs chosen by ``params``, in ``named_parameters()`` order.

    ``params`` is ``None`` (all with ``requires_grad``), a list of names, a list of parameter
    tensors, or a predicate ``(name, param) -> bool``.
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError(
            f"model: the {type(model).__name__} has no parameters at all; flatness measures a loss "
            "as a function of parameters, so the model needs some"
        )
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "params: the model has no trainable parameters (all requires_grad=False); "
                "pass params=[names] to choose some explicitly"
            )
        return chosen
    if callable(params) and not isinstance(params, nn.Module):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        if isinstance(params, str):
            raise TypeError(f"params: got the string {params!r}; pass a list of names, e.g. [{params!r}]")
        if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
            raise TypeError(
                "params: expected None, a list of names, a list of parameter tensors or a "
                f"predicate (name, param) -> bool; got {type(params).__name__}"
            )
        items = list(params)
        if not items:
            raise ValueError("params: got an empty selection; pass None for all trainable ones")
        if all(isinstance(x, str) for x in items):
            by_name = dict(model.named_parameters(remove_duplicate=False))
            by_name.update({n.removeprefix("module."): p for n, p in list(by_name.items())})
            unknown = [x for x in items if x not in by_name]
            if unknown:
                raise ValueError(
                    f"params: unknown parameter names {unknown[:5]}; "
                    f"valid names are e.g. {[n for n, _ in named[:5]]}"
                )
            wanted = {id(by_name[x]) for x in items}
        elif all(isinstance(x, torch.Tensor) for x in items):
            wanted = {id(x) for x in items}
            known = {id(p) for _, p in named}
            if not wanted <= known:
                raise ValueError("params: some tensors given are not parameters of the model")
        else:
            raise TypeError(
                "params: expected None, a list of names, a list of parameter tensors or a "
                f"predicate (name, param) -> bool; got {type(params).__name__}"
            )
        chosen = [(n, p) for n, p in named if id(p) in wanted]
    if not chosen:
        raise ValueError("params: the selection matches no parameter of the model")
    return chosen


def alias_map(model: nn.Module) -> dict[str, list[str]]:
    """{first name of a shared tensor: the names of its other module slots}.

    ``functional_call(..., tie_weights=True)`` mishandles a module reused under two names
    (``self.b = self.a``): it swaps the one slot twice and, restoring in the same order, leaves
    the tensor it was given in the user's model (torch 2.13). Here each (module, attribute)
    slot appears once — a reused module's slot under its first name only — and a tensor tied
    into several slots (``dec.weight = enc.weight``) is listed under all of them, so the
    swap needs no re-tying and restores exactly.
    """
    aliases: dict[str, list[str]] = {}
    slots: set[tuple[int, str]] = set()
    first: dict[int, str] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        owner, _, attr = name.rpartition(".")
        slot = (id(model.get_submodule(owner)), attr)
        if slot in slots:
            continue
        slots.add(slot)
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases.setdefault(canonical, []).append(name)
    return aliases


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of θ's pieces; flat vector ↔ ``{name: tensor}`` conversion.

    Attributes:
        names: parameter names in θ's order.
        shapes: their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, named: Sequence[tuple[str, torch.Tensor]]) -> ParamLayout:
        return cls(tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named))

    @property
    def numels(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def n(self) -> int:
        return sum(self.numels)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat (n,) vector as parameter-shaped tensors keyed by name."""
        if not isinstance(vector, torch.Tensor) or vector.ndim != 1 or vector.shape[0] != self.n:
            shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(f"expected a flat vector of shape ({self.n},), got {shape}")
        pieces = torch.split(vector, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes, strict=True)}

    def flatten(
        self,
        tensors: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "tensors",
    ) -> torch.Tensor:
        """Concatenate ``{name: tensor}`` (keys exactly θ's names) into a flat vector."""
        if not isinstance(tensors, Mapping):
            raise TypeError(f"{name}: expected a dict of tensors keyed by name, got {type(tensors).__name__}")
        missing = [n for n in self.names if n not in tensors]
        extra = [k for k in tensors if k not in set(self.names)]
        if missing or extra:
            raise ValueError(
                f"{name}: dict keys do not match the parameters: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        out = []
        for n, s in zip(self.names, self.shapes, strict=True):
            t = torch.as_tensor(tensors[n])
            if tuple(t.shape) != s:
                raise ValueError(f"{name}: tensor {n!r} has shape {tuple(t.shape)}; expected {s}")
            out.append(t.reshape(-1).to(device=device, dtype=dtype))
        return torch.cat(out)
