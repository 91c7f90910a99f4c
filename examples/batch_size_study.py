"""Do larger batches find sharper minima, and do sharper minima generalize worse? (Keskar et al., 2017)

A batch-size sweep on real data that installs offline: scikit-learn's bundled handwritten digits
(1,797 8×8 images, 10 classes; 80 % train / 20 % test, stratified). Two architectures (an MLP and a
small CNN) are trained with Adam from the same initialization at each of six batch sizes, from 16
to the full training set (full batch), over several seeds, under two protocols:

- equal epochs (Keskar et al.'s protocol): every run trains for the same number of epochs;
- equal training loss (Jiang et al. 2019's stopping rule): every run stops at the first step
  where its full training loss is at or below a common target.

For every trained model, on the full training loss (as Keskar et al. do): Keskar's ε-sharpness φ,
adaptive worst-case and average-case sharpness (Andriushchenko et al. 2023), the top Hessian
eigenvalue λ₁ and the Hessian trace, the Gauss–Newton (GGN) λ₁ and trace, λ₁ of each layer's
diagonal Hessian block, train / test loss and accuracy, and the steps taken.

Each measure is then judged as Jiang et al. ("Fantastic generalization measures", 2019, arXiv
1912.02178) judge one: by Kendall's rank correlation τ with the generalization gap — here the
test error minus the training error, in percentage points (their definition, with the 0-1 loss) —
over all models, and conditioned on one varied factor at a time (their granulated τ), with
bootstrap intervals. The report (Markdown + PNG figures + results.json) goes to ``--out``.

    python examples/batch_size_study.py --out study-report            # about 8 CPU-minutes
    python examples/batch_size_study.py --out study-report --quick    # about 70 CPU-seconds
    python examples/batch_size_study.py --out study-report --device cuda
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import flatness
from flatness import (
    adaptive_sharpness,
    average_sharpness,
    hessian_topk,
    hessian_trace,
    sharpness,
)

F = nn.functional
N_TRAIN = 1437  # training split of the digits (80 % of 1,797)
LOSS_TOLERANCE = 0.1  # equal-loss runs stop in [(1 − LOSS_TOLERANCE) × target, target]
GAP = "gap"  # the one generalization gap of this study: test error − train error (points)


@dataclasses.dataclass
class Config:
    archs: tuple[str, ...] = ("mlp", "cnn")
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 512, N_TRAIN)
    seeds: tuple[int, ...] = (0, 1, 2)
    protocols: tuple[str, ...] = ("epochs", "loss")
    lr: float = 1e-3
    epochs: int = 20  # equal-epochs protocol
    target_loss: float = 1e-2  # equal-loss protocol (Jiang et al. stop at cross-entropy 0.01)
    max_steps: int = 4000  # equal-loss protocol: a run that has not reached the target by then fails
    close_factor: float = 1.5  # below close_factor × target, the loss is checked after every step
    epsilon: float = 1e-3  # Keskar's box half-width
    adaptive_rho: float = 0.05
    adaptive_iter: int = 10
    average_rho: float = 0.1
    average_samples: int = 16
    trace_hvp: int = 15
    bootstrap: int = 1000
    device: str = "cpu"

    @classmethod
    def quick(cls, device: str) -> Config:
        return cls(
            batch_sizes=(32, 256, N_TRAIN),
            seeds=(0,),
            epochs=10,
            target_loss=3e-2,
            trace_hvp=9,
            average_samples=8,
            adaptive_iter=5,
            bootstrap=300,
            device=device,
        )


# ----------------------------------------------------------------------------- data and models
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


ARCHS = {
    "mlp": "MLP 64-128-128-10 (ReLU), 26,122 parameters",
    "cnn": "CNN conv 3×3/2 (16) – conv 3×3/2 (32) – linear 128-10 (ReLU), 6,090 parameters",
}


def make_model(arch: str, seed: int, device: str) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "mlp":
        layers: list[tuple[str, nn.Module]] = [
            ("fc1", nn.Linear(64, 128)),
            ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(128, 128)),
            ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(128, 10)),
        ]
    elif arch == "cnn":
        layers = [
            ("image", nn.Unflatten(1, (1, 8, 8))),
            ("conv1", nn.Conv2d(1, 16, 3, stride=2, padding=1)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(16, 32, 3, stride=2, padding=1)),
            ("relu2", nn.ReLU()),
            ("flat", nn.Flatten()),
            ("fc", nn.Linear(128, 10)),
        ]
    else:
        raise ValueError(f"arch: unknown {arch!r}; choose from {list(ARCHS)}")
    return nn.Sequential(collections.OrderedDict(layers)).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the whole set, in one batch (eval mode)."""
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean())


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, cfg: Config, seed: int, protocol: str
) -> dict[str, Any]:
    """Adam at ``batch_size``; ``protocol`` "epochs": cfg.epochs epochs; "loss": until the full
    training loss is ≤ cfg.target_loss (checked after every epoch, and after every step once it is
    below close_factor × target, so that each run stops within one step of the target)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    steps, epochs, reached, close = 0, 0, protocol == "epochs", False
    model.train()
    while True:
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            steps += 1
            if protocol == "loss" and close and evaluate(model, x, y)[0] <= cfg.target_loss:
                reached = True
                break
        epochs += 1
        if protocol == "epochs":
            if epochs >= cfg.epochs:
                break
            continue
        if reached:
            break
        loss = evaluate(model, x, y)[0]
        if loss <= cfg.target_loss:
            reached = True
            break
        close = loss <= cfg.close_factor * cfg.target_loss
        if steps >= cfg.max_steps:
            break
    model.eval()
    return {"steps": steps, "epochs": epochs, "reached_target": reached}


# ----------------------------------------------------------------------------- measures
MEASURES = {  # key: (label, what it is)
    "phi": ("Keskar φ", "Keskar et al.'s ε-sharpness, ε = {epsilon:g}, full space, in %"),
    "adaptive": ("adaptive sharpness", "worst-case adaptive ℓ2 sharpness, ρ = {adaptive_rho:g}"),
    "average": (
        "average sharpness",
        "average-case adaptive sharpness, ρ = {average_rho:g}, {average_samples} draws",
    ),
    "lambda_max": ("Hessian λ₁", "top Hessian eigenvalue (Lanczos, tol 1e-3)"),
    "trace": ("Hessian trace", "Hutch++, {trace_hvp} products"),
    "ggn_lambda_max": ("GGN λ₁", "top Gauss–Newton eigenvalue"),
    "ggn_trace": ("GGN trace", "Hutch++ on the GGN, {trace_hvp} products"),
    "layer_first": ("λ₁ first layer", "top eigenvalue of the first layer's Hessian block"),
    "layer_last": ("λ₁ last layer", "top eigenvalue of the last layer's Hessian block"),
}
REFERENCES = {  # not sharpness measures: what a measure should beat
    "train_loss": ("train loss", "final full training loss (reference)"),
    "batch_size": ("batch size", "the batch size itself (reference)"),
}


def measure(model: nn.Module, data: list, cfg: Config, seed: int) -> dict[str, Any]:
    ce = F.cross_entropy
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    out["phi"] = sharpness(model, ce, data, epsilon=cfg.epsilon, seed=seed).value
    out["adaptive"] = adaptive_sharpness(
        model, ce, data, rho=cfg.adaptive_rho, max_iter=cfg.adaptive_iter, seed=seed
    ).value
    avg = average_sharpness(model, ce, data, rho=cfg.average_rho, n_samples=cfg.average_samples, seed=seed)
    out["average"], out["average_se"] = avg.value, avg.std_error
    converged = []
    for prefix, curvature in (("", "hessian"), ("ggn_", "ggn")):
        top = hessian_topk(model, ce, data, seed=seed, curvature=curvature)
        out[f"{prefix}lambda_max"] = float(top.eigenvalues[0])
        converged.append(bool(np.all(np.asarray(top.converged))))
        tr = hessian_trace(model, ce, data, n_hvp=cfg.trace_hvp, seed=seed, curvature=curvature)
        out[f"{prefix}trace"], out[f"{prefix}trace_se"] = float(tr.estimate), float(tr.std_error)
    blocks = hessian_topk(model, ce, data, seed=seed, blocks="module")
    layers = {name: float(blocks[name].eigenvalues[0]) for name in blocks}
    converged += [bool(np.all(np.asarray(blocks[name].converged))) for name in blocks]
    out["layers"] = layers
    out["layer_first"], out["layer_last"] = layers[next(iter(layers))], layers[list(layers)[-1]]
    out["eig_converged"] = all(converged)
    out["measure_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- rank correlations
def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's τ_b (scipy.stats.kendalltau, ties as in scipy); nan when either side is constant."""
    from scipy.stats import kendalltau

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(kendalltau(a, b, variant="b").statistic)


