"""Cost of Keskar sharpness per evaluation: wall time / (n_evals × one loss+gradient pass).

Target ≤ 1.1: the L-BFGS-B driver, the subspace products A y and Aᵀg and the float64
transfers should add at most 10 % to the passes themselves. Also printed: the same against
the floor of one plain ``loss.backward()`` pass per batch.

Run from the repository root: ``python benchmarks/bench_sharpness.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time

from _common import cnn_problem, gradient_pass_time, sync, timeit

from flatness import Objective, sharpness


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    model, loss_fn, batches = cnn_problem(device=args.device)
    obj = Objective(model, loss_fn, batches)
    t_pass = timeit(obj.loss_and_grad, repeat=args.repeat, device=args.device)
    t_floor = gradient_pass_time(model, loss_fn, batches, repeat=args.repeat, device=args.device)
    print(f"CNN: n = {obj.n} parameters, {sum(len(x) for x, _ in batches)} samples, device {args.device}")
    print(f"one Objective.loss_and_grad pass: {t_pass * 1e3:.1f} ms")
    print(f"one plain backward pass: {t_floor * 1e3:.1f} ms")

    for label, subspace in (("full space", None), ("subspace p=100", 100)):
        times, res = [], None
        for _ in range(args.repeat):
            sync(args.device)
            t0 = time.perf_counter()
            res = sharpness(model, loss_fn, batches, epsilon=1e-3, max_iter=10, subspace=subspace)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        assert res is not None
        wall = sorted(times)[len(times) // 2]
        print(
            f"{label:15s}: phi = {res.value:.4g} %, n_evals = {res.n_evals}, nit = {res.nit}, "
            f"wall = {wall:.2f} s, wall / (n_evals x pass) = {wall / (res.n_evals * t_pass):.3f} "
            f"(target <= 1.1), wall / (n_evals x plain backward) = {wall / (res.n_evals * t_floor):.3f}"
        )


if __name__ == "__main__":
    main()
