"""Cost of Keskar sharpness per evaluation: wall time / (n_evals × one loss+gradient pass).

Target ≤ 1.1: the L-BFGS-B driver, the subspace products A y and Aᵀg and the float64
transfers should add at most 10 % to the passes themselves. Also printed: the same against
the floor of one plain ``loss.backward()`` pass per batch.

The machine this was written on is noisy, so the run is split into interleaved rounds: each
round times the passes (median of three) and then both sharpness variants, and forms the
ratios within the round. Printed: the median over rounds and the range in brackets. Also
printed, and immune to that noise: wall / (time spent inside the loss+gradient passes of the
same run), i.e. the driver's own overhead.

Run from the repository root: ``python benchmarks/bench_sharpness.py [--rounds 5] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import cnn_problem, gradient_pass_time, sync, timeit

from flatness import Objective, sharpness


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


class PassTimer:
    """Wraps ``Objective.loss_and_grad`` to add up the time spent inside the passes."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.total = 0.0
        self._orig = Objective.loss_and_grad

    def __enter__(self) -> PassTimer:
        orig, timer = self._orig, self

        def timed(obj, theta=None):
            sync(timer.device)
            t0 = time.perf_counter()
            out = orig(obj, theta)
            sync(timer.device)
            timer.total += time.perf_counter() - t0
            return out

        Objective.loss_and_grad = timed
        return self

    def __exit__(self, *exc) -> None:
        Objective.loss_and_grad = self._orig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    model, loss_fn, batches = cnn_problem(device=args.device)
    obj = Objective(model, loss_fn, batches)
    print(f"CNN: n = {obj.n} parameters, {sum(len(x) for x, _ in batches)} samples, device {args.device}")
    variants = {"full space": None, "subspace p=100": 100}
    ratios = {k: [] for k in variants}
    floor_ratios = {k: [] for k in variants}
    inside = {k: [] for k in variants}
    info = {}
    passes, floors = [], []
    sharpness(model, loss_fn, batches, max_iter=1)  # warm-up
    for _ in range(args.rounds):
        t_pass = timeit(obj.loss_and_grad, repeat=3, device=args.device)
        t_floor = gradient_pass_time(model, loss_fn, batches, repeat=3, device=args.device)
        passes.append(t_pass)
        floors.append(t_floor)
        for label, subspace in variants.items():
            with PassTimer(args.device) as timer:
                sync(args.device)
                t0 = time.perf_counter()
                res = sharpness(model, loss_fn, batches, epsilon=1e-3, max_iter=10, subspace=subspace)
                sync(args.device)
                wall = time.perf_counter() - t0
            inside[label].append(wall / timer.total)
            ratios[label].append(wall / (res.n_evals * t_pass))
            floor_ratios[label].append(wall / (res.n_evals * t_floor))
            info[label] = f"phi = {res.value:.4g} %, n_evals = {res.n_evals}, nit = {res.nit}"
    print(f"one Objective.loss_and_grad pass: {fmt([t * 1e3 for t in passes])} ms")
    print(f"one plain backward pass:          {fmt([t * 1e3 for t in floors])} ms")
    print("rounds:", args.rounds, "(median [min-max])")
    for label in variants:
        print(
            f"{label:15s}: {info[label]}\n"
            f"    wall / (n_evals x loss_and_grad pass) = {fmt(ratios[label])}  (target <= 1.1)\n"
            f"    wall / (n_evals x plain backward pass) = {fmt(floor_ratios[label])}\n"
            f"    wall / (time inside this run's passes) = {fmt(inside[label])}"
        )


if __name__ == "__main__":
    main()