def kendall_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """τ_b of each row pair of ``a`` and ``b`` (shape (B, n)), the formula scipy uses, vectorized
    for the bootstrap: τ_b = Σ_{i<j} sgn(a_i − a_j) sgn(b_i − b_j) / √((n₀ − n₁)(n₀ − n₂)),
    n₀ = n(n − 1)/2 pairs, n₁ / n₂ pairs tied in a / in b; nan where a row is constant."""
    da = np.sign(a[:, :, None] - a[:, None, :])
    db = np.sign(b[:, :, None] - b[:, None, :])
    n = a.shape[1]
    n0 = n * (n - 1) / 2
    s = (da * db).sum((1, 2)) / 2
    ties_a = ((da == 0).sum((1, 2)) - n) / 2
    ties_b = ((db == 0).sum((1, 2)) - n) / 2
    denom = np.sqrt((n0 - ties_a) * (n0 - ties_b))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, s / np.where(denom > 0, denom, 1), np.nan)


def interval(samples: np.ndarray) -> tuple[float, float]:
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(s, [2.5, 97.5])
    return float(lo), float(hi)


def _entry(tau: float, samples: np.ndarray, n_models: int, n_groups: int | None = None) -> dict[str, Any]:
    lo, hi = interval(samples)
    entry: dict[str, Any] = {"tau": tau, "low": lo, "high": hi, "n_models": n_models}
    if n_groups is not None:
        entry["n_groups"] = n_groups
    entry["distinguishable_from_zero"] = bool(not math.isnan(lo) and (lo > 0 or hi < 0))
    return entry


