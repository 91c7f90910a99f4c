"""The examples run end to end (the study's --quick mode is the README's main job, shrunk)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
pytest.importorskip("sklearn")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def test_monitor_example(tmp_path):
    monitor = load("monitor_training").main(steps=60, out=str(tmp_path / "m.csv"))
    assert [r["step"] for r in monitor.records] == [0, 50]
    assert monitor.records[-1]["loss"] < monitor.records[0]["loss"]
    assert (tmp_path / "m.csv").read_text().startswith("step,")


@pytest.mark.slow
def test_batch_size_study_quick(tmp_path):
    pytest.importorskip("matplotlib")
    study = load("batch_size_study")
    results = study.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    report = (tmp_path / "README.md").read_text()
    assert "## Summary" in report and "Keskar φ" in report
    for name in ("interpolation_epochs.png", "landscapes_loss.png", "sharpness_vs_gap.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    for protocol in ("epochs", "loss"):
        runs = results["runs"][protocol]
        assert set(runs) == {"SB", "LB", "hybrid"}
        for rs in runs.values():
            assert rs[0]["train_acc"] > 0.9
            assert rs[0]["sharpness_0.001"] >= 0
            assert rs[0]["lambda_max"] > 0
        assert saved["runs"][protocol]["SB"][0]["seed"] == 0
    # The loss protocol really trains every regime to the target.
    assert all(r[0]["train_loss"] <= 1e-2 for r in results["runs"]["loss"].values())


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    import csv

    callback = load("lightning_callback").main(steps=40, every=20, out=str(tmp_path))
    assert [r["step"] for r in callback.records] == [0, 20, 40]
    assert all(r["two_over_lr"] == pytest.approx(10.0) and r["top_eigenvalue"] > 5 for r in callback.records)
    with open(tmp_path / "flatness" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("flatness/top_eigenvalue")]
    assert [int(r["step"]) for r in rows] == [0, 20, 40]
    assert [float(r["flatness/top_eigenvalue"]) for r in rows] == pytest.approx(
        [r["top_eigenvalue"] for r in callback.records]
    )


def test_huggingface_example(tmp_path):
    pytest.importorskip("transformers")
    callback = load("huggingface_callback").main(steps=10, every=5, out=str(tmp_path))
    assert [r["step"] for r in callback.records] == [0, 5, 10]
    assert callback.records[-1]["loss"] < callback.records[0]["loss"]
    logged = [h for h in callback.trainer.state.log_history if "flatness/loss" in h]
    assert [h["flatness/top_eigenvalue"] for h in logged] == [r["top_eigenvalue"] for r in callback.records]


@pytest.mark.slow
def test_fsdp_transformer_example(monkeypatch):
    # Spawned ranks import the example by name: put its folder on the path they inherit.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    result = load("fsdp_transformer").main(["--ranks", "2", "--layers", "1", "--d-model", "16"])
    vals, _, converged, _ = result["topk"]
    assert converged and vals[0] >= vals[1] > 0
    assert result["eigvec_shard"] == (4, 16)  # rank 0's half of the 8-row head
    assert len(result["slice"]) == 5 and min(result["slice"]) > 0
