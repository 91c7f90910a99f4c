"""The training-loop monitor records measures and leaves training bit-identical."""

from __future__ import annotations

import csv
import json

import numpy as np
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


def _model_and_data():
    x, y = classification_data(20, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, [(x[:12], y[:12]), (x[12:], y[12:])]


def bias_norm(model):
    return model[-1].bias.norm()


def test_builtin_and_custom_measures_mix():
    model, data = _model_and_data()
    as_mapping = Monitor(F.cross_entropy, data, every=1, measures={"loss": "loss", "b": bias_norm})
    as_list = Monitor(F.cross_entropy, data, every=1, measures=["loss", {"b": bias_norm}])
    renamed = Monitor(F.cross_entropy, data, every=1, measures={"probe_loss": "loss"})
    a, b, c = as_mapping.step(model), as_list.step(model), renamed.step(model)
    assert list(as_mapping.measures) == list(as_list.measures) == ["loss", "b"]
    assert (
        a["loss"]
        == b["loss"]
        == c["probe_loss"]
        == pytest.approx(
            float(
                F.cross_entropy(
                    model(torch.cat([d[0] for d in data])), torch.cat([d[1] for d in data])
                ).detach()
            ),
            rel=1e-12,
        )
    )
    assert a["b"] == b["b"] == float(model[-1].bias.detach().norm())


def test_measures_bad_input():
    with pytest.raises(ValueError, match="unknown measure 'curvature'"):
        Monitor(F.cross_entropy, [], measures={"c": "curvature"})
    with pytest.raises(TypeError, match="measures: got 3 in the list"):
        Monitor(F.cross_entropy, [], measures=["loss", 3])
    with pytest.raises(ValueError, match="named twice"):
        Monitor(F.cross_entropy, [], measures=["loss", {"loss": bias_norm}])
    with pytest.raises(ValueError, match="reserved"):
        Monitor(F.cross_entropy, [], measures={"step": bias_norm})
    with pytest.raises(TypeError, match="measures: got a int"):
        Monitor(F.cross_entropy, [], measures=5)
    with pytest.raises(ValueError, match="got none"):
        Monitor(F.cross_entropy, [], measures=[])
    with pytest.raises(ValueError, match="custom measures"):
        Monitor(F.cross_entropy, [], measures=["loss", {"b": bias_norm}], options={"b": {"tol": 1}})
    for bad in (0, -1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="learning_rate"):
            Monitor(F.cross_entropy, [], learning_rate=bad)
    with pytest.raises(ValueError, match="learning_rate: the callable returned"):
        Monitor(F.cross_entropy, _model_and_data()[1], learning_rate=lambda: -1.0).step(_model_and_data()[0])
    end_of_schedule = Monitor(F.cross_entropy, _model_and_data()[1], learning_rate=lambda: 0.0)
    assert "two_over_lr" not in end_of_schedule.step(_model_and_data()[0])  # 2/0: no column
    with pytest.raises(TypeError, match="progress"):
        Monitor(F.cross_entropy, [], progress="yes")


def dense_top_eigenvalue(model, data):
    from conftest import dense_hessian_oracle

    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    return float(torch.linalg.eigvalsh(dense_hessian_oracle(model, F.cross_entropy, x, y)[2])[-1])


def test_warm_started_top_eigenvalue_is_exact_and_cheaper():
    model, data = _model_and_data()
    options = {"top_eigenvalue": {"tol": 1e-8}}
    warm = Monitor(F.cross_entropy, data, every=1, measures=["top_eigenvalue"], options=options)
    cold = Monitor(
        F.cross_entropy, data, every=1, measures=["top_eigenvalue"], options=options, warm_start=False
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    warm_hvps, cold_hvps = [], []
    for _ in range(4):
        rw, rc = warm.step(model), cold.step(model)
        exact = dense_top_eigenvalue(model, data)
        assert rw["top_eigenvalue"] == pytest.approx(exact, rel=1e-9)
        assert rc["top_eigenvalue"] == pytest.approx(exact, rel=1e-9)
        warm_hvps.append(warm.last_results["top_eigenvalue"].n_matvec)
        cold_hvps.append(cold.last_results["top_eigenvalue"].n_matvec)
        opt.zero_grad()
        sum(F.cross_entropy(model(x), y) for x, y in data).backward()
        opt.step()
    assert warm_hvps[0] == cold_hvps[0]  # the first record has nothing to start from
    assert all(w <= c for w, c in zip(warm_hvps[1:], cold_hvps[1:], strict=True)), (warm_hvps, cold_hvps)
    assert sum(warm_hvps[1:]) < sum(cold_hvps[1:]), (warm_hvps, cold_hvps)
    assert warm.last_results["top_eigenvalue"].ncv == cold.last_results["top_eigenvalue"].ncv == 20


def test_warm_start_survives_an_eigenvalue_crossing():
    """The previous vector is exactly orthogonal to the new top eigenvector: the random part finds it."""
    from conftest import quadratic_problem

    H1 = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0] + [0.5] * 15, dtype=torch.float64))
    H2 = torch.diag(torch.tensor([4.0, 6.0, 3.0, 2.0, 1.0] + [0.5] * 15, dtype=torch.float64))
    model, loss_fn, data = quadratic_problem(H1)
    monitor = Monitor(loss_fn, data, every=1, measures=["top_eigenvalue"], options={"*": {"tol": 1e-8}})
    assert monitor.step(model)["top_eigenvalue"] == pytest.approx(5.0, rel=1e-9)
    model.H.copy_(H2)  # the buffer defines the Hessian
    assert monitor.step(model)["top_eigenvalue"] == pytest.approx(6.0, rel=1e-9)


