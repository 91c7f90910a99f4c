"""Shared helpers of the numerical layer: argument checks and seeded random vectors.

The numerical layer sees a symmetric operator only as ``matvec(v) -> H v`` and a size n;
it knows nothing of models. Random numbers come from a local ``torch.Generator`` seeded by
``seed`` (drawn on the CPU, then moved), so results do not depend on the global RNG or the
device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from flatness.objective import check_positive

Matvec = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Matvec", "apply", "check_operator", "check_seed", "generator", "rademacher", "randn"]


def check_operator(
    matvec: Matvec, n: int, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Validate ``(matvec, n)`` and resolve the device and dtype (default CPU, float64)."""
    if not callable(matvec):
        raise TypeError(f"matvec: expected a callable(v: Tensor) -> Tensor, got {type(matvec).__name__}")
    check_positive("n", n, integer=True)
    dtype = torch.float64 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    return torch.device("cpu" if device is None else device), dtype


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {seed!r}")


def generator(seed: int) -> torch.Generator:
    check_seed(seed)
    return torch.Generator().manual_seed(int(seed))


def randn(
    gen: torch.Generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal numbers from ``gen`` (CPU), moved to ``device``."""
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def rademacher(
    gen: torch.Generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Independent ±1 entries with probability ½ each, from ``gen`` (CPU), moved to ``device``."""
    return (torch.randint(0, 2, shape, generator=gen).to(dtype) * 2 - 1).to(device)


def apply(matvec: Matvec, v: torch.Tensor, n: int) -> torch.Tensor:
    """``matvec(v)`` checked for shape, as a flat vector in v's dtype and device."""
    out = matvec(v)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"matvec: returned {type(out).__name__}; expected a torch.Tensor")
    out = out.reshape(-1)
    if out.shape[0] != n:
        raise ValueError(f"matvec: returned {out.shape[0]} numbers for a vector of size n={n}")
    out = out.to(device=v.device, dtype=v.dtype)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(
            f"matvec: returned {bad} non-finite value(s) (NaN or inf) out of {n}; the operator "
            "must map finite vectors to finite vectors (check its scale and the dtype)"
        )
    return out
