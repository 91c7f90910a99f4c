"""Watch curvature during training: a plain PyTorch loop with one extra line.

Trains a small MLP on scikit-learn's bundled digits with a large batch and records the loss, the
gradient norm and the top Hessian eigenvalue on a fixed probe every 50 steps. Prints the table
and writes ``monitor.csv``.

    pip install -e ".[examples]" && python examples/monitor_training.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from flatness import Monitor


def main(steps: int = 300, out: str = "monitor.csv") -> Monitor:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=512, shuffle=True)

    probe = [(x[:512], y[:512])]
    monitor = Monitor(
        nn.functional.cross_entropy,
        probe,
        every=50,
        measures=["loss", "grad_norm", "top_eigenvalue"],
        options={"top_eigenvalue": {"tol": 1e-2}},
    )
    step = 0
    while step < steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            monitor.step(model)  # the one extra line
            step += 1
            if step == steps:
                break
    monitor.to_csv(out)
    print(f"{'step':>5} {'loss':>8} {'|grad|':>8} {'lambda_1':>9}  (2/lr = {2 / 0.5:.1f})")
    for r in monitor.records:
        print(f"{r['step']:5d} {r['loss']:8.4f} {r['grad_norm']:8.4f} {r['top_eigenvalue']:9.3f}")
    return monitor


if __name__ == "__main__":
    main()
