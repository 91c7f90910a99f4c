"""Accuracy of finite-difference Hessian-vector products in float64 / float32 / bfloat16.

Usage: python benchmarks/bench_fd.py [--samples 512] [--models mlp cnn transformer relu]
                                    [--dtypes float64 float32 bfloat16]

For each model (an MLP 64-32-32-10 with tanh, a CNN with SiLU and average pooling, a 2-layer
GELU transformer encoder built from a config, and the ReLU MLP of the other benchmarks) and each
dtype, the model's weights are rounded to the dtype and the reference is the exact
(double-backward) float64 Hessian of those rounded weights: top-5 eigenvalues by Lanczos at tol
1e-10 and the products H v. Printed: the relative error of ``hvp_mode="finite_difference"``
products and top-5 eigenvalues, and for comparison the exact double-backward mode run in the
same dtype (Lanczos tol 1e-8 / 1e-4 / 1e-2 for float64 / float32 / bfloat16, at most 150 products).
For the finite-difference rows also the non-smoothness guard (flatness.objective._fd.KinkGuard): its
threshold τ, its largest ratio ‖g₊ + g₋ − 2g₀‖/‖g₊ − g₋‖ over the three products and over the
top-5 run's products (until it warns), and whether it warned there (after how many products).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import small_mlp_problem

import flatness
from flatness.objective._fd import KinkGuard, NonSmoothWarning

F = nn.functional


def tanh_mlp_problem(n=512, batch_size=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return (
        model,
        F.cross_entropy,
        [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)],
    )


def smooth_cnn_problem(n=256, batch_size=128, seed=0):
    """Two conv + SiLU + average-pool blocks and a linear head on 16×16 images (smooth everywhere)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.SiLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.SiLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return (
        model,
        F.cross_entropy,
        [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)],
    )


class TinyTransformer(nn.Module):
    """Token embedding + nn.TransformerEncoder (from a config) + mean-pooled linear head."""

    def __init__(self, vocab=50, d_model=32, nhead=4, layers=2, ff=64, classes=4, seq=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, ff, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


def transformer_problem(n=256, batch_size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyTransformer()
    x = torch.randint(0, 50, (n, 12), generator=g)
    y = (x[:, 0] % 4).long()  # a learnable rule, so the loss is not flat
    return (
        model,
        F.cross_entropy,
        [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)],
    )


def cast_batches(batches, dtype):
    return [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in batches]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


DTYPES = {
    "float64": (torch.float64, 1e-8),
    "float32": (torch.float32, 1e-4),
    "bfloat16": (torch.bfloat16, 1e-2),
}


def measure(name, model, loss_fn, batches, dtypes=tuple(DTYPES)):
    print(f"\n{name}: n = {sum(p.numel() for p in model.parameters()):,}")
    print(f"{'dtype':>9} {'mode':>18} {'HVP rel err':>12} {'top-5 max rel err':>18} {'HVPs':>5}")
    for dtype, tol in (DTYPES[d] for d in dtypes):
        m = copy.deepcopy(model).to(dtype)
        data = cast_batches(batches, dtype)
        ref_model = copy.deepcopy(m).double()  # the same (rounded) weights, in float64
        ref_data = cast_batches(data, torch.float64)
        ref = flatness.Objective(ref_model, loss_fn, ref_data, hvp_mode="reverse")
        lam = flatness.hessian_topk(ref_model, loss_fn, ref_data, k=5, tol=1e-10).eigenvalues.double()
        gen = torch.Generator().manual_seed(0)
        vs = [torch.randn(ref.n, generator=gen, dtype=torch.float64) for _ in range(3)]
        exact = [ref.hvp(v) for v in vs]
        for mode in ("finite_difference", "reverse"):
            obj = flatness.Objective(m, loss_fn, data, hvp_mode=mode)
            err = max(rel(obj.hvp(v.to(dtype)), e) for v, e in zip(vs, exact, strict=True))
            run = {"worst": 0.0, "warned_at": None, "products": 0}
            original = KinkGuard.check

            def check(self, second, diff, run=run, original=original):
                original(self, second, diff)
                run["products"] += 1
                run["worst"] = max(run["worst"], self.worst)
                if self.warned and run["warned_at"] is None:
                    run["warned_at"] = run["products"]

            KinkGuard.check = check
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NonSmoothWarning)
                    top = flatness.hessian_topk(m, loss_fn, data, k=5, tol=tol, hvp_mode=mode, max_hvp=150)
            finally:
                KinkGuard.check = original
            lam_err = float(((top.eigenvalues.double() - lam).abs() / lam.abs()).max())
            line = f"{str(dtype)[6:]:>9} {mode:>18} {err:12.2e} {lam_err:18.2e} {top.n_matvec:5d}"
            if mode == "finite_difference":
                at = run["warned_at"]
                warned = f"warned at product {at}" if at else "no warning"
                line += (
                    f"  guard (τ = {obj._kinks.tol:.2g}): ratio {obj._kinks.worst:.1e} on the 3 vectors, "
                    f"{run['worst']:.1e} in the top-5 run ({warned})"
                )
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer", "relu"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()
    problems = {
        "mlp": ("MLP 64-32-32-10, tanh", lambda: tanh_mlp_problem(n=args.samples)),
        "cnn": ("CNN, SiLU + average pooling", lambda: smooth_cnn_problem(n=args.samples // 2)),
        "transformer": (
            "Transformer encoder, 2 GELU layers, d=32",
            lambda: transformer_problem(n=args.samples // 2),
        ),
        "relu": (
            "MLP 64-32-32-10, ReLU (not smooth)",
            lambda: small_mlp_problem(n=args.samples, batch_size=256),
        ),
    }
    for key in args.models:
        name, make = problems[key]
        measure(name, *make(), dtypes=args.dtypes)


if __name__ == "__main__":
    main()
