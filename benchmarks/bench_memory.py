"""Peak extra memory of hessian_topk(k=1, tol=1e-3) on a 3-layer MLP with 8.4 M parameters.

The model is Linear(2048, 2048) → ReLU → Linear(2048, 2048) → ReLU → Linear(2048, 10)
(n = 8,413,194 parameters, float32) on one batch of 64 random inputs, on the CPU.

Method: every configuration runs in a fresh process. Just before the call, the process's peak
resident set size is reset to its current size (``echo 5 > /proc/self/clear_refs``, Linux); the
extra memory is the peak after the call (``VmHWM``) minus the resident size before (``VmRSS``),
reported in units of n float32 numbers (4n bytes). The children run with glibc's mmap threshold
fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_=1048576``), so that every large tensor is its own
mapping, returned to the system when freed: the resident size then follows what is allocated
(with the default, dynamic threshold, freed 16 MB weight gradients stay in the heap and the
resident size overstates the live memory by a few n).

"Device" memory with the basis on the host: on a CPU-only machine there is no separate device,
so the operator is put in a second process that plays the device: it holds the model and does the
products (``HessianOperator``, graph kept), receiving v and sending back H v through a pipe into
preallocated buffers; the solver, in the first process, holds the Lanczos basis (that is all
``basis_device="cpu"`` changes on a GPU: the basis and the eigenvectors stay in host memory and
each step moves one vector to the device and its product back). The device's extra memory is the
second process's peak minus its size after building the model and data.

Usage: ``python benchmarks/bench_memory.py [--configs default,no-reuse,host-basis] [--hidden 2048]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn


def status(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def problem(hidden: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2048, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2048, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return model, nn.functional.cross_entropy, (x, y)


def device_worker(conn, hidden: int) -> None:
    """The 'device': holds the model, answers products H v (graph kept) until told to stop."""
    from flatness import HessianOperator

    torch.set_num_threads(1)
    warm_up()
    model, loss_fn, batch = problem(hidden)
    op = HessianOperator(model, loss_fn, batch)
    n = op.shape[0]
    buf = bytearray(4 * n)  # v arrives here: the one vector the device holds between products
    conn.send(n)
    before = status("VmRSS")
    reset_peak()
    with op.reusing_graph():
        while True:
            size = conn.recv_bytes_into(buf)
            if size == 0:
                break
            v = torch.from_numpy(np.frombuffer(buf, dtype=np.float32))
            hv = op @ v
            conn.send_bytes(memoryview(hv.numpy()))
            del hv
        reused = op.graph_reused
    conn.send((status("VmHWM") - before, reused))


class RemoteOperator:
    """A linear operator whose products are done by the device process."""

    def __init__(self, conn, n: int) -> None:
        self.conn, self.shape, self.dtype, self.device = conn, (n, n), torch.float32, torch.device("cpu")
        self.buf = bytearray(4 * n)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.conn.send_bytes(memoryview(v.contiguous().numpy()))
        self.conn.recv_bytes_into(self.buf)
        return torch.from_numpy(np.frombuffer(self.buf, dtype=np.float32).copy())


def warm_up() -> None:
    """One small call of each kind first, so that torch's and scipy's one-time allocations
    (kernels, thread pools, imports) are not counted as the measured call's memory."""
    import flatness

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    flatness.hessian_topk(model, nn.functional.cross_entropy, batch, k=1)
    flatness.hessian_trace(model, nn.functional.cross_entropy, batch, n_hvp=6)
    flatness.sharpness(model, nn.functional.cross_entropy, batch, max_iter=1)


