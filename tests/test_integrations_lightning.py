"""The Lightning callback: logged values equal direct calls; training stays bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")
import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger

from conftest import classification_data
from flatness import Objective, hessian_topk
from flatness.integrations.lightning import FlatnessCallback

F = nn.functional


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 16), nn.Dropout(0.2), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MemoryLogger(Logger):
    """Keeps every log_metrics call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class Snapshots(pl.Callback):
    """Runs after the flatness callback: the module's state at every global step."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def probe():
    x, y = classification_data(16, dtype=torch.float32, seed=3)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def fit(callbacks, logger=None, steps=9, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    module = Module()
    x, y = classification_data(48, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, **trainer_kwargs},
    )
    trainer.fit(module, loader)
    return module, trainer


def bias_norm(model):
    return model.net[-1].bias.norm()


def test_training_is_bit_identical_and_logged_values_equal_direct_calls():
    callback = FlatnessCallback(
        F.cross_entropy,
        probe(),
        every=4,
        measures=["loss", "grad_norm", {"bias_norm": bias_norm}],
        learning_rate="auto",
    )
    logger, snaps = MemoryLogger(), Snapshots()
    with_cb, trainer = fit([callback, snaps], logger=logger)
    without, trainer_plain = fit([])
    for k, v in without.state_dict().items():
        assert torch.equal(with_cb.state_dict()[k], v), k
    opt_a, opt_b = trainer.optimizers[0].state_dict(), trainer_plain.optimizers[0].state_dict()
    for i, state in opt_b["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(opt_a["state"][i][key]), torch.as_tensor(value)), (i, key)

    assert [r["step"] for r in callback.records] == [0, 4, 8]
    logged = {step: m for step, m in logger.calls if "flatness/loss" in m}
    assert sorted(logged) == [0, 4, 8]
    for row in callback.records:
        step = row["step"]
        model = Module()
        model.load_state_dict(snaps.states[step])
        obj = Objective(model, F.cross_entropy, probe())
        assert logged[step]["flatness/loss"] == row["loss"] == float(obj.loss())
        assert logged[step]["flatness/grad_norm"] == row["grad_norm"] == float(obj.grad().norm())
        assert logged[step]["flatness/bias_norm"] == pytest.approx(float(bias_norm(model).detach()), rel=0)
        assert logged[step]["flatness/two_over_lr"] == pytest.approx(2 / 1e-2)
        assert "flatness/step" not in logged[step] and "flatness/epoch" not in logged[step]


def test_top_eigenvalue_records_are_warm_started_and_exact():
    callback = FlatnessCallback(
        F.cross_entropy,
        probe(),
        every=3,
        measures=["top_eigenvalue"],
        options={"*": {"dtype": torch.float64}, "top_eigenvalue": {"tol": 1e-6}},
    )
    snaps = Snapshots()
    fit([callback, snaps], steps=6)
    assert [r["step"] for r in callback.records] == [0, 3, 6]
    for row in callback.records:
        model = Module()
        model.load_state_dict(snaps.states[row["step"]])
        cold = hessian_topk(model, F.cross_entropy, probe(), tol=1e-6, dtype=torch.float64)
        assert row["top_eigenvalue"] == pytest.approx(float(cold.eigenvalues[0]), rel=1e-8)
    assert callback.monitor.last_results["top_eigenvalue"].ncv == 20  # the default basis (guard 11)


def test_epoch_interval_and_gradient_accumulation():
    every_epoch = FlatnessCallback(F.cross_entropy, probe(), every=2, interval="epoch")
    per_step = FlatnessCallback(F.cross_entropy, probe(), every=2)
    # 6 batches per epoch, 2 per optimizer step: 3 optimizer steps per epoch.
    fit([every_epoch, per_step], steps=12, max_epochs=4, accumulate_grad_batches=2)
    assert [(r["step"], r["epoch"]) for r in every_epoch.records] == [(6, 1), (12, 3)]
    assert [r["step"] for r in per_step.records] == [0, 2, 4, 6, 8, 10, 12]


def test_state_dict_and_bad_input():
    callback = FlatnessCallback(F.cross_entropy, probe(), every=1)
    callback.monitor.measure(Module())
    other = FlatnessCallback(F.cross_entropy, probe(), every=1)
    other.load_state_dict(callback.state_dict())
    assert other.records == callback.records and "records=1" in repr(other)
    with pytest.raises(ValueError, match="interval"):
        FlatnessCallback(F.cross_entropy, probe(), interval="batch")
    with pytest.raises(ValueError, match="learning_rate"):
        FlatnessCallback(F.cross_entropy, probe(), learning_rate="optimizer")
    with pytest.raises(ValueError, match="unknown measure"):
        FlatnessCallback(F.cross_entropy, probe(), measures={"x": "curvature"})


def rank_marker(directory, model):
    """A custom measure that leaves a file per process that ran it."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else -1
    (directory / f"rank{rank}-{len(list(directory.iterdir()))}").touch()
    return rank


