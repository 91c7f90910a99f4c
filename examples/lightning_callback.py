"""Watch curvature while Lightning trains: FlatnessCallback logs λ₁ beside 2/η to the loggers.

Trains a small tanh MLP on 500 of scikit-learn's bundled digits (squared error on one-hot
targets) with full-batch gradient descent, step size η = 0.2, and records every 20 steps the
training loss, the top Hessian eigenvalue λ₁ of the training loss (warm-started Lanczos), 2/η
and the squared weight norm. λ₁ rises to 2/η = 10 and then hovers around it: the edge of
stability (Cohen et al. 2021, arXiv 2103.00065). The values go to a CSVLogger
(``<out>/flatness/version_0/metrics.csv``) as ``flatness/<measure>``; the script prints them.

    pip install -e ".[examples,lightning]" && python examples/lightning_callback.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn

from flatness.integrations.lightning import FlatnessCallback

LR = 0.2


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half the squared error, summed over classes, averaged over samples."""
    return 0.5 * ((out - target) ** 2).sum(1).mean()


class DigitsMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = mse(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def main(steps: int = 300, every: int = 20, out: str = "lightning-logs") -> FlatnessCallback:
    digits = load_digits()
    x = torch.tensor(digits.data[:500] / 16.0, dtype=torch.float32)
    y = nn.functional.one_hot(torch.tensor(digits.target[:500]), 10).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)  # full batch
    probe = (x, y)  # the whole training set: λ₁ of the loss gradient descent sees

    callback = FlatnessCallback(
        mse,
        probe,
        every=every,
        measures=[
            "loss",
            "top_eigenvalue",
            {"weight_norm": lambda m: sum(p.norm() ** 2 for p in m.parameters())},
        ],
        options={"top_eigenvalue": {"tol": 1e-3}},
        learning_rate="auto",  # 2/η from the optimizer, beside λ₁
    )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(out, name="flatness"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=every,
    )
    trainer.fit(DigitsMLP(), loader)

    print(f"{'step':>5} {'loss':>8} {'lambda_1':>9} {'2/lr':>6} {'|w|^2':>8} {'seconds':>8}")
    for r in callback.records:
        print(
            f"{r['step']:5d} {r['loss']:8.4f} {r['top_eigenvalue']:9.3f} {r['two_over_lr']:6.1f} "
            f"{r['weight_norm']:8.2f} {r['time_s']:8.2f}"
        )
    return callback


if __name__ == "__main__":
    main()
