"""Leave the user's model and the global random state exactly as they were.

Every public function runs inside :func:`model_guard`: it records the train/eval mode of
every submodule, the ``requires_grad`` flags and the global random states (torch CPU,
CUDA where initialized, NumPy, Python), and restores them on exit, also when the call
raises. Parameters and buffers are never written: evaluations go through
``torch.func.functional_call`` with tensors of our own.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["model_guard", "rng_guard", "seed_everything"]


@contextlib.contextmanager
def rng_guard() -> Iterator[None]:
    """Restore the global torch / CUDA / NumPy / Python random states on exit."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


def seed_everything(seed: int) -> None:
    """Seed the global generators (used inside :func:`rng_guard` only).

    CUDA is seeded only when already initialized, so that a CPU-only call never queues a
    lazy CUDA seed that would outlive the guard.
    """
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def model_guard(*models: nn.Module) -> Iterator[None]:
    """Restore module modes, ``requires_grad`` flags and global RNG states on exit."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    flags = [(p, p.requires_grad) for model in models for p in model.parameters()]
    with rng_guard():
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, flag in flags:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
