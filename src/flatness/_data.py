"""Batches as the user has them: DataLoaders, lists of batches, or one batch.

A pass over the data must be repeatable (each measure makes many passes), so one-shot
iterators are refused. Loaders that shuffle or augment are replayed identically: each
pass seeds the global generators and rewinds the loader's own ``torch.Generator`` objects
to the state they had when the objective was built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["DataSource", "batch_size_of", "first_tensor", "move_batch"]


def _is_single_batch(data: Any) -> bool:
    """One ``(inputs, targets)`` batch, one dict batch or one tensor, rather than many."""
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, Mapping):
        return True
    # A tuple/list whose first item is a tensor is one (inputs, targets, ...) batch; a list
    # of tuples, lists or dicts is many batches.
    return isinstance(data, (tuple, list)) and len(data) > 0 and isinstance(data[0], torch.Tensor)


def first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        values: Iterable[Any] = x.values()
    elif isinstance(x, (tuple, list)):
        values = x
    else:
        return None
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def _leading_sizes(x: Any, path: str = "batch") -> Iterator[tuple[str, int]]:
    """(where, leading size) of every tensor with at least one dimension, in batch order."""
    if isinstance(x, torch.Tensor):
        if x.ndim > 0:
            yield path, int(x.shape[0])
    elif isinstance(x, Mapping):
        for k, v in x.items():
            yield from _leading_sizes(v, f"{path}[{k!r}]")
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leading_sizes(v, f"{path}[{i}]")


def batch_size_of(batch: Any, size_fn: Callable[[Any], int] | None = None) -> int:
    """Number of samples in a batch, its weight in full-data means.

    The rule, unless ``size_fn`` is given (then ``size_fn(batch)``):

    - a tuple / list batch ``(inputs, targets, ...)``: the leading dimension of the first
      tensor in ``inputs`` (``batch[0]``, searched depth-first), else of the first tensor
      anywhere in the batch;
    - a dict batch (or a single tensor): the leading dimension of the first tensor in the
      dict's order (depth-first through nested dicts, tuples and lists).

    Zero-dimensional tensors and non-tensor values are skipped. When the batch holds tensors of
    different leading sizes the choice is ambiguous, and a ``UserWarning`` names them. Batches
    whose samples are not their rows (tokens of a language model, nodes of a graph, time-major
    sequences) need ``batch_size=``, see the objective's docs.

    Args:
        batch: one batch as the loader yields it.
        size_fn: ``size_fn(batch) -> int`` replacing the rule.

    Returns:
        The size, a positive int.

    Raises:
        TypeError: the batch holds no tensor with a dimension. ValueError: a size ≤ 0 or not an int.
    """
    if size_fn is not None:
        size = size_fn(batch)
        if isinstance(size, torch.Tensor) and size.numel() == 1 and not size.is_floating_point():
            size = int(size)
    else:
        sizes = list(_leading_sizes(batch))
        if not sizes:
            raise TypeError(
                "batch_size: cannot find the batch size of a batch of type "
                f"{type(batch).__name__}; pass batch_size=callable(batch) -> int"
            )
        chosen = sizes[0]
        if isinstance(batch, (tuple, list)) and len(batch) > 0:
            in_inputs = list(_leading_sizes(batch[0], "batch[0]"))
            if in_inputs:
                chosen = in_inputs[0]
        if any(n != chosen[1] for _, n in sizes):
            shown = ", ".join(f"{where}: {n}" for where, n in sizes[:6])
            more = f" and {len(sizes) - 6} more" if len(sizes) > 6 else ""
            warnings.warn(
                f"batch_size: a batch holds tensors of different leading sizes ({shown}{more}); "
                f"it is weighted by {chosen[1]}, the leading size of {chosen[0]}. Pass "
                "batch_size=callable(batch) -> int to choose (e.g. lambda b: b['input_ids'].shape[0])",
                UserWarning,
                stacklevel=3,
            )
        size = chosen[1]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"batch_size: a batch has size {size!r}; expected a positive int")
    return int(size)


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move every tensor in a (nested) batch to ``device``; cast floating ones to ``dtype``."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype, non_blocking=True)
        return batch.to(device=device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(v, device, dtype) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader draws its order from, if any."""
    found: list[torch.Generator] = []
    candidates = [
        getattr(data, "generator", None),
        getattr(getattr(data, "sampler", None), "generator", None),
        getattr(getattr(getattr(data, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


class DataSource:
    """Repeatable passes over the user's data.

    Args:
        data: a DataLoader, any re-iterable of batches (list, tuple, custom iterable),
            or a single batch (a tuple/list whose first item is a tensor, a dict, a tensor).
        max_batches: use only the first ``max_batches`` batches of each pass.

    Raises:
        TypeError: ``data`` is a one-shot iterator (a generator), or ``None``.
        ValueError: ``max_batches`` is not a positive int.
    """

    def __init__(self, data: Any, *, max_batches: int | None = None) -> None:
        if data is None:
            raise TypeError("data: got None; pass a DataLoader, a list of batches or one batch")
        if max_batches is not None and (
            not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches <= 0
        ):
            raise ValueError(f"max_batches: got {max_batches!r}; expected a positive int or None")
        self.source = data
        if _is_single_batch(data):
            self._batches: Any = [data]
        else:
            if isinstance(data, Iterator) or not isinstance(data, Iterable):
                raise TypeError(
                    f"data: got a one-shot {type(data).__name__}; every measure makes several "
                    "passes over the data, so pass a DataLoader or a list of batches "
                    "(e.g. list(generator)) instead"
                )
            self._batches = data
        self.max_batches = max_batches
        self._generators = _loader_generators(self._batches)
        self._generator_states = [g.get_state() for g in self._generators]

    def __iter__(self) -> Iterator[Any]:
        """One pass; rewinds the loader's own generators first (callers restore them)."""
        for g, state in zip(self._generators, self._generator_states, strict=True):
            g.set_state(state)
        for i, batch in enumerate(self._batches):
            if self.max_batches is not None and i >= self.max_batches:
                break
            yield batch

    def save_generators(self) -> list[torch.Tensor]:
        """The current states of the loader's generators, to restore after a pass."""
        return [g.get_state() for g in self._generators]

    def restore_generators(self, states: list[torch.Tensor]) -> None:
        for g, state in zip(self._generators, states, strict=True):
            g.set_state(state)
