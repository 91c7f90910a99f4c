"""The examples run end to end (the batch-size study has its own tests/test_study.py)."""

from __future__ import annotations

import importlib.util
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
