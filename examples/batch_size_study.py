"""Does a larger batch lead to a sharper minimum and a worse test score? (Keskar et al., 2017)

The seed's question, on real data that installs offline: scikit-learn's bundled handwritten
digits (1,797 8×8 images, 10 classes; 80 % train / 20 % test, stratified). The same MLP is trained
with Adam from the same initialization with a small batch (SB), a large batch (LB), and the seed's
hybrid (SB for a few epochs, then LB), over several seeds, each run until its training loss reaches
the same target. For every run we measure, on the training loss (as Keskar et al. do):

- train / test loss and accuracy, and the generalization gap;
- Keskar's ε-sharpness φ in the full space (ε = 1e-3 and 5e-4) and in a random p = 100 subspace;
- adaptive (ASAM-style, reparametrization-invariant) worst-case sharpness;
- the top Hessian eigenvalues (Lanczos) and the Hessian trace (Hutch++);
- the 1-D interpolation between the SB and LB solutions, α ∈ [−1, 2] (Keskar's Fig. 3), and
  2-D filter-normalized landscapes of both (Li et al., 2018).

The report (Markdown + PNG figures + JSON) goes to the folder given by ``--out``.

    python examples/batch_size_study.py --out study-report            # ~2–3 min on 2 CPU cores
    python examples/batch_size_study.py --out study-report --quick    # ~1 min
    python examples/batch_size_study.py --out study-report --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import flatness
from flatness import (
    adaptive_sharpness,
    hessian_topk,
    hessian_trace,
    interpolate,
    landscape_2d,
    sharpness,
)

F = nn.functional


@dataclasses.dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    small_batch: int = 16
    large_batch: int = 512
    hybrid_sb_epochs: int = 5
    lr: float = 1e-3
    target_loss: float = 1e-3
    max_epochs_sb: int = 150
    max_epochs_lb: int = 2000
    epochs: int = 40
    protocols: tuple[str, ...] = ("epochs", "loss")
    hidden: int = 128
    eval_batch: int = 512
    top_k: int = 5
    trace_hvp: int = 60
    subspace_p: int = 100
    adaptive_rho: float = 0.05
    interp_points: int = 31
    grid_points: int = 21
    device: str = "cpu"

    @classmethod
    def quick(cls, device: str) -> Config:
        return cls(
            seeds=(0, 1),
            target_loss=1e-2,
            max_epochs_sb=60,
            max_epochs_lb=600,
            epochs=20,
            top_k=3,
            trace_hvp=30,
            interp_points=16,
            grid_points=11,
            device=device,
        )


# ----------------------------------------------------------------------------- data and model
def load_digits_split(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bundled digits, a fixed stratified 80/20 split, scaled with training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    # Centre per pixel, scale by one global std: pixels that are constant in the training split
    # (the image borders) must not be blown up by a per-pixel std of ~0.
    mean, std = x_tr.mean(0), x_tr.std()
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32, device=device)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64, device=device)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def make_model(seed: int, hidden: int, device: str) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    ).to(device)


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == targets).to(outputs.dtype).mean()


@torch.no_grad()
def evaluate(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    model.eval()
    n = sum(len(y) for _, y in data)
    loss = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in data) / n
    acc = sum(float((model(x).argmax(-1) == y).sum()) for x, y in data) / n
    return loss, acc


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: list[tuple[int, int]],
    cfg: Config,
    seed: int,
    stop_at_target: bool,
) -> dict[str, Any]:
    """Adam on ``schedule`` = [(batch_size, epochs), ...].

    With ``stop_at_target`` the last phase stops as soon as the full training loss reaches
    ``cfg.target_loss`` (its epochs are then a maximum).
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    full = batches(x, y, cfg.eval_batch)
    epochs, steps = 0, 0
    for phase, (batch_size, max_epochs) in enumerate(schedule):
        last = phase == len(schedule) - 1
        for _ in range(max_epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen).to(x.device)
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                steps += 1
            epochs += 1
            if stop_at_target and last and evaluate(model, full)[0] <= cfg.target_loss:
                break
    model.eval()
    return {"epochs": epochs, "steps": steps}


