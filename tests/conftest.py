"""Toy models with exact oracles, shared by all test modules."""

from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

# "ci" (default): the same examples on every run (derandomize), so CI is reproducible; "deep"
# (HYPOTHESIS_PROFILE=deep): many random examples, to hunt for new failures.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Quadratic(nn.Module):
    """f(θ) = ½ (θ − x*)ᵀ H (θ − x*) + c, independent of the data (outputs one value per sample)."""

    def __init__(self, H: torch.Tensor, x_star: torch.Tensor | None = None, c: float = 0.0, theta=None):
        super().__init__()
        n = H.shape[0]
        self.register_buffer("H", H.clone())
        self.register_buffer("x_star", torch.zeros(n, dtype=H.dtype) if x_star is None else x_star.clone())
        self.c = c
        init = self.x_star.clone() if theta is None else theta.clone()
        self.theta = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.theta - self.x_star
        value = 0.5 * d @ self.H @ d + self.c
        return value.expand(x.shape[0])


def mean_loss(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out.mean()


def quadratic_problem(H, x_star=None, c=0.0, theta=None):
    """(model, loss_fn, data) whose full-data loss is exactly the quadratic."""
    model = Quadratic(H, x_star, c, theta)
    data = (torch.zeros(3, 1, dtype=H.dtype), torch.zeros(3, dtype=H.dtype))
    return model, mean_loss, data


def make_mlp(seed: int = 0, d_in: int = 5, hidden: int = 7, d_out: int = 3, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * 4, classes)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = nn.functional.avg_pool2d(h, 2)
        return self.fc(h.flatten(1))


def make_cnn(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    # Non-trivial running statistics, as after training.
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model


class TiedModel(nn.Module):
    """An autoencoder-like model whose decoder reuses the encoder's weight (one parameter)."""

    def __init__(self, d: int = 4, h: int = 3):
        super().__init__()
        self.enc = nn.Linear(d, h)
        self.dec = nn.Linear(h, d)
        self.dec.weight = self.enc.weight  # tied: shapes (h, d) vs (d, h) differ, so use a transpose below

    def forward(self, x):
        z = torch.tanh(self.enc(x))
        return z @ self.enc.weight + self.dec.bias


class TinyTransformer(nn.Module):
    """One pre-built attention block (scaled_dot_product_attention inside) and a linear head."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class SharedLinear(nn.Module):
    """The same nn.Linear applied twice (tied weights by module reuse)."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = self.a
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


def make_frozen(seed: int = 0, dtype=torch.float64) -> nn.Module:
    model = make_mlp(seed, dtype=dtype)
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def classification_data(n: int = 23, d: int = 5, classes: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def image_data(n: int = 10, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def split(x, y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    assert i == len(x)
    return out


def _output_function(model: nn.Module, x, names=None):
    """(f, θ₀): f(θ) = the model's outputs on x with θ's pieces put in every slot (float64)."""
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    shapes = [named[n].shape for n in names]
    numels = [named[n].numel() for n in names]
    theta0 = torch.cat([named[n].detach().reshape(-1).double() for n in names])

    def f(theta):
        pieces = torch.split(theta, numels)
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=False)}
        # Independent of flatness's own swapping: a deep copy (which keeps tied and reused
        # tensors shared) gets every slot of each chosen parameter replaced by its piece of θ.
        clone = copy.deepcopy(model)
        cloned = dict(clone.named_parameters())
        for n, value in params.items():
            target = cloned[n]
            for module in clone.modules():
                for attr, p in list(module._parameters.items()):
                    if p is target:
                        del module._parameters[attr]
                        setattr(module, attr, value)
        with torch.no_grad():
            for p in clone.parameters():
                p.data = p.data.double()
            for b in clone.buffers():
                if b.is_floating_point():
                    b.data = b.data.double()
        return clone(x.double() if x.is_floating_point() else x)

    return f, theta0


def dense_hessian_oracle(model: nn.Module, loss_fn, x, y, names=None):
    """Loss, gradient and Hessian of loss_fn(model(x), y) on the whole data in one call (float64)."""
    out_fn, theta0 = _output_function(model, x, names)

    def f(theta):
        return loss_fn(out_fn(theta), y)

    was = model.training
    model.eval()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no second derivative
            loss, grad, hess = _oracle_derivatives(f, theta0)
    finally:
        model.train(was)
    return loss.detach(), grad.detach(), hess.detach()


def dense_jacobian_oracle(model: nn.Module, x, names=None):
    """(outputs z, Jacobian J = ∂z/∂θ as a (z.numel(), n) matrix) of the model on x (float64, eval)."""
    out_fn, theta0 = _output_function(model, x, names)
    was = model.training
    model.eval()
    try:
        z = out_fn(theta0).detach()
        jac = torch.autograd.functional.jacobian(out_fn, theta0).reshape(z.numel(), -1)
    finally:
        model.train(was)
    return z, jac.detach()


def _oracle_derivatives(f, theta0):
    loss = f(theta0)
    grad = torch.autograd.functional.jacobian(f, theta0)
    hess = torch.autograd.functional.hessian(f, theta0)
    return loss, grad, hess


def snapshot(model: nn.Module) -> dict:
    """Everything flatness promises not to change, for bit-for-bit comparison."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state().clone(),
        "np_rng": np.random.get_state()[1].copy(),
        "py_rng": random.getstate(),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n]), f"{key} {n} changed"
            assert before[key][n].dtype == after[key][n].dtype
    assert before["param_ids"] == after["param_ids"]
    assert before["flags"] == after["flags"]
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, f"grad of {n} appeared"
        else:
            assert torch.equal(g, after["grads"][n]), f"grad of {n} changed"
    assert before["modes"] == after["modes"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["np_rng"], after["np_rng"])
    assert before["py_rng"] == after["py_rng"]


@pytest.fixture
def ce():
    return nn.functional.cross_entropy


def collate_lm(seqs):
    """Right-padded dict batch: pad id 0, attention mask 0 and label -100 at the pads."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)], labels[i, : len(s)] = s, 1, lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
