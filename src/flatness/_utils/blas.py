"""Run scipy's optimizers with single-threaded BLAS, so its threads do not compete with torch's.

scipy's L-BFGS-B calls BLAS level-1 routines (dot products, copies) on vectors of length n.
OpenBLAS threads such calls for large n and its worker threads then spin, waiting for more
work, on the cores torch is about to use for the next loss+gradient pass. On a 2-core machine
that measured as 10-20 % of a sharpness run (``benchmarks/bench_sharpness.py``).
:func:`single_threaded_blas` sets every loaded OpenBLAS to one thread for the duration of a
``with`` block and restores the previous counts on exit, also when the block raises — the
same as ``threadpoolctl.threadpool_limits(1, "blas")``, without the dependency. Elsewhere
(no OpenBLAS loaded, or a platform without ``/proc/self/maps``) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

__all__ = ["single_threaded_blas"]

# (get, set) symbol pairs of OpenBLAS builds: plain, NumPy / SciPy wheels (32- and 64-bit ints).
_SYMBOLS = (
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
)
_cache: dict[str, tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None] = {}


def _loaded_openblas() -> list[str]:
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/") and ".so" in p)


def _controls(path: str) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    if path not in _cache:
        found = None
        try:
            lib = ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
        except OSError:
            lib = None
        for get_name, set_name in _SYMBOLS if lib is not None else ():
            get_fn, set_fn = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get_fn is not None and set_fn is not None:
                get_fn.restype, get_fn.argtypes = ctypes.c_int, []
                set_fn.restype, set_fn.argtypes = None, [ctypes.c_int]
                found = (get_fn, set_fn)
                break
        _cache[path] = found
    return _cache[path]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit every loaded OpenBLAS to one thread inside the block; restore on exit."""
    saved = []
    try:
        for path in _loaded_openblas():
            controls = _controls(path)
            if controls is None:
                continue
            get_fn, set_fn = controls
            before = int(get_fn())
            if before != 1:
                set_fn(1)
                saved.append((set_fn, before))
    except Exception:  # never let a thread-count tweak break a computation
        pass
    try:
        yield
    finally:
        for set_fn, before in reversed(saved):
            set_fn(before)
