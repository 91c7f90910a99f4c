"""Batches as the user has them: DataLoaders, lists of batches, or one batch.

A pass over the data must be repeatable (each measure makes many passes), so one-shot
iterators are refused. Loaders that shuffle or augment are replayed identically: each
pass seeds the global generators and rewinds the loader's own ``torch.Generator`` objects
to the state they had when the objective was built. Two kinds of loader need more:

- ``persistent_workers=True``: the worker processes keep their random streams from one
  pass to the next and cannot be reseeded, so each pass iterates a non-persistent copy of
  the loader (fresh workers, seeded like the first pass; the cost is the workers' start-up).
- a ``DistributedSampler`` that pads (``drop_last=False`` and a dataset size that is not a
  multiple of the number of replicas) repeats a few samples to even out the shards; each
  pass drops exactly those repeats, so that the union of the shards is the dataset once.

Any other source whose passes differ (an ``IterableDataset`` seeded from OS entropy, an
augmentation with its own unseeded generator) is detected: every pass over data that is not
a list or tuple of batches records a fingerprint of each batch (shapes, dtypes and a CRC-32
of the bytes of every tensor, or a position-weighted sum on accelerators: O(data), no
forward pass) and compares it with the first pass's.
"""

from __future__ import annotations

import copy
import itertools
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["DataSource", "batch_size_of", "first_tensor", "move_batch", "tensors_of"]


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


