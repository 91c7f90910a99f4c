"""One full-data HVP divided by one full-data gradient pass (the floor), per HVP mode.

Usage: python benchmarks/bench_hvp.py [--device cuda] [--repeat 5]

Pearlmutter's bound puts an HVP at about 2 gradient passes; a plain double backward costs
about 3 on a small CNN. With the gradient graphs kept (``Objective.reusing_graph``, what the
spectrum functions do for data of up to 8 batches that fit), a product is one backward pass
through them per batch. PyHessian's HVP (double backward over the batches, summing
``torch.autograd.grad`` per batch) is reproduced inline for comparison, since PyHessian is not
on the package index here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import cnn_problem, gradient_pass_time, mlp_problem, resnet18_problem, timeit

from flatness import Objective


def pyhessian_style_hvp(model, loss_fn, batches, v_list):
    """PyHessian's dataloader_hv_product: double backward per batch, weighted by batch size."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in batches:
        model.zero_grad()
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v_list)
        total = [t + h * len(x) for t, h in zip(total, hv, strict=True)]
        n += len(x)
    return [t / n for t in total]


def run(name, problem, device, repeat):
    model, loss_fn, batches = problem(device=device)
    model.eval()
    floor = gradient_pass_time(model, loss_fn, batches, repeat=repeat, device=device)
    rows = [("gradient pass (floor)", floor)]
    obj = Objective(model, loss_fn, batches)
    rows.append(("flatness loss_and_grad", timeit(obj.loss_and_grad, repeat=repeat, device=device)))
    v = torch.randn(obj.n, device=device, generator=torch.Generator(device).manual_seed(0))
    for mode in ("forward", "reverse"):
        o = Objective(model, loss_fn, batches, hvp_mode=mode)
        rows.append((f"flatness hvp ({mode})", timeit(lambda o=o: o.hvp(v), repeat=repeat, device=device)))
    # Inside reusing_graph(): the first product keeps each batch's gradient graph (the warm-up
    # call of timeit), the timed ones are one backward pass per batch.
    o = Objective(model, loss_fn, batches)
    with o.reusing_graph():
        t = timeit(lambda: o.hvp(v), repeat=repeat, device=device)
        assert o.graph_reused
    rows.append(("flatness hvp (graph kept)", t))
    v_list = [t.clone() for t in obj.unflatten(v).values()]
    rows.append(
        (
            "PyHessian-style hvp",
            timeit(
                lambda: pyhessian_style_hvp(model, loss_fn, batches, v_list), repeat=repeat, device=device
            ),
        )
    )
    print(f"\n{name} ({obj.n} parameters, {sum(len(b[0]) for b in batches)} samples, {device})")
    for label, t in rows:
        print(f"  {label:28s} {t * 1e3:9.2f} ms   ratio to floor {t / floor:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--resnet", action="store_true", help="also ResNet-18 (11M parameters; for GPUs)")
    args = parser.parse_args()
    torch.manual_seed(0)
    run("MLP", mlp_problem, args.device, args.repeat)
    run("CNN + BatchNorm", cnn_problem, args.device, args.repeat)
    if args.resnet:
        run("ResNet-18", resnet18_problem, args.device, args.repeat)


if __name__ == "__main__":
    main()
