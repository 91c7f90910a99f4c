"""The batch-size study (examples/batch_size_study.py): its rank statistics against scipy and exact
cases, and a small sweep end to end (structure, invariants, the equal-loss tolerance)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
EXAMPLE = Path(__file__).parent.parent / "examples" / "batch_size_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("batch_size_study", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["batch_size_study"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def test_vectorized_tau_is_scipys(study):
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    for n in (2, 3, 6, 18):
        # Small integer values: many ties, in one side, the other, and both.
        a, b = rng.integers(0, 3, (200, n)).astype(float), rng.integers(0, 4, (200, n)).astype(float)
        got = study.kendall_many(a, b)
        for i in range(len(a)):
            if np.all(a[i] == a[i, 0]) or np.all(b[i] == b[i, 0]):
                assert math.isnan(got[i]) and math.isnan(study.kendall(a[i], b[i]))
            else:
                want = kendalltau(a[i], b[i], variant="b").statistic
                assert got[i] == pytest.approx(want, abs=1e-12)
                assert study.kendall(a[i], b[i]) == pytest.approx(want, abs=1e-12)


def _runs(measure):
    """Two archs × two seeds × four batch sizes; the gap grows with the batch size."""
    runs = []
    for arch in ("mlp", "cnn"):
        for seed in (0, 1):
            for j, b in enumerate((16, 64, 256, 1437)):
                gap = j + 0.1 * seed + (0.5 if arch == "cnn" else 0.0)
                runs.append(
                    {
                        "arch": arch,
                        "seed": seed,
                        "protocol": "epochs",
                        "batch_size": b,
                        "gap": gap,
                        "m": measure(gap),
                    }
                )
    return runs


def test_granulated_tau_exact_cases(study):
    rng = np.random.default_rng(0)
    up = study.granulated_tau(_runs(lambda g: g), "m", "batch_size", ("arch", "protocol", "seed"), rng, 200)
    assert up["tau"] == 1.0 and up["n_groups"] == 4 and up["distinguishable_from_zero"]
    assert 0 < up["low"] <= up["high"] <= 1
    down = study.granulated_tau(
        _runs(lambda g: -g), "m", "batch_size", ("arch", "protocol", "seed"), rng, 200
    )
    assert down["tau"] == -1.0 and down["high"] < 0
    # A measure that only knows the architecture: constant within every batch-size group.
    arch_only = study.granulated_tau(
        _runs(lambda g: float(g >= 0.5 and g % 1 >= 0.5)),
        "m",
        "batch_size",
        ("arch", "protocol", "seed"),
        rng,
        200,
    )
    assert math.isnan(arch_only["tau"]) and not arch_only["distinguishable_from_zero"]
    overall = study.overall_tau(_runs(lambda g: g), "m", rng, 200)
    assert overall["tau"] == 1.0 and overall["n_models"] == 16


def test_quick_flag_is_a_smaller_sweep(study):
    full, quick = study.Config(), study.Config.quick("cpu")
    assert (
        len(full.batch_sizes) >= 6 and min(full.batch_sizes) <= 16 and max(full.batch_sizes) == study.N_TRAIN
    )
    assert (
        set(full.archs) == {"mlp", "cnn"}
        and set(full.protocols) == {"epochs", "loss"}
        and len(full.seeds) >= 3
    )
    assert len(quick.batch_sizes) < len(full.batch_sizes) and quick.archs == full.archs
    assert quick.protocols == full.protocols


@pytest.mark.slow
def test_small_sweep_end_to_end(study, tmp_path):
    """A sweep smaller than --quick through the same main(): every output, finite measures, τ in
    [−1, 1], equal-loss runs within the stated tolerance of the target."""
    pytest.importorskip("matplotlib")
    cfg = study.Config(
        batch_sizes=(128, study.N_TRAIN),
        seeds=(0,),
        epochs=3,
        target_loss=0.3,
        trace_hvp=6,
        average_samples=4,
        adaptive_iter=2,
        bootstrap=50,
    )
    results = study.main(["--out", str(tmp_path)], cfg=cfg)
    for name in ("README.md", "results.json", "sweep.png", "tau.png", "layers.png", "sharpness_vs_gap.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["environment"]["torch"] and saved["environment"]["numpy"] == np.__version__
    assert {"python", "scipy", "scikit-learn", "platform", "cpu", "torch_threads"} <= set(
        saved["environment"]
    )
    runs = saved["runs"]
    assert len(runs) == 2 * 2 * 2  # archs × protocols × batch sizes
    measures = [*study.MEASURES, "trace_se", "ggn_trace_se", "average_se"]
    for r in runs:
        assert {"arch", "batch_size", "seed", "protocol", "steps", "train_loss", "test_loss"} <= set(r)
        assert 0 <= r["train_acc_pct"] <= 100 and 0 <= r["test_acc_pct"] <= 100
        assert r["gap"] == pytest.approx(r["train_acc_pct"] - r["test_acc_pct"])
        assert all(math.isfinite(r[k]) for k in measures), r
        assert r["layers"] and all(math.isfinite(v) for v in r["layers"].values())
        if r["protocol"] == "loss":
            lo = (1 - study.LOSS_TOLERANCE) * cfg.target_loss
            assert r["reached_target"] and lo <= r["train_loss"] <= cfg.target_loss, r
        else:
            assert r["epochs"] == cfg.epochs
    corr = saved["correlations"]
    entries = [*corr["overall"].values()]
    entries += [e for f in corr["granulated"].values() for e in f.values()]
    entries += [e for c in corr["batch_size_by_cell"].values() for e in c.values()]
    entries += [*corr["test_error_overall"].values()]
    entries += [e for c in corr["test_error_batch_size_by_cell"].values() for e in c.values()]
    assert all(r["test_error_pct"] == pytest.approx(100 - r["test_acc_pct"]) for r in runs)
    assert set(corr["overall"]) == {*study.MEASURES, *study.REFERENCES}
    assert set(corr["batch_size_by_cell"]) == {"mlp/epochs", "mlp/loss", "cnn/epochs", "cnn/loss"}
    for e in entries:
        for k in ("tau", "low", "high"):
            assert math.isnan(e[k]) or -1 <= e[k] <= 1, e
    assert results["correlations"]["gap"] == saved["gap"]
    report = (tmp_path / "README.md").read_text()
    assert "## Rank correlation with the gap" in report and "torch" in report and "](tau.png)" in report


def test_redraw_draws_every_figure_from_a_saved_results_json(study, tmp_path):
    """results.json keeps what the figures need: --redraw rebuilds all four from the bundled run."""
    pytest.importorskip("matplotlib")
    saved = Path(__file__).parent.parent / "docs" / "study" / "results.json"
    out = tmp_path / "figs"
    study.main(["--redraw", str(saved), "--out", str(out)])
    names = {"sweep.png", "tau.png", "layers.png", "sharpness_vs_gap.png"}
    assert {p.name for p in out.iterdir()} == names
    assert all((out / n).stat().st_size > 10_000 for n in names)
