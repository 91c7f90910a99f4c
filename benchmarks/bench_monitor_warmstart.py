"""HVPs per λ₁ record, warm vs cold starts, on an edge-of-stability run (Monitor, issue 15).

Full-batch gradient descent with step size η on a tanh MLP (64-32-32-10, MSE on one-hot targets,
500 of scikit-learn's digits): λ₁ rises to 2/η and hovers there (Cohen et al. 2021, arXiv
2103.00065). Every ``every`` steps three monitors record λ₁ of the same model at the same
tolerance: cold starts with hessian_topk's defaults (basis 20), cold starts with the warm
records' basis (8), and warm starts (the Monitor's default: the previous record's eigenvector
+ 0.1 · a random unit vector, basis 8). Prints HVPs per record (mean, median, ratios) and the
largest disagreement of the warm λ₁ with the cold one (a warm start must find the same λ₁).

Usage: ``python benchmarks/bench_monitor_warmstart.py [--steps 400] [--every 10] [--lr 0.2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from flatness import Monitor


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--tol", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args(argv)

    digits = load_digits()
    x = torch.tensor(digits.data[: args.n] / 16.0, dtype=torch.float32)
    y = nn.functional.one_hot(torch.tensor(digits.target[: args.n]), 10).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    variants = {}
    for tol in args.tol:
        top = {"tol": tol}
        variants[(tol, "cold, basis 20")] = Monitor(
            mse, (x, y), every=args.every, measures=["top_eigenvalue"], options={"top_eigenvalue": top},
            warm_start=False, learning_rate=args.lr,
        )  # fmt: skip
        variants[(tol, "cold, basis 8")] = Monitor(
            mse, (x, y), every=args.every, measures=["top_eigenvalue"],
            options={"top_eigenvalue": {**top, "ncv": 8}}, warm_start=False,
        )  # fmt: skip
        variants[(tol, "warm (Monitor default)")] = Monitor(
            mse, (x, y), every=args.every, measures=["top_eigenvalue"], options={"top_eigenvalue": top}
        )  # fmt: skip
    hvps: dict[tuple, list[int]] = {key: [] for key in variants}
    seconds: dict[tuple, float] = dict.fromkeys(variants, 0.0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        for key, monitor in variants.items():
            row = monitor.step(model)
            if row is not None:
                hvps[key].append(monitor.last_results["top_eigenvalue"].n_hvp)
                seconds[key] += row["time_s"]
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()

    print(
        f"edge of stability: GD, eta = {args.lr} (2/eta = {2 / args.lr:.2f}), {n_params} parameters, "
        f"{args.n} samples, {args.steps} steps, a record every {args.every} steps "
        f"({time.perf_counter() - t0:.0f} s in all)"
    )
    first = variants[(args.tol[0], "cold, basis 20")].records
    lams = [r["top_eigenvalue"] for r in first]
    print("lambda_1 over the run: " + " ".join(f"{v:.2f}" for v in lams[:: max(1, len(lams) // 15)]))
    late = lams[len(lams) // 3 :]
    print(
        f"last two thirds: lambda_1 * eta / 2 in [{min(late) * args.lr / 2:.2f}, {max(late) * args.lr / 2:.2f}]"
        " (1 = the edge)"
    )
    out = {}
    print(f"\n{'tol':>6}  {'start':<24}{'HVPs/record':>12}{'median':>8}{'s/record':>10}{'cold20/this':>12}")
    for tol in args.tol:
        base = statistics.mean(hvps[(tol, "cold, basis 20")][1:])
        cold = variants[(tol, "cold, basis 20")].records
        for name in ("cold, basis 20", "cold, basis 8", "warm (Monitor default)"):
            counts = hvps[(tol, name)][1:]  # the first record is a cold start for every variant
            mean = statistics.mean(counts)
            per = seconds[(tol, name)] / len(hvps[(tol, name)])
            print(
                f"{tol:6.0e}  {name:<24}{mean:12.1f}{statistics.median(counts):8.1f}{per:10.3f}{base / mean:12.2f}"
            )
            out[(tol, name)] = mean
        warm = variants[(tol, "warm (Monitor default)")].records
        worst = max(
            abs(w["top_eigenvalue"] - c["top_eigenvalue"]) / abs(c["top_eigenvalue"])
            for w, c in zip(warm, cold, strict=True)
        )
        print(f"{'':6}  largest |warm - cold| / cold lambda_1 over the records: {worst:.1e}")
    return out


if __name__ == "__main__":
    main()
