"""Time per grid point of a 2-D loss landscape: vectorized vs loop vs loss-landscapes.

Run from the repository root: ``python benchmarks/bench_landscape.py [--steps 21] [--rounds 5]``.
For each problem (``small-mlp``: 64-32-32-10 on 128 samples, where per-point overhead
dominates; ``mlp``: the shared 64-128-128-10 MLP; ``cnn``: the shared CNN with BatchNorm)
it prints milliseconds per grid point of ``landscape_2d`` with ``vectorize=True``, ``False``
and ``"auto"``, of ``loss_landscapes.random_plane`` when that package is installed
(``pip install loss-landscapes``; never a dependency), and ratios: to the floor (one raw
full-data forward pass, eval mode, no grad) and loss-landscapes' time over ours.

The machine this was written on is noisy, so the timings are taken in interleaved rounds
(floor, each method, once per round) and ratios are formed within a round; the printed
figure is the median over rounds with the range in brackets. loss-landscapes gets the data as
one batch; so does flatness unless ``--batch-size`` says otherwise. Also printed for each
method, and immune to that noise: its wall time over the time spent inside the model's own
forward calls in the same run (timed with forward hooks), i.e. everything a method adds to the
forward passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cnn_problem, mlp_problem, small_mlp_problem, sync

from flatness import landscape_2d

PROBLEMS = {"small-mlp": (small_mlp_problem, 128), "mlp": (mlp_problem, 256), "cnn": (cnn_problem, 256)}


def wall(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class ForwardTimer:
    """Adds up the time spent inside ``model(...)`` calls (forward pre-hook to forward hook)."""

    def __init__(self, model, device: str) -> None:
        self.model, self.device, self.total, self._t0 = model, device, 0.0, 0.0

    def __enter__(self) -> ForwardTimer:
        def pre(_module, _args) -> None:
            sync(self.device)
            self._t0 = time.perf_counter()

        def post(_module, _args, _out) -> None:
            sync(self.device)
            self.total += time.perf_counter() - self._t0

        self._handles = [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def floor_time(model, loss_fn, batches, device: str, min_time: float = 0.2) -> float:
    """One raw forward pass over all batches (eval mode, no grad): the median of many."""
    model.eval()

    def run() -> None:
        with torch.no_grad():
            for xb, yb in batches:
                loss_fn(model(xb), yb)

    run()
    times = []
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(times) < 5:
        times.append(wall(run, device))
    return statistics.median(times)


def loss_landscapes_run(model, loss_fn, batches, steps: int):
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return None, "not installed"
    x = torch.cat([xb for xb, _ in batches])
    y = torch.cat([yb for _, yb in batches])
    model.eval()
    metric = loss_landscapes.metrics.Loss(loss_fn, x, y)

    def run() -> None:
        with torch.no_grad():
            loss_landscapes.random_plane(
                model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True
            )

    try:
        run()
    except Exception as e:  # report, do not hide: its API may not work with this model
        return None, f"failed: {type(e).__name__}: {e}"
    return run, None


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--problems", default="small-mlp,mlp,cnn")
    parser.add_argument("--samples", type=int, default=None, help="data size (default per problem)")
    parser.add_argument("--batch-size", type=int, default=0, help="flatness's batches; 0 = one batch")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = np.linspace(-1, 1, args.steps)
    points = args.steps**2
    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {args.device} ({where}), {args.steps}x{args.steps} grid")
    print("per point: median [min-max] over interleaved rounds")
    for name in args.problems.split(","):
        make, default_n = PROBLEMS[name]
        n = args.samples or default_n
        model, loss_fn, batches = make(n=n, batch_size=args.batch_size or n, device=args.device)
        n_params = sum(p.numel() for p in model.parameters())
        methods = {
            f"flatness {label}": (
                lambda v=v, m=model, f=loss_fn, b=batches: landscape_2d(
                    m, f, b, alphas=grid, betas=grid, vectorize=v, chunk_size=args.chunk_size
                )
            )
            for label, v in (("vectorized", True), ("loop", False), ("auto", "auto"))
        }
        ll_run, ll_err = loss_landscapes_run(model, loss_fn, batches, args.steps)
        if ll_run is not None:
            methods["loss-landscapes"] = ll_run
        for fn in methods.values():  # warm-up
            fn()
        per_point = {m: [] for m in methods}
        inside = {m: [] for m in methods}
        floors = []
        for _ in range(args.rounds):
            floor = floor_time(model, loss_fn, batches, args.device)
            floors.append(floor)
            for m, fn in methods.items():
                with ForwardTimer(model, args.device) as timer:
                    t = wall(fn, args.device)
                per_point[m].append(t / points)
                inside[m].append(t / timer.total)
        batch_note = f"batches of {args.batch_size}" if args.batch_size else "one batch"
        print(
            f"\n{name}: {n_params:,} params, {n} samples ({batch_note}); "
            f"raw forward pass {fmt(floors, 1e3, 3)} ms"
        )
        for m, ts in per_point.items():
            ratio = [t / f for t, f in zip(ts, floors, strict=True)]
            line = (
                f"  {m:22s} {fmt(ts, 1e3, 3)} ms/point   {fmt(ratio)} x forward   "
                f"{fmt(inside[m])} x its own forward calls"
            )
            if ll_run is not None and m != "loss-landscapes":
                speedup = [a / b for a, b in zip(per_point["loss-landscapes"], ts, strict=True)]
                line += f"   {fmt(speedup)} x faster than loss-landscapes"
            print(line)
        if ll_run is None:
            print(f"  {'loss-landscapes':22s} {ll_err}")


if __name__ == "__main__":
    main()
