"""Hugging Face: token-weighted LM losses against exact oracles; the Trainer callback leaves
training bit-identical and logs what direct calls give. Tiny models built from configs."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from conftest import collate_lm as collate
from conftest import dense_hessian_oracle
from flatness import HessianOperator, Objective
from flatness.integrations.huggingface import FlatnessTrainerCallback, lm_loss

VOCAB = 5


def tiny(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "causal":
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=8, n_embd=4, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        type_vocab_size=1,
        pad_token_id=0,
    )
    return BertForMaskedLM(config)


def sequences(kind: str, seed: int = 0):
    """(ids, labels) per sequence, of lengths 1..8; masked LM predicts a random third of the tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in (5, 2, 7, 1, 8, 3):
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        if kind == "causal":
            labels = ids.clone()
        else:
            labels = torch.where(torch.rand(length, generator=g) < 0.4, ids, torch.full_like(ids, -100))
            labels[0] = ids[0]  # at least one predicted token per sequence
        out.append((ids, labels))
    return out


def batches(kind: str):
    seqs = sequences(kind)
    # Batches of 2, 1 and 3 sequences: different padding and numbers of predicted tokens.
    return [collate(seqs[:2]), collate(seqs[2:3]), collate(seqs[3:])]


class TokenMean(nn.Module):
    """The oracle: Σ over every predicted token of every sequence, run alone (unpadded), / N."""

    def __init__(self, lm: nn.Module, kind: str, seqs) -> None:
        super().__init__()
        self.lm, self.kind, self.seqs = lm, kind, seqs

    def forward(self, _x):
        total, count = 0.0, 0
        for ids, labels in self.seqs:
            logits = self.lm(input_ids=ids[None]).logits[0]
            if self.kind == "causal":
                logits, labels = logits[:-1], labels[1:]
            keep = labels != -100
            total = total + nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            count += int(keep.sum())
        return total / count


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_lm_loss_is_the_token_mean_whatever_the_padding(kind):
    model = tiny(kind).double()
    data = batches(kind)
    with torch.no_grad():
        expected = float(TokenMean(model.eval(), kind, sequences(kind))(None))
    model.train()
    assert float(Objective(model, data=data, **lm_loss(kind)).loss()) == pytest.approx(
        expected, rel=1e-6, abs=1e-12
    )
    # The test can fail: weighting batches by sequences (the default rule) is another function.
    by_sequences = Objective(model, data=data, batch_loss=lm_loss(kind)["batch_loss"])
    assert abs(float(by_sequences.loss()) - expected) > 100 * 1e-6 * expected


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_lm_loss_hessian_matches_the_dense_oracle(kind):
    """Over an attention bias and the (for GPT-2 tied) token embedding, ∇ and ∇² in float64."""
    model = tiny(kind).double()
    data = batches(kind)
    bias = (
        "transformer.h.0.attn.c_attn.bias"
        if kind == "causal"
        else "bert.encoder.layer.0.attention.self.query.bias"
    )
    embedding = "transformer.wte.weight" if kind == "causal" else "bert.embeddings.word_embeddings.weight"
    names = [n for n, _ in model.named_parameters() if n in (bias, embedding)]  # θ's order
    oracle = TokenMean(model, kind, sequences(kind))
    _, grad, hess = dense_hessian_oracle(
        oracle, lambda out, _y: out, torch.zeros(1), None, ["lm." + n for n in names]
    )
    op = HessianOperator(model, None, data, params=names, **lm_loss(kind))
    dense = torch.stack([op @ e for e in torch.eye(op.shape[0], dtype=torch.float64)], dim=1)
    torch.testing.assert_close(dense, hess, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.objective.grad(), grad, rtol=1e-9, atol=1e-12)


def test_lm_loss_bad_input():
    with pytest.raises(ValueError, match="kind"):
        lm_loss("seq2seq")
    fns = lm_loss("causal")
    with pytest.raises(TypeError, match="'labels' key"):
        fns["batch_size"]((torch.zeros(2, 3), torch.zeros(2)))
    empty = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.tensor([[5, -100, -100], [4, -100, -100]]),
    }
    with pytest.raises(ValueError, match="no predicted token"):
        fns["batch_size"](empty)
    assert lm_loss("masked")["batch_size"](empty) == 2  # no shift for masked LM


class Snapshots(TrainerCallback):
    """Added after the flatness callback: the model's state at every global step."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(model.state_dict())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(model.state_dict())


class Reporter(TrainerCallback):
    """Sees every Trainer.log call, as report_to integrations (TensorBoard, W&B) do."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def train(tmp_path, callback=None, steps=6):
    model = tiny("causal")  # dropout 0.1: training consumes the global RNG
    train_set = [{"input_ids": ids, "labels": labels} for ids, labels in sequences("causal", seed=1) * 2]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=lambda rows: collate([(r["input_ids"], r["labels"]) for r in rows]),
    )
    extra = (Snapshots(), Reporter())
    if callback is not None:
        callback.attach(trainer)
        for cb in extra:
            trainer.add_callback(cb)
    trainer.train()
    return trainer, extra