def tensors_of(x: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested batch (dicts, tuples, named tuples, lists), in order."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from tensors_of(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from tensors_of(v)


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
                f"data: cannot find the batch size of a batch of type {type(batch).__name__} (it holds "
                "no tensor with a dimension); pass batch_size=callable(batch) -> int"
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
        if chosen[1] <= 0:
            raise ValueError(
                f"data: a batch has {chosen[1]} samples (the leading dimension of {chosen[0]}); remove "
                "empty batches, or pass batch_size=callable(batch) -> int if that tensor is not per sample"
            )
        return chosen[1]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(
            f"batch_size: returned {size!r} for a batch: a batch size is a positive int, not size {size!r}"
        )
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


def _fingerprint(batch: Any) -> list[Any]:
    """Shapes, dtypes and a checksum of every tensor in a batch: O(data), no host copy on GPUs.

    CPU tensors: CRC-32 of their bytes. Other devices: the sum and a position-weighted sum
    in float64 as a device tensor (compared after the pass, one synchronization).
    """
    out: list[Any] = []
    for t in tensors_of(batch):
        out.append((tuple(t.shape), t.dtype))
        if t.numel() == 0 or t.is_sparse or t.is_nested:
            continue
        t = t.detach()
        if t.device.type == "cpu":
            flat = t.contiguous().reshape(-1)
            if flat.is_complex() or flat.is_quantized:
                flat = torch.view_as_real(flat) if flat.is_complex() else flat.int_repr()
            out.append(zlib.crc32(flat.view(torch.uint8).numpy()))
        else:
            flat = t.reshape(-1)
            values = (torch.view_as_real(flat) if flat.is_complex() else flat).reshape(-1).double()
            weights = torch.arange(values.numel(), device=values.device, dtype=torch.float64)
            weights = weights.remainder_(251.0).add_(1.0)
            out.append(torch.stack([values.sum(), (values * weights).sum()]))
    return out


def _same_prints(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            # NaN inputs: compare bit patterns of the sums, not values.
            if not torch.equal(torch.nan_to_num(x, nan=1.5e300), torch.nan_to_num(y, nan=1.5e300)):
                return False
        elif x != y:
            return False
    return True


class _UnpaddedSampler(torch.utils.data.Sampler):  # type: ignore[type-arg]
    """A ``DistributedSampler``'s indices without the repeats it pads the last shards with.

    ``DistributedSampler`` lists the (shuffled) indices, appends copies of the first ones up
    to ``num_samples * num_replicas`` and gives rank r the positions r, r + R, r + 2R, ...;
    positions ≥ len(dataset) are the copies, so rank r's unique samples are its first
    ``len(range(r, N, R))`` indices.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        s = self.sampler
        return len(range(s.rank, len(s.dataset), s.num_replicas))

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), len(self))


def _padding_sampler(loader: Any) -> Any:
    """The loader's ``DistributedSampler`` if it pads this data, else None."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(batch_sampler, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return None
    try:
        n = len(sampler.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    if sampler.drop_last or sampler.num_replicas <= 1 or n % sampler.num_replicas == 0:
        return None
    return sampler


def _replayable(data: Any) -> Any:
    """What to iterate for identical passes: the loader, or an adjusted shallow copy of it."""
    from torch.utils.data import BatchSampler, DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(data, DataLoader):
        return data
    changes: dict[str, Any] = {}
    if data.persistent_workers and data.num_workers > 0:
        changes["persistent_workers"] = False
    sampler = _padding_sampler(data)
    if sampler is not None:
        n, r = len(sampler.dataset), sampler.num_replicas  # type: ignore[arg-type]
        fix = (
            f"pass DistributedSampler(..., drop_last=True) (drops the last {n % r} samples), or shard "
            "without padding, e.g. Subset(dataset, range(rank, len(dataset), world_size))"
        )
        if type(sampler).__iter__ is not DistributedSampler.__iter__:
            raise ValueError(
                f"data: the loader's {type(sampler).__name__} pads {n} samples to a multiple of "
                f"{r} replicas by repeating some, which would count them twice, and it overrides "
                f"DistributedSampler.__iter__, so flatness cannot tell the repeats apart; {fix}"
            )
        unpadded = _UnpaddedSampler(sampler)
        if data.batch_sampler is None:
            changes["sampler"] = unpadded
        elif type(data.batch_sampler) is BatchSampler and data.batch_sampler.sampler is sampler:
            changes["sampler"] = unpadded
            changes["batch_sampler"] = BatchSampler(
                unpadded, data.batch_sampler.batch_size, data.batch_sampler.drop_last
            )
        else:
            raise ValueError(
                f"data: the loader's batch sampler ({type(data.batch_sampler).__name__}) draws from "
                f"a DistributedSampler that pads {n} samples to a multiple of {r} replicas by "
                f"repeating some, which would count them twice; {fix}"
            )
    if not changes:
        return data
    clone = copy.copy(data)
    # DataLoader forbids setting these attributes after construction: set them directly on
    # the copy (the user's loader is not changed).
    clone.__dict__.update(changes)
    clone.__dict__["_iterator"] = None
    return clone


class DataSource:
    """Repeatable passes over the user's data.

    Args:
        data: a DataLoader, any re-iterable of batches (list, tuple, custom iterable),
            or a single batch (a tuple/list whose first item is a tensor, a dict, a tensor).
        max_batches: use only the first ``max_batches`` batches of each pass.

    Raises:
        TypeError: ``data`` is a one-shot iterator (a generator), or ``None``.
        ValueError: ``max_batches`` is not a positive int, or a ``DistributedSampler``
            pads the data in a way that cannot be undone.
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
            self._batches = _replayable(data)
        self.max_batches = max_batches
        self._generators = _loader_generators(self._batches)
        self._generator_states = [g.get_state() for g in self._generators]
        # Lists and tuples hold the same batches every time; anything else is checked.
        self.checked = not isinstance(self._batches, (list, tuple))
        self._reference: list[list[Any]] | None = None
        self._prints: list[list[Any]] = []
        self._n_passes = 0

    def __iter__(self) -> Iterator[Any]:
        """One pass; rewinds the loader's own generators first (callers restore them)."""
        for g, state in zip(self._generators, self._generator_states, strict=True):
            g.set_state(state)
        prints: list[list[Any]] = []
        self._prints = prints
        for i, batch in enumerate(self._batches):
            if self.max_batches is not None and i >= self.max_batches:
                break
            if self.checked:
                prints.append(_fingerprint(batch))
            yield batch

    def end_pass(self) -> str | None:
        """After a complete pass: how it differs from the first complete pass, or None."""
        self._n_passes += 1
        if not self.checked:
            return None
        prints, self._prints = self._prints, []
        if self._reference is None:
            self._reference = prints
            return None
        ref = self._reference
        where = None
        for i, (a, b) in enumerate(zip(ref, prints, strict=False)):
            if not _same_prints(a, b):
                shapes_a = [x for x in a if isinstance(x, tuple)]
                shapes_b = [x for x in b if isinstance(x, tuple)]
                what = "its contents differ" if shapes_a == shapes_b else "its tensors' shapes differ"
                where = f"batch {i}: {what}"
                break
        if where is None and len(ref) != len(prints):
            where = f"it has {len(prints)} batches, the first pass had {len(ref)}"
        if where is None:
            return None
        return (
            f"data: pass {self._n_passes} over the data differs from the first ({where}). Every "
            "measure makes many passes and needs the same batches in each, but this data source "
            "does not replay: its shuffling or augmentation draws from a random source that "
            "flatness cannot reseed (an IterableDataset or transform seeded from OS entropy or "
            "holding its own generator, a sampler that changes between epochs, ...). Fix: draw "
            "that randomness from torch's global generator or the DataLoader's generator= "
            "(both are reseeded every pass), turn augmentation off for the measurement, or "
            "materialize the batches once: data = list(loader)"
        )

    @staticmethod
    def check_replay(differs: str | None, n_differ: int) -> None:
        """Raise the replay error on every rank if any rank's pass differed from its first.

        Args:
            differs: this rank's :meth:`end_pass` message (None if its pass replayed).
            n_differ: how many ranks' passes differed, summed over the ranks in the pass's
                collective (0 or 1 in one process), so that all ranks raise together.

        Raises:
            ValueError: ``n_differ > 0``: this rank's message, or on a rank whose own pass
                replayed, how many other ranks' passes differ.
        """
        if n_differ:
            raise ValueError(
                differs
                or f"data: the passes over the data differ on {n_differ} other rank(s), whose error names "
                "the pass, the batch and the fix; every measure needs the same batches in every pass "
                "on every rank"
            )

    def save_generators(self) -> list[torch.Tensor]:
        """The current states of the loader's generators, to restore after a pass."""
        return [g.get_state() for g in self._generators]

    def restore_generators(self, states: list[torch.Tensor]) -> None:
        for g, state in zip(self._generators, states, strict=True):
            g.set_state(state)