# ----------------------------------------------------------------------------- measures
def measure(model: nn.Module, train_data: list, cfg: Config, seed: int) -> dict[str, Any]:
    ce = F.cross_entropy
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for eps in (1e-3, 5e-4):
        r = sharpness(model, ce, train_data, epsilon=eps, seed=seed)
        out[f"sharpness_{eps:g}"] = r.value
    r = sharpness(model, ce, train_data, epsilon=1e-3, subspace=cfg.subspace_p, seed=seed)
    out["sharpness_sub_1e-3"] = r.value
    out["adaptive_sharpness"] = adaptive_sharpness(
        model, ce, train_data, rho=cfg.adaptive_rho, seed=seed
    ).value
    top = hessian_topk(model, ce, train_data, k=cfg.top_k, seed=seed, tol=1e-3)
    out["eigenvalues"] = [float(v) for v in top.eigenvalues]
    out["lambda_max"] = float(top.eigenvalues[0])
    out["eig_converged"] = bool(np.all(np.asarray(top.converged)))
    out["eig_hvp"] = int(top.n_hvp)
    tr = hessian_trace(model, ce, train_data, method="hutch++", n_hvp=cfg.trace_hvp, seed=seed)
    out["trace"] = float(tr.estimate)
    out["trace_se"] = float(tr.std_error)
    out["measure_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    if len(a) == 1:
        return f"{a[0]:.4g}"
    return f"{a.mean():.4g} ± {a.std(ddof=1):.2g}"


ROWS = [
    ("epochs", "epochs trained"),
    ("train_loss", "train loss"),
    ("train_acc", "train accuracy"),
    ("test_loss", "test loss"),
    ("test_acc", "test accuracy"),
    ("gap", "generalization gap (test − train loss)"),
    ("sharpness_0.001", "Keskar φ, ε = 1e-3 (%)"),
    ("sharpness_0.0005", "Keskar φ, ε = 5e-4 (%)"),
    ("sharpness_sub_1e-3", "Keskar φ, p = 100 subspace, ε = 1e-3 (%)"),
    ("adaptive_sharpness", "adaptive sharpness (ℓ2, ρ = {rho})"),
    ("lambda_max", "top Hessian eigenvalue λ₁"),
    ("trace", "Hessian trace (Hutch++)"),
]


def verdict(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Plain statements decided by the numbers, per seed."""
    sb, lb = runs["SB"], runs["LB"]
    lines = []

    def per_seed(key: str) -> np.ndarray:
        return np.array([b[key] / a[key] if a[key] > 0 else math.inf for a, b in zip(sb, lb, strict=True)])

    for key, name in [
        ("sharpness_0.001", "Keskar φ (ε = 1e-3)"),
        ("sharpness_sub_1e-3", "subspace φ"),
        ("adaptive_sharpness", "adaptive sharpness"),
        ("lambda_max", "λ₁"),
        ("trace", "trace"),
    ]:
        ratio = per_seed(key)
        sharper = int((ratio > 1).sum())
        lines.append(
            f"- **{name}**: LB / SB = {', '.join(f'{r:.2f}' for r in ratio)} per seed; "
            f"LB sharper in {sharper} of {len(ratio)} seeds."
        )
    acc = np.array([a["test_acc"] - b["test_acc"] for a, b in zip(sb, lb, strict=True)])
    gap = np.array([b["gap"] - a["gap"] for a, b in zip(sb, lb, strict=True)])
    lines.append(
        f"- **Test accuracy**: SB − LB = {', '.join(f'{100 * d:+.2f}' for d in acc)} points per seed "
        f"(SB better in {int((acc > 0).sum())} of {len(acc)})."
    )
    acc_gap = np.array(
        [
            (b["train_acc"] - b["test_acc"]) - (a["train_acc"] - a["test_acc"])
            for a, b in zip(sb, lb, strict=True)
        ]
    ).round(9)  # accuracies are multiples of 1/n: drop float noise before counting signs
    lines.append(
        f"- **Accuracy gap** (train − test accuracy, Keskar et al.'s sense): LB − SB = "
        f"{', '.join(f'{round(100 * d, 2) + 0.0:+.2f}' for d in acc_gap)} points per seed "
        f"(LB larger in {int((acc_gap > 0).sum())} of {len(acc_gap)})."
    )
    lines.append(
        f"- **Loss gap** (test − train loss): LB − SB = {', '.join(f'{d:+.3f}' for d in gap)} per seed "
        f"(LB larger in {int((gap > 0).sum())} of {len(gap)}; a near-zero training loss inflates the "
        "loss gap, so it can favour LB even where LB tests worse)."
    )
    phi_ratio = per_seed("sharpness_0.001")
    keskar_like = bool(np.all(phi_ratio >= 10))
    sharper_all = bool(np.all(phi_ratio > 1))
    worse_all = bool(np.all(acc > 0))
    if sharper_all and worse_all:
        claim = "reproduces in direction: every LB solution is sharper and tests worse than its SB twin"
        claim += (
            ", with Keskar's one-to-two orders of magnitude in φ."
            if keskar_like
            else f", but the sharpness ratio ({phi_ratio.min():.1f}–{phi_ratio.max():.1f}×) is far below "
            "Keskar's 10–100×."
        )
    elif sharper_all:
        claim = (
            "reproduces only in part: LB solutions are sharper in every seed, but they do not test worse "
            "in every seed, so sharpness does not carry the generalization claim at this scale."
        )
    else:
        claim = "does not reproduce: LB solutions are not consistently sharper than SB ones at this scale."
    hy = runs.get("hybrid")
    if hy:
        hy_phi = np.mean([r["sharpness_0.001"] for r in hy])
        sb_phi = np.mean([r["sharpness_0.001"] for r in sb])
        lb_phi = np.mean([r["sharpness_0.001"] for r in lb])
        hy_acc = np.mean([r["test_acc"] for r in hy])
        lines.append(
            f"- **Hybrid** (SB then LB): mean φ = {hy_phi:.3g} (SB {sb_phi:.3g}, LB {lb_phi:.3g}); "
            f"test accuracy {100 * hy_acc:.2f} % (SB {100 * np.mean([r['test_acc'] for r in sb]):.2f} %, "
            f"LB {100 * np.mean([r['test_acc'] for r in lb]):.2f} %)."
        )
    return [f"**The claim {claim}**", "", *lines]


def summary(by_protocol: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """One line per protocol, then what the pair of protocols says, decided by the numbers."""
    lines = []
    outcome = {}
    for protocol, runs in by_protocol.items():
        sb, lb = runs["SB"], runs["LB"]
        ratio = np.array([b["sharpness_0.001"] / a["sharpness_0.001"] for a, b in zip(sb, lb, strict=True)])
        acc = np.array([a["test_acc"] - b["test_acc"] for a, b in zip(sb, lb, strict=True)])
        loss_ratio = np.mean([b["train_loss"] for b in lb]) / np.mean([a["train_loss"] for a in sb])
        outcome[protocol] = bool(np.all(ratio > 1) and np.all(acc > 0))
        lines.append(
            f"- **{PROTOCOLS[protocol][0]}**: LB/SB Keskar φ = {np.median(ratio):.2g}× (median over seeds; "
            f"LB sharper in {int((ratio > 1).sum())}/{len(ratio)}), SB − LB test accuracy = "
            f"{100 * acc.mean():+.2f} points, LB/SB training loss = {loss_ratio:.2g}×."
        )
    if outcome.get("epochs") and outcome.get("loss") is False:
        lines += [
            "",
            "**Conclusion.** With the paper's protocol (equal epochs) large batches end sharper and test worse, "
            "as Keskar et al. report — but the large-batch runs have not reached the small-batch runs' training "
            "loss. Trained to the same training loss, large-batch solutions are no sharper and test no worse. "
            "At this scale the sharp-minimum signal tracks how far training got, not the batch size itself.",
        ]
    elif all(outcome.values()):
        lines += ["", "**Conclusion.** The claim reproduces under both protocols."]
    elif not any(outcome.values()):
        lines += ["", "**Conclusion.** The claim does not reproduce under either protocol at this scale."]
    return lines


PROTOCOLS = {
    "epochs": (
        "Equal epochs (Keskar et al.'s protocol)",
        "Every regime trains for the same number of epochs ({epochs}); the hybrid spends "
        "{hybrid} of them with the small batch.",
    ),
    "loss": (
        "Equal training loss (controls for the loss level)",
        "Every regime trains until its full training loss is ≤ {target:g}, so the minima are "
        "compared at the same height: the Hessian of the cross-entropy shrinks as the loss goes to "
        "zero, so a solution trained further looks flatter for that reason alone.",
    ),
}


def results_table(runs: dict[str, list[dict[str, Any]]], cfg: Config) -> list[str]:
    lines = ["| measure | " + " | ".join(runs) + " |", "| --- | " + " | ".join("---" for _ in runs) + " |"]
    for key, label in ROWS:
        label = label.format(rho=cfg.adaptive_rho)
        cells = " | ".join(mean_std([r[key] for r in rs]) for rs in runs.values())
        lines.append(f"| {label} | {cells} |")
    eig = "; ".join(
        f"{name}: " + ", ".join(f"{v:.3g}" for v in rs[0]["eigenvalues"]) for name, rs in runs.items()
    )
    return [*lines, "", f"Top-{cfg.top_k} Hessian eigenvalues (seed {cfg.seeds[0]}): {eig}"]


def write_report(out: Path, cfg: Config, by_protocol: dict, extras: dict, seconds: float) -> None:
    lines = [
        "# Batch-size study: do large batches find sharper minima that generalize worse?",
        "",
        f"Generated by `examples/batch_size_study.py` (flatness {flatness.__version__}, torch "
        f"{torch.__version__}, device {cfg.device}) in {seconds / 60:.1f} minutes.",
        "",
        "**Setup.** scikit-learn's handwritten digits (1,437 train / 360 test, 8×8 pixels, 10 classes), an "
        f"MLP 64-{cfg.hidden}-{cfg.hidden}-10 (ReLU), Adam (lr {cfg.lr}) as in Keskar et al., the same "
        f"initialization and data order seed for every regime of a seed. SB: batch {cfg.small_batch}; LB: "
        f"batch {cfg.large_batch} ({100 * cfg.large_batch / 1437:.0f} % of the training set); hybrid: batch "
        f"{cfg.small_batch} for {cfg.hybrid_sb_epochs} epochs, then {cfg.large_batch}. Seeds: "
        f"{', '.join(map(str, cfg.seeds))}. All measures are on the full training loss, eval mode, float32. "
        "Two protocols: equal epochs, as in the paper, and equal training loss.",
        "",
        "## Summary",
        "",
        *summary(by_protocol),
        "",
    ]
    for protocol, runs in by_protocol.items():
        title, text = PROTOCOLS[protocol]
        lines += [
            f"## {title}",
            "",
            text.format(epochs=cfg.epochs, hybrid=cfg.hybrid_sb_epochs, target=cfg.target_loss),
            "",
            "### Verdict",
            "",
            *verdict(runs),
            "",
            "### Results (mean ± std over seeds)",
            "",
            *results_table(runs, cfg),
            "",
            "### Figures",
            "",
            "Interpolation between the SB and LB solutions of the first seed, θ(α) = (1 − α) θ_SB + α θ_LB "
            "(Keskar et al. Fig. 3), on the training and test data:",
            "",
            f"![interpolation](interpolation_{protocol}.png)",
            "",
            "2-D loss landscapes around the SB and LB solutions along two filter-normalized random "
            "directions (Li et al., 2018; same seed for both):",
            "",
            f"![landscapes](landscapes_{protocol}.png)",
            "",
        ]
    lines += [
        "## Sharpness against the generalization gap",
        "",
        "One point per run, both protocols; the gap is Keskar et al.'s, in accuracy (train − test):",
        "",
        "![sharpness vs gap](sharpness_vs_gap.png)",
        "",
        "## Caveats",
        "",
        "- Keskar's φ is not invariant to reparametrization (Dinh et al., 2017): rescaling the layers of a "
        "ReLU network changes it without changing the function. The adaptive sharpness row is invariant to "
        "that rescaling.",
        "- Small data and a small MLP: this tests the claim at this scale, not on Keskar's networks.",
        "- Keskar's φ here is a 10-iteration L-BFGS-B maximization (a lower bound on the box maximum); "
        f"all Lanczos eigenpairs converged to tol 1e-3: {extras['all_converged']}.",
        "",
        "Raw numbers for every run: `results.json`.",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def figures(out: Path, by_protocol: dict, curves: dict, grids: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flatness import plot

    for protocol, (interp, interp_test) in curves.items():
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        plot.plot_1d(interp, ax=ax[0], log=True, label="train")
        plot.plot_1d(interp_test, ax=ax[0], log=True, label="test")
        ax[0].set_title(f"loss along (1 − α) θ_SB + α θ_LB ({protocol})")
        ax[0].legend()
        for res, name in ((interp, "train"), (interp_test, "test")):
            ax[1].plot(res.alphas, 100 * res.metrics["accuracy"], label=name)
        ax[1].set_xlabel("α")
        ax[1].set_ylabel("accuracy (%)")
        ax[1].set_title("accuracy (α = 0: SB, α = 1: LB)")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(out / f"interpolation_{protocol}.png", dpi=110)
        plt.close(fig)

        pair = grids[protocol]
        # One colour scale for the pair, so SB and LB compare by eye.
        logs = np.concatenate([np.log10(g.loss[g.loss > 0]).ravel() for g in pair.values()])
        levels = np.linspace(logs.min(), logs.max(), 21) if logs.size and logs.max() > logs.min() else 20
        fig, axes = plt.subplots(1, len(pair), figsize=(5.5 * len(pair), 4.5))
        for ax_, (name, grid) in zip(np.atleast_1d(axes), pair.items(), strict=True):
            plot.plot_contour(grid, ax=ax_, log=True, filled=True, levels=levels)
            ax_.set_title(f"{name}, {protocol} protocol (log loss)")
        fig.tight_layout()
        fig.savefig(out / f"landscapes_{protocol}.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {"epochs": "o", "loss": "s"}
    for protocol, runs in by_protocol.items():
        for name, rs in runs.items():
            ax.scatter(
                [r["sharpness_0.001"] for r in rs],
                [100 * (r["train_acc"] - r["test_acc"]) for r in rs],
                marker=markers.get(protocol, "o"),
                label=f"{name} ({protocol})",
            )
    ax.set_xscale("log")
    ax.set_xlabel("Keskar φ, ε = 1e-3 (%)")
    ax.set_ylabel("accuracy gap, train − test (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sharpness_vs_gap.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="study-report", help="folder for the report (created)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer epochs, smaller grids (~1 min)")
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    parser.add_argument("--protocols", default=None, help="comma-separated: epochs,loss (default both)")
    args = parser.parse_args(argv)
    cfg = Config.quick(args.device) if args.quick else Config(device=args.device)
    if args.seeds is not None:
        cfg.seeds = tuple(range(args.seeds))
    if args.protocols is not None:
        cfg.protocols = tuple(p for p in args.protocols.split(",") if p)
        unknown = [p for p in cfg.protocols if p not in PROTOCOLS]
        if unknown or not cfg.protocols:
            parser.error(f"--protocols: unknown {unknown}; choose from {list(PROTOCOLS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_digits_split(cfg.device)
    train_data = batches(x_tr, y_tr, cfg.eval_batch)
    test_data = batches(x_te, y_te, cfg.eval_batch)
    sb, lb, e_sb = cfg.small_batch, cfg.large_batch, cfg.hybrid_sb_epochs
    schedules = {
        "epochs": {
            "SB": [(sb, cfg.epochs)],
            "LB": [(lb, cfg.epochs)],
            "hybrid": [(sb, e_sb), (lb, cfg.epochs - e_sb)],
        },
        "loss": {
            "SB": [(sb, cfg.max_epochs_sb)],
            "LB": [(lb, cfg.max_epochs_lb)],
            "hybrid": [(sb, e_sb), (lb, cfg.max_epochs_lb)],
        },
    }
    by_protocol: dict[str, dict[str, list[dict[str, Any]]]] = {}
    models: dict[tuple[str, str, int], nn.Module] = {}
    for protocol in cfg.protocols:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in schedules[protocol]}
        for seed in cfg.seeds:
            for name, schedule in schedules[protocol].items():
                t0 = time.perf_counter()
                model = make_model(seed, cfg.hidden, cfg.device)
                info = train(model, x_tr, y_tr, schedule, cfg, seed, stop_at_target=protocol == "loss")
                tr_loss, tr_acc = evaluate(model, train_data)
                te_loss, te_acc = evaluate(model, test_data)
                row = {
                    "seed": seed,
                    **info,
                    "train_loss": tr_loss,
                    "train_acc": tr_acc,
                    "test_loss": te_loss,
                    "test_acc": te_acc,
                    "gap": te_loss - tr_loss,
                    "train_seconds": time.perf_counter() - t0,
                }
                row.update(measure(model, train_data, cfg, seed))
                runs[name].append(row)
                models[(protocol, name, seed)] = model
                print(
                    f"[{time.perf_counter() - start:6.1f}s] {protocol:6s} seed {seed} {name:6s} "
                    f"epochs {info['epochs']:4d} train loss {tr_loss:.2e} test acc {100 * te_acc:5.2f}% "
                    f"gap {row['gap']:.3f} φ {row['sharpness_0.001']:.3g} λ1 {row['lambda_max']:.3g}",
                    flush=True,
                )
        by_protocol[protocol] = runs

    seed0 = cfg.seeds[0]
    alphas = np.linspace(-1.0, 2.0, cfg.interp_points)
    coords = np.linspace(-1.0, 1.0, cfg.grid_points)
    metrics = {"accuracy": accuracy}
    curves, grids = {}, {}
    for protocol in cfg.protocols:
        m_sb, m_lb = models[(protocol, "SB", seed0)], models[(protocol, "LB", seed0)]
        curves[protocol] = tuple(
            interpolate(m_sb, m_lb, F.cross_entropy, data, alphas=alphas, metrics=metrics)
            for data in (train_data, test_data)
        )
        grids[protocol] = {
            name: landscape_2d(m, F.cross_entropy, train_data, alphas=coords, betas=coords, seed=seed0)
            for name, m in (("SB", m_sb), ("LB", m_lb))
        }
    extras = {
        "all_converged": all(
            r["eig_converged"] for runs in by_protocol.values() for rs in runs.values() for r in rs
        )
    }
    seconds = time.perf_counter() - start
    results = {
        "config": dataclasses.asdict(cfg),
        "runs": by_protocol,
        "interpolation": {
            protocol: {
                "alphas": pair[0].alphas.tolist(),
                "train_loss": pair[0].loss.tolist(),
                "test_loss": pair[1].loss.tolist(),
                "train_accuracy": pair[0].metrics["accuracy"].tolist(),
                "test_accuracy": pair[1].metrics["accuracy"].tolist(),
            }
            for protocol, pair in curves.items()
        },
        "landscape_loss": {p: {k: g.loss.tolist() for k, g in pair.items()} for p, pair in grids.items()},
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    try:
        figures(out, by_protocol, curves, grids)
    except ImportError as err:  # matplotlib is an optional extra
        print(f"figures skipped: {err}", file=sys.stderr)
    write_report(out, cfg, by_protocol, extras, seconds)
    print(f"report: {out / 'README.md'} ({seconds / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