def overall_tau(
    runs: list[dict], key: str, rng: np.random.Generator, n_boot: int, target: str = GAP
) -> dict[str, Any]:
    """τ over all models; interval: bootstrap over models, percentile 95 %."""
    m = np.array([r[key] for r in runs], dtype=float)
    g = np.array([r[target] for r in runs], dtype=float)
    i = rng.integers(0, len(m), (n_boot, len(m)))
    return _entry(kendall(m, g), kendall_many(m[i], g[i]), len(m))


def granulated_tau(
    runs: list[dict],
    key: str,
    factor: str,
    others: tuple[str, ...],
    rng: np.random.Generator,
    n_boot: int,
    target: str = GAP,
) -> dict[str, Any]:
    """Jiang et al.'s ψ for ``factor``: the mean, over the settings of the ``others``, of τ over the
    models that differ only in ``factor``. Interval: a two-level bootstrap (resample the groups,
    then the models within each group), percentile 95 %."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in runs:
        groups[tuple(r[o] for o in others)].append(r)
    pairs = [
        (np.array([r[key] for r in rs], dtype=float), np.array([r[target] for r in rs], dtype=float))
        for rs in groups.values()
        if len(rs) > 1
    ]
    if not pairs:
        return _entry(math.nan, np.array([]), len(runs), 0)
    taus = np.array([kendall(m, g) for m, g in pairs])
    # τ of every group under n_boot resamplings of its models: (groups, n_boot).
    boot_taus = np.stack(
        [
            kendall_many(m[idx], g[idx])
            for m, g in pairs
            for idx in [rng.integers(0, len(m), (n_boot, len(m)))]
        ]
    )
    chosen = rng.integers(0, len(pairs), (n_boot, len(pairs)))
    picked = boot_taus[chosen, np.arange(n_boot)[:, None]]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may tie every group
        boots = np.nanmean(picked, axis=1)
    finite = taus[~np.isnan(taus)]
    return _entry(float(finite.mean()) if finite.size else math.nan, boots, len(runs), len(pairs))


def correlations(runs: list[dict], cfg: Config) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    factors = ["batch_size", "arch", "protocol"]
    factors = [f for f in factors if len({r[f] for r in runs}) > 1]
    keys = [*MEASURES, *REFERENCES]
    out: dict[str, Any] = {
        "gap": "test error − training error, in percentage points (= train accuracy − test accuracy)",
        "tau": "Kendall τ_b (scipy.stats.kendalltau)",
        "interval": "percentile 95 % bootstrap; overall: over models; ψ: over groups, then models in a group",
        "overall": {k: overall_tau(runs, k, rng, cfg.bootstrap) for k in keys},
        "granulated": {},
        "Psi": {},
        "batch_size_by_cell": {},
    }
    for f in factors:
        others = tuple(o for o in ("arch", "protocol", "batch_size", "seed") if o != f)
        out["granulated"][f] = {k: granulated_tau(runs, k, f, others, rng, cfg.bootstrap) for k in keys}
    for k in keys:
        psis = [out["granulated"][f][k]["tau"] for f in factors]
        out["Psi"][k] = float(np.nanmean(psis)) if not all(math.isnan(p) for p in psis) else math.nan
    for arch, protocol in itertools.product(cfg.archs, cfg.protocols):
        cell = [r for r in runs if r["arch"] == arch and r["protocol"] == protocol]
        out["batch_size_by_cell"][f"{arch}/{protocol}"] = {
            k: granulated_tau(cell, k, "batch_size", ("seed",), rng, cfg.bootstrap) for k in keys
        }
    # Keskar et al.'s "generalize worse" is also read as a lower test accuracy: the same τ against the
    # test error (not the gap), which differs from the gap wherever training is unfinished.
    for r in runs:
        r.setdefault("test_error_pct", 100 - r["test_acc_pct"])
    out["test_error_overall"] = {
        k: overall_tau(runs, k, rng, cfg.bootstrap, target="test_error_pct") for k in keys
    }
    out["test_error_batch_size_by_cell"] = {}
    for arch, protocol in itertools.product(cfg.archs, cfg.protocols):
        cell = [r for r in runs if r["arch"] == arch and r["protocol"] == protocol]
        out["test_error_batch_size_by_cell"][f"{arch}/{protocol}"] = {
            k: granulated_tau(cell, k, "batch_size", ("seed",), rng, cfg.bootstrap, target="test_error_pct")
            for k in keys
        }
    return out


# ----------------------------------------------------------------------------- environment
def environment(cfg: Config) -> dict[str, Any]:
    import scipy
    import sklearn

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {
        "python": platform.python_version(),
        "flatness": flatness.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": cfg.device,
    }
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    try:
        import matplotlib

        env["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return env


# ----------------------------------------------------------------------------- report
def fmt(v: float) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:+.2f}"


def tau_cell(e: dict[str, Any]) -> str:
    if math.isnan(e["tau"]):
        return "—"
    s = f"{fmt(e['tau'])} [{fmt(e['low'])}, {fmt(e['high'])}]"
    return f"**{s}**" if e["distinguishable_from_zero"] else s


def verdict(e: dict[str, Any]) -> str:
    if math.isnan(e["tau"]):
        return "undefined"
    if not e["distinguishable_from_zero"]:
        return "not distinguishable from zero"
    return "tracks the gap" if e["tau"] > 0 else "ranks the gap in reverse"


def label(key: str) -> str:
    return {**MEASURES, **REFERENCES}[key][0]


def bs_label(b: int) -> str:
    return f"{b} (full)" if b == N_TRAIN else str(b)


def cell_table(runs: list[dict], cfg: Config, arch: str, protocol: str) -> list[str]:
    """Medians over seeds, one column per batch size."""
    cols = [b for b in cfg.batch_sizes if any(r["batch_size"] == b for r in runs)]
    rows = [
        ("steps", "steps", "{:.0f}"),
        ("train_loss", "train loss", "{:.3g}"),
        ("train_acc_pct", "train accuracy (%)", "{:.2f}"),
        ("test_acc_pct", "test accuracy (%)", "{:.2f}"),
        (GAP, "gap (points)", "{:.2f}"),
        *[(k, MEASURES[k][0], "{:.3g}") for k in MEASURES],
    ]
    lines = [
        "| | " + " | ".join(bs_label(b) for b in cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for key, name, f in rows:
        cells = []
        for b in cols:
            vals = [
                r[key]
                for r in runs
                if r["arch"] == arch and r["protocol"] == protocol and r["batch_size"] == b
            ]
            cells.append(f.format(float(np.median(vals))) if vals else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def batch_summary(runs: list[dict], cfg: Config) -> list[str]:
    """Smallest against largest batch, per architecture and protocol: medians and measured seed ranges."""
    lines = []
    small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)

    def span(key: str, arch: str, protocol: str, b: int, pct: bool = False) -> str:
        v = np.array(
            [r[key] for r in runs if r["arch"] == arch and r["protocol"] == protocol and r["batch_size"] == b]
        )
        f = "{:.2f}" if pct else "{:.3g}"
        if len(v) == 1:
            return f.format(v[0])
        return f"{f.format(np.median(v))} ({f.format(v.min())}–{f.format(v.max())})"

    for arch, protocol in itertools.product(cfg.archs, cfg.protocols):
        title = "equal epochs" if protocol == "epochs" else "equal training loss"
        lines.append(
            f"- **{arch.upper()}, {title}**, batch {small} → {bs_label(large)}: Keskar φ "
            f"{span('phi', arch, protocol, small)} → {span('phi', arch, protocol, large)}; Hessian λ₁ "
            f"{span('lambda_max', arch, protocol, small)} → {span('lambda_max', arch, protocol, large)}; test accuracy "
            f"{span('test_acc_pct', arch, protocol, small, True)} → {span('test_acc_pct', arch, protocol, large, True)} %; "
            f"gap {span(GAP, arch, protocol, small, True)} → {span(GAP, arch, protocol, large, True)} points; "
            f"train loss {span('train_loss', arch, protocol, small)} → {span('train_loss', arch, protocol, large)}."
        )
    return ["Median over seeds, with the measured range over seeds in parentheses:", "", *lines]


def measured_range(runs: list[dict], key: str, **where: Any) -> tuple[float, float]:
    vals = [r[key] for r in runs if all(r[k] == v for k, v in where.items())]
    return (float(min(vals)), float(max(vals))) if vals else (math.nan, math.nan)


def write_report(
    out: Path, cfg: Config, runs: list[dict], corr: dict, env: dict, seconds: float, cpu: float
) -> None:
    keys = [*MEASURES, *REFERENCES]
    n = len(runs)
    flag = (
        ""
        if cfg == Config(device=cfg.device)
        else " --quick"
        if cfg == Config.quick(cfg.device)
        else " (a reduced configuration)"
    )
    if cfg.device != "cpu":
        flag += f" --device {cfg.device}"
    lines = [
        "# Batch-size study: do large batches find sharper minima, and do sharper minima generalize worse?",
        "",
        f"Generated by `examples/batch_size_study.py`{flag}"
        f" in {seconds / 60:.1f} minutes wall, {cpu / 60:.1f} CPU-minutes ({n} trained models).",
        "",
        "**Environment.** "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + ". Every number below is a measurement on this machine: another CPU, BLAS, thread count or "
        "library version changes the float rounding of training, and a trained model's sharpness moves "
        "with it (by several percent for the flattest, small-batch solutions). Ranges are quoted as "
        "measured here, not as bounds.",
        "",
        "**Setup.** scikit-learn's handwritten digits (1,437 train / 360 test, 8×8 pixels, 10 classes); "
        + "; ".join(f"{a}: {ARCHS[a]}" for a in cfg.archs)
        + f". Adam, lr {cfg.lr:g}, the same initialization and data-order seed at every batch size of a seed. "
        f"Batch sizes {', '.join(bs_label(b) for b in cfg.batch_sizes)}; seeds {', '.join(map(str, cfg.seeds))}. "
        f"Protocols: **equal epochs** ({cfg.epochs} epochs each, as in Keskar et al.), and **equal training "
        f"loss** (stop at the first step where the full training loss is ≤ {cfg.target_loss:g}, Jiang et al.'s "
        "stopping rule). All measures are on the full training loss, eval mode, float32.",
        "",
        "**The gap.** Throughout, *gap* means the generalization gap of Jiang et al. (2019): test error − "
        "training error, in percentage points (= train accuracy − test accuracy). Accuracies are percentages. "
        "The test set has 360 images, so the gap moves in steps of 0.28 points and ties are common (Kendall's "
        "τ_b accounts for them).",
        "",
    ]
    loss_runs = [r for r in runs if r["protocol"] == "loss"]
    if loss_runs:
        ratio = [r["train_loss"] / cfg.target_loss for r in loss_runs]
        lines += [
            f'**How equal is "equal loss".** The full training loss is checked after every epoch, and after '
            f"every step once it is below {cfg.close_factor:g}× the target, so a run stops within one step "
            f"of reaching it (stated tolerance: between {1 - LOSS_TOLERANCE:g}× and 1× the target). Measured: "
            f"every run stopped at {min(ratio):.3f}–{max(ratio):.3f}× the target "
            f"({sum(r['reached_target'] for r in loss_runs)} of {len(loss_runs)} reached it).",
            "",
        ]
    lines += ["## What changes with the batch size", "", *batch_summary(runs, cfg), ""]
    lines += [
        "## Rank correlation with the gap",
        "",
        "Kendall's τ between each measure and the gap (τ = +1: the measure orders the models exactly as "
        "the gap does). *overall*: all models; *ψ(factor)*: Jiang et al.'s granulated τ, the mean over the "
        "settings of every other factor (and seed) of τ over the models that differ only in that factor; "
        "Ψ: the mean of the ψ. Brackets: 95 % bootstrap interval (overall: resampling models; ψ: resampling "
        "groups, then models within a group). **Bold**: the interval excludes 0 (distinguishable from zero "
        "at this scale). The last rows are references, not sharpness measures.",
        "",
    ]
    factors = list(corr["granulated"])
    lines += [
        "| measure | overall τ | " + " | ".join(f"ψ({f.replace('_', ' ')})" for f in factors) + " | Ψ |",
        "| --- | --- | " + " | ".join("---" for _ in factors) + " | --- |",
    ]
    for k in keys:
        lines.append(
            f"| {label(k)} | {tau_cell(corr['overall'][k])} | "
            + " | ".join(tau_cell(corr["granulated"][f][k]) for f in factors)
            + f" | {fmt(corr['Psi'][k])} |"
        )
    lines += [
        "",
        "### Across batch sizes, per architecture and protocol",
        "",
        "ψ(batch size) within one architecture and protocol: the mean over seeds of τ over the "
        f"{len(cfg.batch_sizes)} batch sizes of a seed, with its interval and what it says.",
        "",
        "| measure | " + " | ".join(corr["batch_size_by_cell"]) + " |",
        "| --- | " + " | ".join("---" for _ in corr["batch_size_by_cell"]) + " |",
    ]
    for k in keys:
        lines.append(
            f"| {label(k)} | "
            + " | ".join(f"{tau_cell(c[k])} {verdict(c[k])}" for c in corr["batch_size_by_cell"].values())
            + " |"
        )
    lines += [
        "",
        "### Against the test error instead of the gap",
        "",
        'Keskar et al.\'s "generalize worse" is also read as a lower test accuracy. The test error '
        "(100 − test accuracy, in points) is not the gap: a model stopped early has a high test error and a "
        "small gap. The same statistics against the test error:",
        "",
        "| measure | overall τ | " + " | ".join(corr["test_error_batch_size_by_cell"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in corr["test_error_batch_size_by_cell"]) + " |",
    ]
    for k in keys:
        lines.append(
            f"| {label(k)} | {tau_cell(corr['test_error_overall'][k])} | "
            + " | ".join(tau_cell(c[k]) for c in corr["test_error_batch_size_by_cell"].values())
            + " |"
        )
    lines += [
        "",
        "![τ per measure](tau.png)",
        "",
        "## Sharpness and test accuracy against batch size",
        "",
        "Small markers: one per seed (jittered sideways); line: median over seeds.",
        "",
        "![sweep](sweep.png)",
        "",
        'Per-layer sharpness: λ₁ of each layer\'s diagonal Hessian block (`blocks="module"`), median over seeds.',
        "",
        "![layers](layers.png)",
        "",
        "Every model, Keskar φ against the gap (colour: batch size; marker: protocol; jittered vertically "
        "by up to ±0.05 points, because the gap moves in steps of 0.28):",
        "",
        "![sharpness vs gap](sharpness_vs_gap.png)",
        "",
    ]
    for arch, protocol in itertools.product(cfg.archs, cfg.protocols):
        title = "equal epochs" if protocol == "epochs" else "equal training loss"
        lines += [
            f"## {arch.upper()}, {title} (medians over seeds)",
            "",
            *cell_table(runs, cfg, arch, protocol),
            "",
        ]
    lo, hi = measured_range(runs, "measure_seconds")
    lines += [
        "## Caveats",
        "",
        "- Scale: 1,437 training images of 8×8 pixels, networks of 6,090 and 26,122 parameters, 360 test images. "
        "Differences in test accuracy below about 1 point (3–4 images) are within the seed spread here; the "
        "correlations say how the measures rank *these* models, not Keskar's or Jiang's networks.",
        "- Keskar's φ is not invariant to reparametrization (Dinh et al., 2017): rescaling the layers of a ReLU "
        "network changes it without changing the function; the adaptive and average sharpness rows are "
        "invariant to that rescaling. φ is a 10-iteration L-BFGS-B maximization (a lower bound on the box "
        "maximum); the traces are Hutch++ estimates (standard errors in results.json); "
        f"all Lanczos eigenpairs converged to tol 1e-3: {all(r['eig_converged'] for r in runs)}.",
        "- Machine dependence: training is deterministic on one machine, but float rounding differs "
        "across CPUs, BLAS builds and thread counts, so a rerun elsewhere gives other numbers (the sign "
        "and rough size of the correlations, not their digits, are the finding).",
        "- Average sharpness is an expected loss change under random noise: at a point that is not a minimum "
        "(an unfinished equal-epochs run) it can be negative, and it is then no sharpness at all. Runs with a "
        f"negative value here: {sum(r['average'] < 0 for r in runs)} of {n}.",
        f"- Measuring one model took {lo:.1f}–{hi:.1f} s of wall time here (all measures; the CPU time is "
        "lower on a machine that is not shared).",
        "",
        "Raw numbers for every run, the correlations and the environment: `results.json`.",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- figures
PROTOCOL_STYLE = {
    "epochs": ("equal epochs", "o", "tab:blue"),
    "loss": ("equal training loss", "s", "tab:orange"),
}


def _jitter(rng: np.random.Generator, b: float, n: int) -> np.ndarray:
    return b * np.exp(rng.uniform(-0.08, 0.08, n))


def figures(out: Path, cfg: Config, runs: list[dict], corr: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rng = np.random.default_rng(0)
    archs, bss = cfg.archs, list(cfg.batch_sizes)
    plain = FuncFormatter(lambda v, _: f"{v:g}")

    def batch_axis(ax: Any) -> None:
        ax.set_xscale("log")
        ax.set_xticks(bss, [bs_label(b).replace(" (full)", "\n(full)") for b in bss])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch size (log scale)")

    def log_y(ax: Any) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))  # ≥ 3 labels on a one-decade axis
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())

    def by(arch: str, protocol: str, b: int, key: str) -> list[float]:
        return [
            r[key] for r in runs if r["arch"] == arch and r["protocol"] == protocol and r["batch_size"] == b
        ]

    # 1. φ and test accuracy against batch size.
    fig, axes = plt.subplots(2, len(archs), figsize=(5.2 * len(archs), 7), squeeze=False)
    for j, arch in enumerate(archs):
        for i, (key, ylabel) in enumerate(
            (("phi", "Keskar φ, ε = 1e-3 (%, log scale)"), ("test_acc_pct", "test accuracy (%)"))
        ):
            ax = axes[i, j]
            for protocol in cfg.protocols:
                name, marker, colour = PROTOCOL_STYLE[protocol]
                for b in bss:
                    v = by(arch, protocol, b, key)
                    ax.scatter(_jitter(rng, b, len(v)), v, marker=marker, color=colour, alpha=0.45, s=20)
                med = [np.median(by(arch, protocol, b, key)) for b in bss]
                ax.plot(bss, med, color=colour, marker=marker, label=f"{name} (median)")
            batch_axis(ax)
            if key == "phi":
                log_y(ax)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{arch.upper()}: {'Keskar φ' if key == 'phi' else 'test accuracy'}")
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=8)
    fig.suptitle("Sharpness and test accuracy against batch size (small markers: seeds)")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=80)
    plt.close(fig)

    # 2. τ per measure, with intervals: overall and ψ(batch size) | ψ(batch size) per cell.
    keys = [*MEASURES, *REFERENCES]
    left = [("overall τ", corr["overall"])]
    if "batch_size" in corr["granulated"]:
        left.append(("ψ(batch size), all models", corr["granulated"]["batch_size"]))
    right = list(corr["batch_size_by_cell"].items())
    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(keys) + 2.2), sharey=True)
    for ax, series, title, offset in (
        (axes[0], left, "over all models", 0),
        (axes[1], right, "across batch sizes, per architecture / protocol", len(left)),
    ):
        height = 0.8 / len(series)
        for s_, (name, entries) in enumerate(series):
            y = np.arange(len(keys)) + (s_ - (len(series) - 1) / 2) * height
            t = np.array([entries[k]["tau"] for k in keys])
            lo = np.array([entries[k]["low"] for k in keys])
            hi = np.array([entries[k]["high"] for k in keys])
            ax.barh(y, np.nan_to_num(t), height=height * 0.9, color=colours[(s_ + offset) % 10], label=name)
            # The interval as a segment (a bootstrap percentile interval need not contain τ itself).
            ax.hlines(y, lo, hi, color="black", linewidth=0.9)
        for sep in np.arange(len(keys) - 1) + 0.5:
            ax.axhline(sep, color="grey", linewidth=0.4, alpha=0.5)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("Kendall τ with the gap (black: 95 % bootstrap interval)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09 - 0.3 / len(keys)), ncol=2)
    axes[0].set_yticks(np.arange(len(keys)), [label(k) for k in keys])
    axes[0].invert_yaxis()
    fig.suptitle("Does the measure rank the models as the gap (test error − train error) does?")
    fig.tight_layout()
    fig.savefig(out / "tau.png", dpi=80)
    plt.close(fig)

    # 3. Per-layer λ₁ against batch size.
    fig, axes = plt.subplots(
        len(cfg.protocols), len(archs), figsize=(5.2 * len(archs), 3.6 * len(cfg.protocols)), squeeze=False
    )
    for j, arch in enumerate(archs):
        names = list(next(r["layers"] for r in runs if r["arch"] == arch))
        for i, protocol in enumerate(cfg.protocols):
            ax = axes[i, j]
            for li, layer in enumerate(names):
                for b in bss:
                    v = [
                        r["layers"][layer]
                        for r in runs
                        if r["arch"] == arch and r["protocol"] == protocol and r["batch_size"] == b
                    ]
                    ax.scatter(_jitter(rng, b, len(v)), v, color=colours[li], alpha=0.35, s=14)
                med = [
                    np.median(
                        [
                            r["layers"][layer]
                            for r in runs
                            if r["arch"] == arch and r["protocol"] == protocol and r["batch_size"] == b
                        ]
                    )
                    for b in bss
                ]
                ax.plot(bss, med, marker="o", color=colours[li], label=layer)
            batch_axis(ax)
            log_y(ax)
            ax.set_ylabel("λ₁ of the layer's Hessian block")
            ax.set_title(f"{arch.upper()}, {PROTOCOL_STYLE[protocol][0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title="layer", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Per-layer sharpness against batch size (line: median over seeds; dots: seeds)")
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=80)
    plt.close(fig)

    # 4. φ against the gap, every model.
    fig, axes = plt.subplots(1, len(archs), figsize=(5.6 * len(archs), 4.3), squeeze=False)
    norm = LogNorm(vmin=min(bss), vmax=max(bss))
    for j, arch in enumerate(archs):
        ax = axes[0, j]
        sc = None
        for protocol in cfg.protocols:
            _, marker, _ = PROTOCOL_STYLE[protocol]
            rs = [r for r in runs if r["arch"] == arch and r["protocol"] == protocol]
            sc = ax.scatter(
                [r["phi"] for r in rs],
                np.array([r[GAP] for r in rs]) + rng.uniform(-0.05, 0.05, len(rs)),
                c=[r["batch_size"] for r in rs],
                cmap="viridis",
                norm=norm,
                marker=marker,
                alpha=0.7,
                edgecolors="black",
                linewidths=0.4,
                s=36,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("Keskar φ, ε = 1e-3 (%, log scale)")
        ax.set_ylabel("gap: test error − train error (points)")
        ax.set_title(f"{arch.upper()}: sharpness against the gap")
        ax.grid(alpha=0.3)
        handles = [
            Line2D(
                [],
                [],
                marker=PROTOCOL_STYLE[p][1],
                linestyle="",
                color="grey",
                markeredgecolor="black",
                label=PROTOCOL_STYLE[p][0],
            )
            for p in cfg.protocols
        ]
        ax.legend(handles=handles, fontsize=8)
        bar = fig.colorbar(sc, ax=ax)
        bar.set_ticks(bss)
        bar.set_ticklabels([bs_label(b) for b in bss])
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
        bar.ax.minorticks_off()
        bar.set_label("batch size (colour)")
    fig.suptitle("Every model: Keskar φ against the gap (marker: protocol; gap jittered by ±0.05)")
    fig.tight_layout()
    fig.savefig(out / "sharpness_vs_gap.png", dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, cfg: Config | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="study-report", help="folder for the report (created)")
    parser.add_argument(
        "--quick", action="store_true", help="3 batch sizes, 1 seed, shorter training, fewer probes"
    )
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--archs", default=None, help="comma-separated: mlp,cnn (default both)")
    parser.add_argument("--protocols", default=None, help="comma-separated: epochs,loss (default both)")
    parser.add_argument(
        "--redraw",
        default=None,
        metavar="RESULTS_JSON",
        help="only redraw the figures of a saved results.json",
    )
    args = parser.parse_args(argv)
    if args.redraw is not None:
        saved = json.loads(Path(args.redraw).read_text())
        conf = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        figures(out, Config(**conf), saved["runs"], saved["correlations"])
        return saved
    if cfg is None:
        cfg = Config.quick(args.device) if args.quick else Config(device=args.device)
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds: need at least 1, got {args.seeds}")
        cfg.seeds = tuple(range(args.seeds))
    for name, choices in (("archs", ARCHS), ("protocols", PROTOCOL_STYLE)):
        value = getattr(args, name)
        if value is not None:
            chosen = tuple(p for p in value.split(",") if p)
            unknown = [p for p in chosen if p not in choices]
            if unknown or not chosen:
                parser.error(f"--{name}: unknown {unknown}; choose from {list(choices)}")
            setattr(cfg, name, chosen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, cpu0 = time.perf_counter(), time.process_time()

    x_tr, y_tr, x_te, y_te = load_digits_split(cfg.device)
    train_data = [(x_tr, y_tr)]  # the whole training set as one batch: every measure sees all of it
    runs: list[dict[str, Any]] = []
    for arch, seed, protocol, b in itertools.product(cfg.archs, cfg.seeds, cfg.protocols, cfg.batch_sizes):
        t0 = time.perf_counter()
        model = make_model(arch, seed, cfg.device)
        info = train(model, x_tr, y_tr, b, cfg, seed, protocol)
        tr_loss, tr_acc = evaluate(model, x_tr, y_tr)
        te_loss, te_acc = evaluate(model, x_te, y_te)
        row: dict[str, Any] = {
            "arch": arch,
            "batch_size": b,
            "seed": seed,
            "protocol": protocol,
            **info,
            "train_loss": tr_loss,
            "test_loss": te_loss,
            "train_acc_pct": 100 * tr_acc,
            "test_acc_pct": 100 * te_acc,
            "test_error_pct": 100 * (1 - te_acc),
            GAP: 100 * (tr_acc - te_acc),
            "train_seconds": time.perf_counter() - t0,
        }
        if protocol == "loss" and not info["reached_target"]:
            raise RuntimeError(
                f"{arch} batch {b} seed {seed}: training loss {tr_loss:.3g} has not reached the target "
                f"{cfg.target_loss:g} in {cfg.max_steps} steps; raise Config.max_steps or the target"
            )
        row.update(measure(model, train_data, cfg, seed))
        runs.append(row)
        print(
            f"[{time.perf_counter() - start:6.1f}s] {arch} seed {seed} {protocol:6s} batch {b:4d}: "
            f"{info['steps']:5d} steps, train loss {tr_loss:.2e}, test acc {100 * te_acc:5.2f}%, "
            f"gap {row[GAP]:+.2f}, φ {row['phi']:.3g}, λ1 {row['lambda_max']:.3g} "
            f"({row['train_seconds']:.1f}+{row['measure_seconds']:.1f}s)",
            flush=True,
        )
    corr = correlations(runs, cfg)
    env = environment(cfg)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    results = {
        "config": dataclasses.asdict(cfg),
        "environment": env,
        "gap": corr["gap"],
        "measures": {
            k: v[1].format(**dataclasses.asdict(cfg)) for k, v in {**MEASURES, **REFERENCES}.items()
        },
        "runs": runs,
        "correlations": corr,
        "seconds": seconds,
        "cpu_seconds": cpu,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    try:
        figures(out, cfg, runs, corr)
    except ImportError as err:  # matplotlib is an optional extra
        print(f"figures skipped: {err}", file=sys.stderr)
    write_report(out, cfg, runs, corr, env, seconds, cpu)
    print(f"report: {out / 'README.md'} ({seconds / 60:.1f} min wall, {cpu / 60:.1f} CPU-min)")
    return results


if __name__ == "__main__":
    main()
