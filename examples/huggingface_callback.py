"""Watch curvature while a Hugging Face Trainer trains a small GPT-2 (built from a config).

The "language" is synthetic, so nothing is downloaded: each sequence counts upwards modulo 16
from a random start, with a random length (padding varies between batches). A
FlatnessTrainerCallback records, every 20 steps on a fixed probe of padded batches, the
token-mean loss and the top Hessian eigenvalue λ₁ with ``lm_loss("causal")``, which weights each
batch by its number of predicted tokens, so the probe loss is the mean over all its tokens. The
values go through ``Trainer.log``: into ``trainer.state.log_history`` and every ``report_to``
integration, beside the Trainer's own training-loss rows (the table printed at the end shows
both). After training, any flatness function takes the same ``**lm_loss(...)``.

    pip install -e ".[hf]" && python examples/huggingface_callback.py
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from flatness import hessian_topk
from flatness.integrations.huggingface import FlatnessTrainerCallback, lm_loss

PAD = 0  # token ids 1..16 are the "words"


def counting_sequences(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 16, (1,), generator=g))
        length = int(torch.randint(4, 17, (1,), generator=g))
        out.append((start + torch.arange(length)) % 16 + 1)
    return out


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: pad id, attention mask 0 and label -100 at the pads."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def main(steps: int = 100, every: int = 20, out: str = "hf-output") -> FlatnessTrainerCallback:
    train = [{"input_ids": s} for s in counting_sequences(512, seed=0)]
    held_out = [{"input_ids": s} for s in counting_sequences(32, seed=1)]
    probe = [collate(held_out[i : i + 8]) for i in range(0, 32, 8)]  # 4 batches, different padding

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=17, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=PAD, eos_token_id=PAD
    )
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=3e-3,
        logging_steps=every,
        report_to="none",  # or "tensorboard", "wandb", ...: the flatness values go there too
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    callback = FlatnessTrainerCallback(
        None,  # the loss comes from lm_loss: batch_loss and batch_size for dict batches
        probe,
        every=every,
        measures=["loss", "top_eigenvalue"],
        options={"top_eigenvalue": {"tol": 1e-2}},
        **lm_loss("causal"),  # the same keywords as every flatness function
    ).attach(trainer)  # attach: log through Trainer.log, so report_to integrations get the values
    trainer.train()

    # The Trainer's own rows (its running training loss, logged every `logging_steps`) and the
    # callback's rows sit side by side in log_history; neither replaces the other.
    train_loss = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    print(f"{'step':>5} {'train loss':>10} {'probe token loss':>16} {'lambda_1':>9} {'seconds':>8}")
    for r in callback.records:
        trained = f"{train_loss[r['step']]:10.4f}" if r["step"] in train_loss else f"{'-':>10}"
        print(f"{r['step']:5d} {trained} {r['loss']:16.4f} {r['top_eigenvalue']:9.3f} {r['time_s']:8.2f}")
    top = hessian_topk(trainer.model, None, probe, k=3, tol=1e-2, **lm_loss("causal"))
    print("top-3 Hessian eigenvalues after training:", [round(float(v), 3) for v in top.eigenvalues])
    return callback


if __name__ == "__main__":
    main()
