"""Monitor and the training callbacks take the keywords every function takes; a learning rate of 0
gives no 2/η; a trace is recorded with its standard error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import classification_data, make_mlp
from flatness import Monitor, Objective, hessian_topk, hessian_trace

F = nn.functional


def dict_batches():
    """Dict batches of different sizes, so that weighting by batch_size matters."""
    x, y = classification_data(23, dtype=torch.float32)
    return [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}]


def batch_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def batch_size(batch):
    return 3 * len(batch["y"]) + 1  # a weight no default rule gives


SHARED = {"batch_loss": batch_loss, "batch_size": batch_size, "dtype": torch.float64}


def test_monitor_keywords_equal_options_star_and_direct_calls():
    model = make_mlp(0, dtype=torch.float32)
    data = dict_batches()
    measures = ["loss", "grad_norm", "top_eigenvalue", "trace"]
    per = {"top_eigenvalue": {"tol": 1e-8}, "trace": {"n_hvp": 12}}
    by_keyword = Monitor(None, data, measures=measures, options=per, warm_start=False, **SHARED)
    by_options = Monitor(None, data, measures=measures, options={"*": SHARED, **per}, warm_start=False)
    a, b = by_keyword.measure(model), by_options.measure(model)
    assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}
    obj = Objective(model, None, data, **SHARED)
    assert a["loss"] == float(obj.loss())
    assert a["grad_norm"] == float(obj.grad().norm())
    top = hessian_topk(model, None, data, tol=1e-8, **SHARED)
    assert a["top_eigenvalue"] == pytest.approx(float(top.eigenvalues[0]), rel=1e-10)
    assert a["trace"] == float(hessian_trace(model, None, data, n_hvp=12, **SHARED).estimate)
    # The weights count: the same data weighted by batch lengths is another loss.
    assert abs(float(Objective(model, None, data, batch_loss=batch_loss).loss()) - a["loss"]) > 1e-6


def test_options_of_one_measure_override_the_keywords():
    model = make_mlp(0, dtype=torch.float32)
    x, y = classification_data(23, dtype=torch.float32)
    monitor = Monitor(
        F.cross_entropy, (x, y), measures=["loss", "grad_norm"], dtype=torch.float64,
        options={"grad_norm": {"dtype": torch.float32}},
    )  # fmt: skip
    row = monitor.measure(model)
    assert row["loss"] == float(Objective(model, F.cross_entropy, (x, y), dtype=torch.float64).loss())
    assert row["grad_norm"] == float(Objective(model, F.cross_entropy, (x, y)).grad().norm())


def test_keyword_errors_name_the_keyword():
    x, y = classification_data()
    with pytest.raises(TypeError, match=r"'tol'.*options=\{'<measure>'"):
        Monitor(F.cross_entropy, (x, y), tol=1e-3)
    with pytest.raises(ValueError, match=r"dtype: given both as a keyword and in options\['\*'\]"):
        Monitor(F.cross_entropy, (x, y), dtype=torch.float64, options={"*": {"dtype": torch.float32}})
    with pytest.raises(ValueError, match="trace_std_error"):
        Monitor(F.cross_entropy, (x, y), measures=["trace", {"trace_std_error": lambda m: 0.0}])


def test_learning_rate_zero_gives_no_two_over_lr():
    """A schedule ending at η = 0: 2/η is infinite, so that row has no two_over_lr (not inf)."""
    model = make_mlp(0)
    rates = iter([0.5, 0.0])
    monitor = Monitor(F.cross_entropy, classification_data(), every=1, learning_rate=lambda: next(rates))
    first, last = monitor.step(model), monitor.step(model)
    assert first["two_over_lr"] == 4.0
    assert "two_over_lr" not in last and last["loss"] == first["loss"]


def test_trace_is_recorded_with_its_standard_error():
    model, data = make_mlp(0), classification_data()
    row = Monitor(F.cross_entropy, data, measures={"tr": "trace"}, options={"tr": {"n_hvp": 12}}).measure(
        model
    )
    direct = hessian_trace(model, F.cross_entropy, data, n_hvp=12)
    assert row["tr"] == float(direct.estimate)
    assert row["tr_std_error"] == float(direct.std_error) > 0


def test_lightning_callback_takes_the_keywords():
    pytest.importorskip("lightning")
    from flatness.integrations.lightning import FlatnessCallback

    model = make_mlp(0, dtype=torch.float32)
    callback = FlatnessCallback(None, dict_batches(), measures=["loss"], **SHARED)
    assert callback.monitor.options["*"] == {**SHARED, "process_group": False}
    row = callback.monitor.measure(model)
    assert row["loss"] == float(Objective(model, None, dict_batches(), **SHARED).loss())
    with pytest.raises(TypeError, match="'n_hvp'"):
        FlatnessCallback(F.cross_entropy, dict_batches(), n_hvp=10)


def test_huggingface_callback_takes_the_keywords():
    pytest.importorskip("transformers")
    from flatness.integrations.huggingface import FlatnessTrainerCallback

    model = make_mlp(0, dtype=torch.float32)
    callback = FlatnessTrainerCallback(None, dict_batches(), every=1, **SHARED)
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, log_history=[])
    callback.on_train_begin(SimpleNamespace(report_to=[]), state, None, model=model)
    assert state.log_history[0]["flatness/loss"] == float(
        Objective(model, None, dict_batches(), **SHARED).loss()
    )
    with pytest.raises(ValueError, match="batch_size: given both"):
        FlatnessTrainerCallback(None, dict_batches(), batch_size=len, options={"*": {"batch_size": len}})
