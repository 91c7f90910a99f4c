"""Accuracy of finite-difference Hessian-vector products in float64 / float32 / bfloat16.

Usage: python benchmarks/bench_fd.py [--samples 512]

For each model (the benchmark MLP at width 32, the benchmark CNN, a 2-layer transformer encoder
built from a config) and each dtype, the model's weights are rounded to the dtype and the
reference is the exact (double-backward) float64 Hessian of those rounded weights: top-5
eigenvalues by Lanczos at tol 1e-10 and the products H v. Printed: the relative error of
``hvp_mode="finite_difference"`` products and top-5 eigenvalues, and for comparison the exact
double-backward mode run in the same dtype.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import cnn_problem, small_mlp_problem

import flatness

F = nn.functional


class TinyTransformer(nn.Module):
    """Token embedding + nn.TransformerEncoder (from a config) + mean-pooled linear head."""

    def __init__(self, vocab=50, d_model=32, nhead=4, layers=2, ff=64, classes=4, seq=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True)
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
    return model, F.cross_entropy, [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def cast_batches(batches, dtype):
    return [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in batches]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(name, model, loss_fn, batches):
    print(f"\n{name}: n = {sum(p.numel() for p in model.parameters()):,}")
    print(f"{'dtype':>9} {'mode':>18} {'HVP rel err':>12} {'top-5 max rel err':>18} {'HVPs':>5}")
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
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
            top = flatness.hessian_topk(m, loss_fn, data, k=5, tol=tol, hvp_mode=mode, max_hvp=400)
            lam_err = float(((top.eigenvalues.double() - lam).abs() / lam.abs()).max())
            print(f"{str(dtype)[6:]:>9} {mode:>18} {err:12.2e} {lam_err:18.2e} {top.n_hvp:5d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    measure("MLP 64-32-32-10", *small_mlp_problem(n=args.samples, batch_size=256))
    measure("CNN (conv-BN x2, linear)", *cnn_problem(n=args.samples, batch_size=256))
    measure("Transformer encoder (2 layers, d=32)", *transformer_problem(n=args.samples // 2))


if __name__ == "__main__":
    main()