def test_warm_start_finds_a_crossing_on_a_large_spectrum():
    """λ 1.0 and 0.95 swap eigenvectors between records, n = 600, bulk uniform in [0, 0.9]: the
    previous top eigenvector is the new second one. Every monitor reports the new λ₁ = 1.0; before
    issue 19 (a unit random part of weight 0.1, basis 8) 4 of these 6 reported 0.95."""
    from conftest import quadratic_problem

    n = 600
    bulk = torch.from_numpy(np.random.default_rng(0).uniform(0.0, 0.9, n - 2))
    H1 = torch.diag(torch.cat([torch.tensor([1.0, 0.95], dtype=torch.float64), bulk]))
    H2 = torch.diag(torch.cat([torch.tensor([0.95, 1.0], dtype=torch.float64), bulk]))
    wrong = []
    for seed in range(6):
        model, loss_fn, data = quadratic_problem(H1)
        monitor = Monitor(loss_fn, data, every=1, measures=["top_eigenvalue"], options={"*": {"seed": seed}})
        assert monitor.step(model)["top_eigenvalue"] == pytest.approx(1.0, rel=1e-3)
        model.H.copy_(H2)
        if monitor.step(model)["top_eigenvalue"] != pytest.approx(1.0, rel=1e-3):
            wrong.append(seed)
    assert not wrong, wrong


