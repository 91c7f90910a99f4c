"""Peak memory per rank of flatness on FSDP2-sharded models, against n and the number of ranks.

Usage: python benchmarks/bench_fsdp.py [--widths 256 512 1024] [--ranks 1 2 4]
                                      [--what hvp topk topk-lean]

A deep MLP (8 hidden layers of the given width, each layer its own ``fully_shard`` unit, float32)
is sharded over 1, 2 or 4 gloo ranks on the CPU (one thread each); every rank holds 64 samples.
For each measurement the extra peak resident memory of each rank over its memory just before the
call is sampled every millisecond (``/proc/self/statm``) and reported in MiB and in units of
n_local = n / ranks float32 numbers (one local vector); allocations above 64 KiB are mmapped
(``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set. Compared against the same model unsharded
in one process with the exact (double-backward) product and hvp_mode="finite_difference".

Measured quantities: ``hvp`` one finite-difference Hessian-vector product (two FSDP gradient
passes); ``topk`` ``hessian_topk(k=1, tol=1e-3)`` with its defaults (which spend up to 256 MiB
per rank on a larger basis and stored products where a rank's vectors are small);
``topk-lean`` the same with ``ncv=10, keep_products=False`` (the least memory). The number of
products is printed after each ``topk`` column.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

F = nn.functional
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = rss()
        self.peak = self.base
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.base


def make_model(width: int, depth: int = 8) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(32, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def make_data(rank: int, samples: int = 64):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(samples, 32, generator=g), torch.randint(0, 10, (samples,), generator=g))]


def measure(model, data, what: str, sharded: bool, mode: str = "finite_difference") -> dict:
    import flatness
    from flatness import Objective as ShardedObjective

    out = {}
    if sharded:
        obj = ShardedObjective(model, F.cross_entropy, data)
    else:
        obj = flatness.Objective(model, F.cross_entropy, data, hvp_mode=mode)
    n_local = getattr(obj, "n_local", obj.n)
    v = torch.randn(n_local, generator=torch.Generator().manual_seed(0))
    obj.hvp(v)  # warm-up (FSDP lazy init, allocator)
    if "hvp" in what:
        with PeakRSS() as m:
            obj.hvp(v)
        out["hvp"] = m.extra
    if "topk" in what:
        with PeakRSS() as m:
            res = flatness.hessian_topk(model, F.cross_entropy, data, k=1, tol=1e-3, hvp_mode=mode)
        out["topk"] = m.extra
        out["topk_hvp"] = res.n_matvec
    if "topk-lean" in what:
        with PeakRSS() as m:
            res = flatness.hessian_topk(
                model, F.cross_entropy, data, k=1, tol=1e-3, hvp_mode=mode, ncv=10, keep_products=False
            )
        out["topk-lean"] = m.extra
        out["topk-lean_hvp"] = res.n_matvec
    out["n"] = obj.n
    out["n_local"] = n_local
    return out


def _worker(rank, world, port, width, what, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = make_model(width)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        result = measure(model, make_data(rank), what, sharded=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sharded(world: int, width: int, what: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, free_port(), width, what, tmp), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def _single(width, what, mode, queue):
    torch.set_num_threads(1)
    queue.put(measure(make_model(width), make_data(0), what, sharded=False, mode=mode))


def run_single(width: int, what: list[str], mode: str) -> dict:
    ctx = mp.get_context("spawn")  # a fresh process: its memory is not polluted by earlier runs
    queue = ctx.Queue()
    proc = ctx.Process(target=_single, args=(width, what, mode, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    # Allocations above 64 KiB are mmapped and returned to the system when freed, so the resident
    # size follows the live tensors (glibc's adaptive threshold would keep freed blocks mapped).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--what", nargs="+", default=["hvp", "topk", "topk-lean"], choices=["hvp", "topk", "topk-lean"]
    )
    args = parser.parse_args()
    mib = 2**20
    head = [f"{w + ' MiB':>11} {'(x n_loc)':>9}" + ("" if w == "hvp" else " HVPs") for w in args.what]
    print(f"{'n':>11} {'setup':>24} " + " ".join(head))
    for width in args.widths:
        rows = []
        for mode in ("reverse", "finite_difference"):
            r = run_single(width, args.what, mode)
            rows.append((f"1 process, {mode[:7]}", r))
        for world in args.ranks:
            ranks = run_sharded(world, width, args.what)
            worst = {k: max(r[k] for r in ranks) for k in ranks[0]}
            worst["n_local"] = max(r["n_local"] for r in ranks)
            rows.append((f"FSDP {world} rank(s), FD", worst))
        for label, r in rows:
            cells = []
            for w in args.what:
                cells.append(f"{r[w] / mib:11.1f} {r[w] / (4 * r['n_local']):9.1f}")
                if w != "hvp":
                    cells.append(f"{r[w + '_hvp']:4d}")
            print(f"{r['n']:11,} {label:>24} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
