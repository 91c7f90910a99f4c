"""Time per grid point of a 2-D loss landscape: vectorized vs loop vs loss-landscapes.

Run from the repository root: ``python benchmarks/bench_landscape.py [--steps 21] [--repeat 3]``.
For each shared problem (``mlp_problem``, ``cnn_problem``) it prints seconds per grid point of
``landscape_2d`` with ``vectorize=True`` and ``False``, of ``loss_landscapes.random_plane``
when that package is installed (``pip install loss-landscapes``; never a dependency), and
the ratio to the floor: one raw full-data forward pass (eval mode, no grad).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cnn_problem, mlp_problem, timeit

from flatness import landscape_2d


def forward_pass_time(model, loss_fn, batches, repeat: int, device: str) -> float:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            for xb, yb in batches:
                loss_fn(model(xb), yb)

    return timeit(run, repeat=repeat, device=device)


def loss_landscapes_time(model, loss_fn, batches, steps: int) -> float | str:
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return "not installed"
    x = torch.cat([xb for xb, _ in batches])
    y = torch.cat([yb for _, yb in batches])
    model.eval()
    metric = loss_landscapes.metrics.Loss(loss_fn, x, y)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            loss_landscapes.random_plane(
                model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True
            )
        if x.is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps**2
    except Exception as e:  # report, do not hide: its API may not work with this torch
        return f"failed: {type(e).__name__}: {e}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--problems", default="mlp,cnn")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=2048, help="data size")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="flatness's batches; 0 = one batch, as loss-landscapes gets",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    grid = np.linspace(-1, 1, args.steps)
    points = args.steps**2
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {args.device} ({where}), {args.steps}x{args.steps} grid")
    for name in args.problems.split(","):
        batch_size = args.batch_size or args.samples
        model, loss_fn, batches = {"mlp": mlp_problem, "cnn": cnn_problem}[name](
            n=args.samples, batch_size=batch_size, device=args.device
        )
        floor = forward_pass_time(model, loss_fn, batches, args.repeat, args.device)
        print(
            f"\n{name}: {args.samples} samples in batches of {batch_size}; "
            f"raw full-data forward pass {floor * 1e3:.2f} ms"
        )
        for vectorize in (True, False):
            t = timeit(
                lambda v=vectorize, m=model, f=loss_fn, b=batches: landscape_2d(
                    m,
                    f,
                    b,
                    alphas=grid,
                    betas=grid,
                    vectorize=v,
                    chunk_size=args.chunk_size,
                ),
                repeat=args.repeat,
                warmup=0,
                device=args.device,
            )
            label = "flatness vectorized" if vectorize else "flatness loop"
            print(f"  {label:22s} {t / points * 1e3:8.2f} ms/point  {t / points / floor:5.2f} x forward pass")
        ll = loss_landscapes_time(model, loss_fn, batches, args.steps)
        if isinstance(ll, str):
            print(f"  {'loss-landscapes':22s} {ll}")
        else:
            print(f"  {'loss-landscapes':22s} {ll * 1e3:8.2f} ms/point  {ll / floor:5.2f} x forward pass")


if __name__ == "__main__":
    main()
