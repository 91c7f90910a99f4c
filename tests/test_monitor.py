"""The training-loop monitor records measures and leaves training bit-identical."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from conftest import classification_data
from flatness import Monitor

F = nn.functional


def train(monitor: Monitor | None, steps: int = 12) -> tuple[dict, dict, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.2), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = classification_data(48, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = 0
    while step < steps:
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            if monitor is not None:
                monitor.step(model)
            step += 1
    return model.state_dict(), opt.state_dict(), [p.grad.clone() for p in model.parameters()]


def test_monitor_leaves_training_bit_identical(tmp_path):
    x, y = classification_data(16, dtype=torch.float32)
    monitor = Monitor(
        F.cross_entropy,
        [(x[:8], y[:8]), (x[8:], y[8:])],
        every=4,
        measures=["loss", "grad_norm"],
    )
    with_monitor = train(monitor)
    without = train(None)
    for k in without[0]:
        assert torch.equal(with_monitor[0][k], without[0][k]), k
    for a, b in zip(with_monitor[2], without[2], strict=True):
        assert torch.equal(a, b)
    state_a, state_b = with_monitor[1]["state"], without[1]["state"]
    for k in state_b:
        for key in state_b[k]:
            assert torch.equal(torch.as_tensor(state_a[k][key]), torch.as_tensor(state_b[k][key]))
    assert [r["step"] for r in monitor.records] == [0, 4, 8]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in monitor.records)
    monitor.to_json(tmp_path / "m.json")
    monitor.to_csv(tmp_path / "m.csv")
    assert json.loads((tmp_path / "m.json").read_text())[1]["step"] == 4
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[2]["loss"]) == pytest.approx(monitor.records[2]["loss"])


def test_monitor_records_the_exact_loss_and_custom_measures():
    x, y = classification_data(10, dtype=torch.float64)
    model = nn.Linear(5, 3).double()
    monitor = Monitor(F.cross_entropy, (x, y), every=1, measures={"bias_norm": lambda m: m.bias.norm()})
    row = monitor.step(model)
    assert row["bias_norm"] == pytest.approx(float(model.bias.detach().norm()))
    exact = Monitor(F.cross_entropy, (x, y), every=1, measures=["loss"]).step(model)["loss"]
    assert exact == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-12)


def test_monitor_bad_input():
    with pytest.raises(ValueError, match="every"):
        Monitor(F.cross_entropy, [], every=0)
    with pytest.raises(ValueError, match="unknown measure"):
        Monitor(F.cross_entropy, [], measures=["curvature"])
    with pytest.raises(ValueError, match="options"):
        Monitor(F.cross_entropy, [], measures=["loss"], options={"trace": {}})
    with pytest.raises(TypeError, match="callable"):
        Monitor(F.cross_entropy, [], measures={"x": 3})