@pytest.mark.slow
def test_two_processes_measure_on_rank_zero_only(tmp_path):
    """DDP on 2 CPU processes (gloo): only rank 0 measures, on its whole probe, and the logged
    loss is the one-process value; the values reach rank 1's callback_metrics by a broadcast
    (an EarlyStopping on every rank would otherwise fail there for want of the metric)."""
    import datetime
    import functools

    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    marks = tmp_path / "marks"
    marks.mkdir()
    callback = FlatnessCallback(
        F.cross_entropy,
        probe(),
        every=3,
        measures=["loss", {"rank": functools.partial(rank_marker, marks)}],
    )
    pl.seed_everything(0, verbose=False)
    module = Module()
    x, y = classification_data(48, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=2,
        # A collective that only one rank joins fails after 2 minutes instead of hanging.
        strategy=pl.strategies.DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=120)),
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[callback, EarlyStopping(monitor="flatness/loss", check_on_train_epoch_end=True)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert sorted(p.name.split("-")[0] for p in marks.iterdir()) == ["rank0", "rank0"]  # steps 0 and 3
    import csv

    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("flatness/loss")]
    assert [int(r["step"]) for r in rows] == [0, 3]
    assert [float(r["flatness/rank"]) for r in rows] == [0.0, 0.0]
    # The weights come back to this process after ddp_spawn: the last record is their loss.
    expected = float(Objective(module, F.cross_entropy, probe()).loss())
    assert float(rows[-1]["flatness/loss"]) == pytest.approx(expected, rel=1e-6)


def test_values_reach_callback_metrics_for_early_stopping_and_checkpoints(tmp_path):
    """The records are in trainer.callback_metrics (what ModelCheckpoint and EarlyStopping
    monitor) and in every logger."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    # A constant never improves: EarlyStopping with patience 1 stops after the second epoch.
    callback = FlatnessCallback(
        F.cross_entropy, probe(), every=1, interval="epoch", measures=["loss", {"const": lambda m: 2.5}]
    )
    stop = EarlyStopping(monitor="flatness/const", patience=1, mode="min", check_on_train_epoch_end=True)
    loggers = [MemoryLogger(), MemoryLogger()]
    _, trainer = fit([callback, stop], logger=loggers, steps=-1, max_epochs=5)
    assert trainer.current_epoch == 2 and stop.stopped_epoch == 1
    assert [r["epoch"] for r in callback.records] == [0, 1]
    assert float(trainer.callback_metrics["flatness/const"]) == 2.5
    assert float(trainer.callback_metrics["flatness/loss"]) == callback.records[-1]["loss"]
    for logger in loggers:
        assert [m["flatness/loss"] for _, m in logger.calls if "flatness/loss" in m] == [
            r["loss"] for r in callback.records
        ]

    # ModelCheckpoint keeps the step whose probe loss (not the training loss) was the lowest.
    callback = FlatnessCallback(F.cross_entropy, probe(), every=3, measures=["loss"])
    best = ModelCheckpoint(dirpath=tmp_path, monitor="flatness/loss", mode="min", every_n_train_steps=3)
    _, trainer = fit([callback, best], steps=9, enable_checkpointing=True)
    saved = [r for r in callback.records if r["step"] > 0]  # the step-0 record precedes any save
    assert [r["step"] for r in saved] == [3, 6, 9]
    lowest = min(saved, key=lambda r: r["loss"])
    assert float(best.best_model_score) == lowest["loss"]
    assert f"step={lowest['step']}" in best.best_model_path
