"""Curvature-operator products against one gradient pass, and against curvlinops, side by side.

Usage: python benchmarks/bench_operators.py [--device cuda] [--rounds 5] [--problem cnn|mlp]

Each round times, in turn and in one process: a full-data gradient pass (the floor), flatness's
Hessian, GGN, exact Fisher, Monte-Carlo Fisher (1 sample) and empirical-Fisher products, and
curvlinops' ``GGNLinearOperator`` / ``HessianLinearOperator`` / ``EFLinearOperator`` products on the
same model, batches and vector (when curvlinops is installed: ``pip install curvlinops-for-pytorch``;
never a dependency). The figure per method is the median over rounds [min–max], in gradient
passes and in milliseconds. Products are checked to agree (relative difference printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import cnn_problem, gradient_pass_time, mlp_problem, sync

from flatness import EmpiricalFisherOperator, FisherOperator, GGNOperator, HessianOperator


def once(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--problem", default="cnn", choices=["cnn", "mlp"])
    args = parser.parse_args()
    torch.manual_seed(0)
    problem = cnn_problem if args.problem == "cnn" else mlp_problem
    model, loss_fn, batches = problem(device=args.device)
    model.eval()
    ops = {
        "flatness Hessian": HessianOperator(model, loss_fn, batches),
        "flatness GGN": GGNOperator(model, loss_fn, batches),
        "flatness Fisher (exact)": FisherOperator(model, loss_fn, batches),
        "flatness Fisher (MC, 1)": FisherOperator(model, loss_fn, batches, mc_samples=1),
        "flatness empirical Fisher": EmpiricalFisherOperator(model, loss_fn, batches),
    }
    n = ops["flatness GGN"].shape[0]
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(args.device)
    methods = {name: (lambda op=op: op.matvec(v)) for name, op in ops.items()}
    reference = {name: fn() for name, fn in methods.items()}
    try:
        from curvlinops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator

        params = [p for p in model.parameters() if p.requires_grad]
        sizes = [p.numel() for p in params]
        v_list = [t.reshape(p.shape) for t, p in zip(torch.split(v, sizes), params, strict=True)]
        for label, cls in (
            ("curvlinops GGN", GGNLinearOperator),
            ("curvlinops Hessian", HessianLinearOperator),
            ("curvlinops empirical Fisher", EFLinearOperator),
        ):
            op = cls(model, torch.nn.CrossEntropyLoss(), params, batches, check_deterministic=False)

            def product(op=op):
                out = op @ v_list
                return torch.cat([t.reshape(-1) for t in out])

            methods[label] = product
            reference[label] = product()
    except ImportError:
        print("curvlinops is not installed: flatness only")
    for label, twin in (
        ("curvlinops GGN", "flatness GGN"),
        ("curvlinops Hessian", "flatness Hessian"),
        ("curvlinops empirical Fisher", "flatness empirical Fisher"),
        ("flatness Fisher (exact)", "flatness GGN"),
    ):
        if label in reference:
            a, b = reference[label].double(), reference[twin].double()
            print(f"{label} vs {twin}: relative difference {float((a - b).norm() / b.norm()):.1e}")
    floors, times = [], {name: [] for name in methods}
    for _ in range(args.rounds):
        floors.append(gradient_pass_time(model, loss_fn, batches, repeat=1, device=args.device))
        for name, fn in methods.items():
            times[name].append(once(fn, args.device))
    floor = statistics.median(floors)
    samples = sum(len(b[0]) for b in batches)
    print(f"\n{args.problem} ({n} parameters, {samples} samples in {len(batches)} batches, {args.device}), ")
    print(
        f"gradient pass (floor): {floor * 1e3:.1f} ms; median [min-max] over {args.rounds} interleaved rounds"
    )
    for name, ts in times.items():
        ratios = [t / floor for t in ts]
        print(
            f"  {name:30s} {statistics.median(ts) * 1e3:8.1f} ms  "
            f"{statistics.median(ratios):5.2f} [{min(ratios):.2f}-{max(ratios):.2f}] gradient passes"
        )


if __name__ == "__main__":
    main()