def run_config(config: str, hidden: int) -> dict:
    from flatness import hessian_topk, lanczos_eigsh

    torch.set_num_threads(1)
    warm_up()
    if config == "host-basis":
        ctx = mp.get_context("spawn")
        here, there = ctx.Pipe()
        proc = ctx.Process(target=device_worker, args=(there, hidden))
        proc.start()
        n = here.recv()
        op = RemoteOperator(here, n)
        before = status("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        res = lanczos_eigsh(op, k=1, tol=1e-3, basis_device="cpu", keep_products="auto")
        t = time.perf_counter() - t0
        host = status("VmHWM") - before
        here.send_bytes(b"")
        device, reused = here.recv()
        proc.join()
        return {
            "config": config,
            "n": n,
            "n_hvp": res.n_matvec,
            "lambda": float(res.eigenvalues[0]),
            "converged": res.converged,
            "time_s": t,
            "graph_reused": reused,
            "host_extra_n": host / (4 * n),
            "device_extra_n": device / (4 * n),
        }
    if config in OTHERS:
        return run_other(config, hidden)
    model, loss_fn, batch = problem(hidden)
    n = sum(p.numel() for p in model.parameters())
    options = {"reuse_graph": False} if config == "no-reuse" else {}
    before = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    res = hessian_topk(model, loss_fn, batch, k=1, tol=1e-3, **options)
    t = time.perf_counter() - t0
    extra = status("VmHWM") - before
    return {
        "config": config,
        "n": n,
        "n_hvp": res.n_matvec,
        "lambda": float(res.eigenvalues[0]),
        "converged": res.converged,
        "time_s": t,
        "graph_reused": getattr(res, "graph_reused", None),
        "extra_n": extra / (4 * n),
    }


OTHERS = {
    "trace-hutch++-30": ("hessian_trace", {"n_hvp": 30}),
    "trace-hutchinson-30": ("hessian_trace", {"n_hvp": 30, "method": "hutchinson"}),
    "density-1x20": ("hessian_density", {"n_runs": 1, "n_steps": 20}),
    "density-2x20": ("hessian_density", {"n_runs": 2, "n_steps": 20}),
    "sharpness": ("sharpness", {"max_iter": 2}),
    "sharpness-p100": ("sharpness", {"max_iter": 2, "subspace": 100}),
    "topk-k5": ("hessian_topk", {"k": 5, "tol": 1e-2}),
}


def run_other(config: str, hidden: int) -> dict:
    """The other measures, for their memory formulas (docs/large-models.md)."""
    import flatness

    torch.set_num_threads(1)
    warm_up()
    model, loss_fn, batch = problem(hidden)
    n = sum(p.numel() for p in model.parameters())
    name, options = OTHERS[config]
    before = status("VmRSS")
    reset_peak()
    res = getattr(flatness, name)(model, loss_fn, batch, **options)
    extra = status("VmHWM") - before
    out = {"config": config, "n": n, "extra_n": extra / (4 * n)}
    for key, attr in (("n_hvp", "n_matvec"), ("n_evals", "n_evals"), ("ncv", "ncv")):
        if hasattr(res, attr):
            out[key] = getattr(res, attr)
    return out


def one_hvp(hidden: int) -> dict:
    """The working memory of one ordinary product, for reference."""
    from flatness import HessianOperator

    torch.set_num_threads(1)
    warm_up()
    model, loss_fn, batch = problem(hidden)
    op = HessianOperator(model, loss_fn, batch)
    n = op.shape[0]
    v = torch.randn(n)
    before = status("VmRSS")
    reset_peak()
    hv = op @ v
    extra = status("VmHWM") - before
    del hv
    return {"config": "one HVP", "n": n, "extra_n": extra / (4 * n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="one-hvp,default,no-reuse,host-basis")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = one_hvp(args.hidden) if args.child == "one-hvp" else run_config(args.child, args.hidden)
        print(json.dumps(out))
        return
    print("peak extra memory in units of n float32 numbers (fresh process per line)")
    for config in args.configs.split(","):
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")
        cmd = [sys.executable, __file__, "--child", config, "--hidden", str(args.hidden)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            "  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )


if __name__ == "__main__":
    main()
