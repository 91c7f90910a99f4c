"""Opt-in progress reporting for long computations (quiet by default).

``progress=False`` (default) prints nothing; ``True`` prints one updating line to stderr;
a callable receives ``(step, total, info_dict)`` after each step, for loggers and GUIs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress", "ProgressArg"]

ProgressArg = bool | Callable[[int, int | None, dict[str, Any]], None]


class Progress:
    """Reports ``step / total`` with optional key figures (e.g. the current residual)."""

    def __init__(self, progress: ProgressArg, *, total: int | None, desc: str) -> None:
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress: expected a bool or a callable(step, total, info), got {progress!r}")
        self._progress = progress
        self.total = total
        self.desc = desc
        self.step = 0
        self._start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1, **info: Any) -> None:
        self.step += n
        if self._progress is False:
            return
        if callable(self._progress) and self._progress is not True:
            self._progress(self.step, self.total, info)
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and (self.total is None or self.step < self.total):
            return
        self._last = now
        of = f"/{self.total}" if self.total is not None else ""
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        print(f"\r{self.desc}: {self.step}{of} [{now - self._start:.1f}s] {extra}", end="", file=sys.stderr)

    def close(self) -> None:
        if self._progress is True:
            print(file=sys.stderr)
