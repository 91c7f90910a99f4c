"""Shared benchmark problems and timing, so every benchmark measures the same models.

Run benchmarks as scripts from the repository root, e.g. ``python benchmarks/bench_hvp.py``.
They print ratios against a floor (one full-data gradient pass) and never run under pytest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, device="cpu") -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_mlp(d_in: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


class SmallCNN(nn.Module):
    """Two conv + BatchNorm + ReLU + pool blocks and a linear head (28×28 inputs): ~20k params."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _warm_bn(model: nn.Module, x: torch.Tensor) -> None:
    """A few train-mode passes so BatchNorm running statistics are realistic."""
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 256):
            model(x[i : i + 256])
    model.eval()


def mlp_problem(n: int = 2048, batch_size: int = 256, device: str = "cpu", seed: int = 0, hidden: int = 128):
    """(model, loss_fn, batches) for the benchmark MLP (64-hidden-hidden-10) on synthetic 64-d data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_mlp(hidden=hidden).to(device)
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, nn.functional.cross_entropy, _batches(x.to(device), y.to(device), batch_size)


def small_mlp_problem(n: int = 128, batch_size: int = 128, device: str = "cpu", seed: int = 0):
    """The MLP at width 32 (64-32-32-10, 3,466 params) on 128 samples: per-point overhead dominates."""
    return mlp_problem(n, batch_size, device, seed, hidden=32)


def digits_problem(
    n: int = 512, train_steps: int = 300, device: str = "cpu", seed: int = 0, arch: str = "mlp"
):
    """(model, loss_fn, [one batch]) for a model on scikit-learn's bundled digits.

    ``arch="mlp"``: a 64-64-10 MLP trained as in ``examples/monitor_training.py`` (SGD, lr 0.5,
    batches of 512, ``train_steps`` steps; 0 = untrained). ``arch="cnn"``: two 3×3 convolutions
    (16, 32 channels, ReLU), 2×2 max-pooling and a linear head on the 8×8 images (SGD, lr 0.1).
    The batch is the first ``n`` digits.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(seed)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    elif arch == "cnn":
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )
    else:
        raise ValueError(f"arch: expected 'mlp' or 'cnn', got {arch!r}")
    opt = torch.optim.SGD(model.parameters(), lr=0.5 if arch == "mlp" else 0.1)
    g = torch.Generator().manual_seed(seed)
    step = 0
    while step < train_steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 512):
            idx = perm[i : i + 512]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if step == train_steps:
                break
    model.zero_grad(set_to_none=True)
    return model.to(device), nn.functional.cross_entropy, [(x[:n].to(device), y[:n].to(device))]


def cnn_problem(n: int = 2048, batch_size: int = 256, device: str = "cpu", seed: int = 0):
    """(model, loss_fn, batches) for the benchmark CNN with BatchNorm on synthetic 28×28 images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN().to(device)
    x = torch.randn(n, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    _warm_bn(model, x)
    return model, nn.functional.cross_entropy, _batches(x, y, batch_size)


def gradient_pass_time(model, loss_fn, batches, *, repeat: int = 5, device="cpu") -> float:
    """The floor: one plain full-data gradient pass (loss.backward() per batch)."""

    def run() -> None:
        for p in model.parameters():
            p.grad = None
        for xb, yb in batches:
            loss_fn(model(xb), yb).backward()

    t = timeit(run, repeat=repeat, device=device)
    for p in model.parameters():
        p.grad = None
    return t


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (the CIFAR variant, 11.2M parameters); no torchvision needed."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, c = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(c, c_out, stride), _Block(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def resnet18_problem(n: int = 1024, batch_size: int = 128, device: str = "cpu", seed: int = 0):
    """(model, loss_fn, batches) for ResNet-18 on synthetic 3×32×32 images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResNet18().to(device)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    _warm_bn(model, x)
    return model, nn.functional.cross_entropy, _batches(x, y, batch_size)