def test_trainer_callback_is_bit_identical_and_logs_direct_values(tmp_path):
    probe = batches("causal")[:2]
    callback = FlatnessTrainerCallback(
        None,
        probe,
        every=3,
        measures=["loss", "grad_norm", {"bias": lambda m: m.transformer.ln_f.bias.norm()}],
        options={"*": lm_loss("causal")},
        learning_rate="auto",
    )
    with_cb, (snaps, reporter) = train(tmp_path / "a", callback)
    without, _ = train(tmp_path / "b")
    for k, v in without.model.state_dict().items():
        assert torch.equal(with_cb.model.state_dict()[k], v), k
    opt_a, opt_b = with_cb.optimizer.state_dict(), without.optimizer.state_dict()
    for i, state in opt_b["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(opt_a["state"][i][key]), torch.as_tensor(value)), (i, key)

    assert [r["step"] for r in callback.records] == [0, 3, 6]
    history = {h["step"]: h for h in with_cb.state.log_history if "flatness/loss" in h}
    reported = {step: logs for step, logs in reporter.logs if "flatness/loss" in logs}
    assert sorted(history) == sorted(reported) == [0, 3, 6]
    for row in callback.records:
        step = row["step"]
        model = tiny("causal")
        model.load_state_dict(snaps.states[step])
        obj = Objective(model, None, probe, **lm_loss("causal"))
        for logged in (history[step], reported[step]):
            assert logged["flatness/loss"] == row["loss"] == float(obj.loss())
            assert logged["flatness/grad_norm"] == row["grad_norm"] == float(obj.grad().norm())
            assert logged["flatness/bias"] == float(model.transformer.ln_f.bias.detach().norm())
        assert history[step]["flatness/two_over_lr"] == pytest.approx(2 / 1e-2)


def test_callback_without_attach_rank_zero_and_epochs():
    probe = batches("causal")[:1]
    callback = FlatnessTrainerCallback(None, probe, every=2, options={"*": lm_loss("causal")})
    model = tiny("causal")
    args = SimpleNamespace(report_to=["wandb"])
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, log_history=[])
    with pytest.warns(UserWarning, match=r"attach\(trainer\)"):
        callback.on_train_begin(args, state, None, model=model)
    assert state.log_history == [
        {
            "flatness/loss": callback.records[0]["loss"],
            "flatness/time_s": callback.records[0]["time_s"],
            "epoch": 0.0,
            "step": 0,
        }
    ]
    other = SimpleNamespace(global_step=2, epoch=1.0, is_world_process_zero=False, log_history=[])
    callback.on_step_end(args, other, None, model=model)  # not the main process: nothing
    assert len(callback.records) == 1 and other.log_history == []
    per_epoch = FlatnessTrainerCallback(
        None, probe, every=2, interval="epoch", options={"*": lm_loss("causal")}
    )
    # 5 steps per epoch; max_steps ends training in the sixth epoch (a partial one ends too).
    for epoch in (1.0, 2.0, 3.0, 4.0, 5.0, 5.4):
        step = round(epoch * 5)
        per_epoch.on_step_end(
            args, SimpleNamespace(**{**vars(state), "global_step": step}), None, model=model
        )
        end = SimpleNamespace(**{**vars(state), "epoch": epoch, "global_step": step})
        per_epoch.on_epoch_end(args, end, None, model=model)
    assert [(r["step"], r["epoch"]) for r in per_epoch.records] == [(10, 2.0), (20, 4.0), (27, 5.4)]
    with pytest.raises(TypeError, match=r"transformers\.Trainer"):
        callback.attach(object())


def trainer_rows(trainer) -> list[dict]:
    """The Trainer's own log rows (loss, grad_norm, learning_rate; train_loss at the end), without
    the timing columns that differ between any two runs."""
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    return [
        {k: v for k, v in row.items() if k not in timing}
        for row in trainer.state.log_history
        if not any(k.startswith("flatness/") for k in row)
    ]


def run_logged(tmp_path, how=None, *, logging_steps, every, interval="step", strategy="steps"):
    """6 steps (2 epochs of 3) logging every ``logging_steps``; the callback registered ``how``."""
    model = tiny("causal")
    train_set = [{"input_ids": ids, "labels": labels} for ids, labels in sequences("causal", seed=1) * 3]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=6,
        num_train_epochs=2,
        learning_rate=1e-2,
        logging_strategy=strategy,
        logging_steps=logging_steps,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    callback = FlatnessTrainerCallback(
        None, batches("causal")[:1], every=every, interval=interval, options={"*": lm_loss("causal")}
    )
    collator = lambda rows: collate([(r["input_ids"], r["labels"]) for r in rows])  # noqa: E731
    callbacks = [callback] if how == "callbacks" else None
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, data_collator=collator, callbacks=callbacks
    )
    if how == "attach":
        callback.attach(trainer)
    trainer.train()
    return trainer, callback


@pytest.mark.parametrize(
    ("logging_steps", "every", "interval", "strategy"),
    [(1, 1, "step", "steps"), (2, 3, "step", "steps"), (1, 1, "epoch", "epoch")],
)
def test_trainer_log_rows_are_the_same_with_the_callback(tmp_path, logging_steps, every, interval, strategy):
    """The callback logs beside the Trainer, never instead of it: attached either way, the
    Trainer's loss / grad_norm / learning_rate rows and train_loss equal a run without it."""
    plain, _ = run_logged(
        tmp_path / "plain", None, logging_steps=logging_steps, every=every, strategy=strategy
    )
    expected = trainer_rows(plain)
    assert sum("loss" in r for r in expected) == (6 // logging_steps if strategy == "steps" else 2)
    assert "train_loss" in expected[-1]
    for how in ("attach", "callbacks"):
        trainer, callback = run_logged(
            tmp_path / how,
            how,
            logging_steps=logging_steps,
            every=every,
            interval=interval,
            strategy=strategy,
        )
        assert trainer_rows(trainer) == expected, how
        ours = [r for r in trainer.state.log_history if "flatness/loss" in r]
        assert [r["step"] for r in ours] == [r["step"] for r in callback.records] != []