class _DiagonalQuadratic(nn.Module):
    """f(θ) = ½ Σ dᵢ θᵢ² (Hessian diag(d)), one value per sample: HVPs in O(n)."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("d", d.clone())
        self.theta = nn.Parameter(torch.zeros_like(d))

    def forward(self, x):
        return (0.5 * (self.d * self.theta**2).sum()).expand(x.shape[0])


def test_hessian_topk_warm_v0_finds_a_crossing():
    """hessian_topk(v0=…) with the defaults, v0 = the previous top eigenvector (now λ₂'s) plus a unit
    random vector of weight 0.1 (the Monitor's old start), n = 2,000: λ₁ = 1.0 every time (before
    issue 19, 3 of these 10 returned 0.95 with converged=True)."""
    from flatness import hessian_topk

    n = 2000
    bulk = torch.from_numpy(np.random.default_rng(1).uniform(0.0, 0.9, n - 2))
    model = _DiagonalQuadratic(torch.cat([torch.tensor([1.0, 0.95], dtype=torch.float64), bulk]))
    data = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    wrong = []
    for seed in range(10):
        noise = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v0 = torch.zeros(n, dtype=torch.float64)
        v0[1] = 1.0
        v0 += 0.1 * noise / noise.norm()
        res = hessian_topk(model, lambda out, _y: out.mean(), data, v0=v0, seed=seed)
        assert res.converged
        if abs(float(res.eigenvalues[0]) - 1.0) > 1e-3:
            wrong.append(seed)
    assert not wrong, wrong


def _hessian_of_trainable(model, data):
    from conftest import dense_hessian_oracle

    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    return dense_hessian_oracle(model, F.cross_entropy, x, y)[2]


def test_unfreezing_between_records_keeps_a_warm_start():
    """Gradual unfreezing: the parameters change between records (the stored vector has the old
    length). Each record is λ₁ of the Hessian in today's trainable parameters (dense float64
    oracle); the previous vector is mapped by name (zeros for new parameters)."""
    model, data = _model_and_data()
    monitor = Monitor(
        F.cross_entropy, data, every=1, measures=["top_eigenvalue"], options={"*": {"tol": 1e-8}}
    )
    for p in model[0].parameters():
        p.requires_grad_(False)
    for unfreeze in (False, True, "freeze the head"):
        if unfreeze is True:
            for p in model[0].parameters():
                p.requires_grad_(True)
        elif unfreeze:
            for p in model[2].parameters():
                p.requires_grad_(False)
        row = monitor.step(model)
        H = _hessian_of_trainable(model, data)
        exact = float(torch.linalg.eigvalsh(H)[-1])
        assert row["top_eigenvalue"] == pytest.approx(exact, rel=1e-9)
        result = monitor.last_results["top_eigenvalue"]
        assert result.eigenvectors.shape == (1, H.shape[0])
    # The head was frozen at the last record and the first layer's piece was warm: not a cold start.
    assert monitor._v0["top_eigenvalue"][0] == tuple(
        (n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad
    )


def test_map_start_by_name():
    from flatness.monitor import _map_start

    old = (("a", (2,)), ("b", (3,)))
    v = torch.arange(1.0, 6.0)
    assert torch.equal(_map_start((old, v), old), v)
    assert torch.equal(_map_start((old, v), (("c", (1,)), ("b", (3,)))), torch.tensor([0.0, 3.0, 4.0, 5.0]))
    assert _map_start((old, v), (("c", (4,)),)) is None  # nothing left: a cold start
    assert _map_start((old, v), (("b", (1, 3)),)) is None  # reshaped: not the same parameter
    assert _map_start((old, v[:3]), (("b", (3,)),)) is None  # not laid out like its parameters
    assert _map_start((None, v), old) is None


def test_learning_rate_column_progress_and_options():
    model, data = _model_and_data()
    lrs = iter([0.5, 0.25])
    seen = []
    monitor = Monitor(
        F.cross_entropy,
        data,
        every=2,
        measures=["loss"],
        learning_rate=lambda: next(lrs),
        progress=lambda n, total, row: seen.append((n, total, row)),
    )
    rows = [monitor.step(model) for _ in range(4)]
    assert rows[1] is None and rows[3] is None
    assert [r["two_over_lr"] for r in monitor.records] == [4.0, 8.0]
    assert [(n, total, row["step"]) for n, total, row in seen] == [(1, None, 0), (2, None, 2)]
    fixed = Monitor(F.cross_entropy, data, every=1, learning_rate=0.1)
    assert fixed.step(model)["two_over_lr"] == pytest.approx(20.0)


def test_progress_true_prints_a_line_per_record(capsys):
    model, data = _model_and_data()
    monitor = Monitor(F.cross_entropy, data, every=1, measures=["loss"], progress=True)
    monitor.step(model)
    monitor.step(model)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("monitor: record 2 step 1: loss=")
