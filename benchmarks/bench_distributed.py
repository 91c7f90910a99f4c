"""HVP throughput with 1 and 2 torch.distributed ranks (gloo on CPU, NCCL on GPUs).

Usage: python benchmarks/bench_distributed.py [--samples 2048] [--repeat 5]

The same full-data HVP on the benchmark CNN: one process with all the data, then 2 ranks with half
each (one thread per rank: oversubscribed OpenMP threads spin; the 1-rank run uses the same total threads for fairness).
Prints samples per second of HVP and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _common import cnn_problem


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_hvp(batches, model, loss_fn, repeat: int) -> float:
    import flatness

    obj = flatness.Objective(model, loss_fn, batches)
    v = torch.randn(obj.n, generator=torch.Generator().manual_seed(0))
    obj.hvp(v)
    times = []
    for _ in range(repeat):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        obj.hvp(v)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _worker(rank: int, world: int, port: int, samples: int, repeat: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, loss_fn, batches = cnn_problem(n=samples)
    shard = batches[rank::world]
    t = _time_hvp(shard, model, loss_fn, repeat)
    if rank == 0:
        Path(out).write_text(str(t))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = os.path.join(tmp, f"w{world}.txt")
            threads = max(1, cores // world)
            mp.spawn(
                _worker,
                args=(world, _free_port(), args.samples, args.repeat, threads, out),
                nprocs=world,
                join=True,
            )
            results[world] = float(Path(out).read_text())
    print(f"CNN + BatchNorm, {args.samples} samples, {cores} cores, gloo")
    for world, t in results.items():
        print(f"  {world} rank(s): {t * 1e3:8.1f} ms per full-data HVP, {args.samples / t:8.0f} samples/s")
    print(f"  speed-up with 2 ranks: {results[1] / results[2]:.2f}x")


if __name__ == "__main__":
    main()
