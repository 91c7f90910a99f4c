"""hvp_mode="finite_difference" against dense float64 Hessians; clear errors where double backward fails."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch.autograd.function import once_differentiable

import flatness
from conftest import (
    assert_untouched,
    classification_data,
    dense_hessian_oracle,
    image_data,
    make_cnn,
    snapshot,
    split,
)
from flatness import NonSmoothWarning, NoSecondDerivativeError, Objective
from test_objective import CASES as CASES_FOR_FD

F = nn.functional


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c == "attention" else c for c in CASES_FOR_FD],
)
def test_fd_hvp_matches_dense_hessian_float64(case):
    make_model, loss_fn, make_data = CASES_FOR_FD[case]
    model = make_model()
    x, y = make_data()
    batches = split(x, y, [len(x) // 2, len(x) - len(x) // 2])
    obj = Objective(model, loss_fn, batches, hvp_mode="finite_difference")
    assert obj.hvp_mode_used == "finite_difference"
    _, _, hess = dense_hessian_oracle(model, loss_fn, x, y, names=obj.names)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-3, 1e4):  # the step is along v/‖v‖: any ‖v‖ gives the same accuracy
        v = scale * torch.randn(obj.n, generator=gen, dtype=torch.float64)
        assert rel(obj.hvp(v), hess @ v) < 1e-8
    assert obj.n_hvp == 3 and obj.n_grad == 1  # the non-smoothness guard's ∇L(θ), once per θ
    assert torch.equal(
        obj.hvp(torch.zeros(obj.n, dtype=torch.float64)), torch.zeros(obj.n, dtype=torch.float64)
    )
    assert_untouched(model, before)


def test_fd_step_rule():
    torch.manual_seed(0)
    model = nn.Linear(30, 20)
    with torch.no_grad():
        model.weight.mul_(40.0)  # ‖θ‖/√n > 1: the step grows with the parameters
    data = (torch.randn(8, 30), torch.randn(8, 20))
    obj = Objective(model, F.mse_loss, data, hvp_mode="finite_difference")
    norm = float(obj.theta0.double().norm())
    assert norm / math.sqrt(obj.n) > 1
    eps32 = torch.finfo(torch.float32).eps
    assert obj.fd_step() == pytest.approx(eps32 ** (1 / 3) * norm / math.sqrt(obj.n), rel=1e-12)
    small = obj.theta0 * 1e-3
    assert obj.fd_step(small) == pytest.approx(eps32 ** (1 / 3), rel=1e-12)
    # Gradients computed in float64 (dtype=): ε of float64.
    obj64 = Objective(model, F.mse_loss, data, hvp_mode="finite_difference", dtype=torch.float64)
    assert obj64.fd_step(small.double()) == pytest.approx(torch.finfo(torch.float64).eps ** (1 / 3))


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


@pytest.mark.parametrize(
    ("dtype", "bound", "tol"), [(torch.float64, 1e-6, 1e-8), (torch.float32, 1e-3, 1e-4)]
)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_fd_top5_eigenvalues_match_dense_oracle(net, dtype, bound, tol):
    if net == "mlp":
        model = _mlp(dtype)
        x, y = classification_data(40, d=4)
    else:
        model = make_cnn(2, dtype=dtype)
        x, y = image_data(16)
    x = x.to(dtype)
    _, _, hess = dense_hessian_oracle(model, F.cross_entropy, x, y)  # float64 of the same weights
    exact = torch.linalg.eigvalsh(hess).flip(0)[:5]
    before = snapshot(model)
    res = flatness.hessian_topk(
        model,
        F.cross_entropy,
        split(x, y, [len(x) // 2, len(x) - len(x) // 2]),
        k=5,
        tol=tol,
        hvp_mode="finite_difference",
    )
    assert res.converged
    assert float(((res.eigenvalues.double() - exact).abs() / exact.abs()).max()) < bound
    assert_untouched(model, before)


# ---------------------------------------------------------------------------- no second derivative
class OnceSoftplus(torch.autograd.Function):
    """softplus with a backward marked @once_differentiable (no double backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class NoAutogradSoftplus(torch.autograd.Function):
    """softplus whose backward runs without autograd: its second derivative would silently be 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return g * torch.sigmoid(x)


class Net(nn.Module):
    def __init__(self, act: str = "plain"):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 5)
        self.l3 = nn.Linear(5, 3)
        self.act = act

    def forward(self, x):
        h = self.l1(x)
        if self.act == "once":
            h = OnceSoftplus.apply(h)
        elif self.act == "no_autograd":
            h = NoAutogradSoftplus.apply(h)
        elif self.act in ("reentrant", "nonreentrant"):
            # The checkpointed segment holds parameters (l2): recomputed during the backward.
            return self.l3(
                cp.checkpoint(
                    lambda t: torch.tanh(self.l2(F.softplus(t))), h, use_reentrant=self.act == "reentrant"
                )
            )
        else:
            h = F.softplus(h)
        return self.l3(torch.tanh(self.l2(h)))


def _net_problem(act):
    torch.manual_seed(0)
    plain = Net().double()
    model = copy.deepcopy(plain)
    model.act = act
    x, y = classification_data(12, d=4)
    return plain, model, x, y


@pytest.mark.parametrize("act", ["once", "no_autograd", "reentrant"])
def test_models_without_second_derivative(act):
    plain, model, x, y = _net_problem(act)
    _, _, hess = dense_hessian_oracle(plain, F.cross_entropy, x, y)
    data = split(x, y, [5, 7])
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(hess.shape[0], generator=gen, dtype=torch.float64)
    before = snapshot(model)
    # Finite differences need gradients only: they work, also away from θ₀.
    fd = Objective(model, F.cross_entropy, data, hvp_mode="finite_difference")
    assert rel(fd.hvp(v), hess @ v) < 1e-8
    theta = fd.theta0 + 0.2 * torch.randn(fd.n, generator=gen, dtype=torch.float64)
    ref = Objective(plain, F.cross_entropy, data)
    assert rel(fd.grad(theta), ref.grad(theta)) < 1e-12
    assert rel(fd.hvp(v, theta), ref.hvp(v, theta)) < 1e-8
    top = flatness.hessian_topk(model, F.cross_entropy, data, k=2, tol=1e-8, hvp_mode="finite_difference")
    exact = torch.linalg.eigvalsh(hess).flip(0)[:2]
    assert float(((top.eigenvalues - exact).abs() / exact).max()) < 1e-6
    # The exact modes raise an error that names the finite-difference mode.
    for mode in ("auto", "reverse", "forward"):
        with pytest.raises(NoSecondDerivativeError, match='hvp_mode="finite_difference"'):
            Objective(model, F.cross_entropy, data, hvp_mode=mode).hvp(v)
    with pytest.raises(NoSecondDerivativeError, match="finite_difference"):
        flatness.hessian_topk(model, F.cross_entropy, data, k=1)
    assert_untouched(model, before)


def test_error_messages_say_why():
    _, once, x, y = _net_problem("once")
    v = torch.ones(sum(p.numel() for p in once.parameters()), dtype=torch.float64)
    with pytest.raises(NoSecondDerivativeError, match=r"OnceSoftplus.*not differentiable"):
        Objective(once, F.cross_entropy, (x, y)).hvp(v)
    _, reentrant, x, y = _net_problem("reentrant")
    with pytest.raises(NoSecondDerivativeError, match="reentrant activation checkpointing"):
        Objective(reentrant, F.cross_entropy, (x, y)).hvp(v)


def test_checkpointed_gradients_are_taken_at_theta_not_at_the_model():
    """Activation checkpointing recomputes the forward in the backward: it must see θ."""
    plain, model, x, y = _net_problem("nonreentrant")
    ref = Objective(plain, F.cross_entropy, (x, y))
    obj = Objective(model, F.cross_entropy, (x, y))
    gen = torch.Generator().manual_seed(2)
    theta = ref.theta0 + 0.3 * torch.randn(ref.n, generator=gen, dtype=torch.float64)
    v = torch.randn(ref.n, generator=gen, dtype=torch.float64)
    assert rel(obj.grad(theta), ref.grad(theta)) < 1e-12
    assert rel(obj.hvp(v, theta), ref.hvp(v, theta)) < 1e-12
    # Reentrant checkpointing: first-order gradients still work (by loss.backward()).
    _, reentrant, _, _ = _net_problem("reentrant")
    assert rel(Objective(reentrant, F.cross_entropy, (x, y)).grad(theta), ref.grad(theta)) < 1e-12
    before = snapshot(reentrant)
    flatness.sharpness(reentrant, F.cross_entropy, (x, y), epsilon=1e-2, max_iter=2)
    assert_untouched(reentrant, before)


def test_fd_in_train_mode_replays_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = classification_data(20, d=4)
    data = split(x, y, [7, 7, 6])
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    exact = Objective(model, F.cross_entropy, data, train=True).hvp(v)
    fd = Objective(model, F.cross_entropy, data, train=True, hvp_mode="finite_difference").hvp(v)
    assert rel(fd, exact) < 1e-8


def test_fd_leaves_the_model_untouched_when_a_pass_raises():
    torch.manual_seed(0)
    model = _mlp(torch.float64)
    x, y = classification_data(10, d=4)
    bad_y = y.clone()
    bad_y[-1] = 7  # out of range in the second batch: the loss raises mid-pass

    before = snapshot(model)
    obj = Objective(model, F.cross_entropy, split(x, bad_y, [5, 5]), hvp_mode="finite_difference")
    with pytest.raises(IndexError):
        obj.hvp(torch.ones(obj.n, dtype=torch.float64))
    assert_untouched(model, before)


def test_fd_error_bound_holds_in_float32():
    """‖FD − exact‖ ≤ ε^(2/3)-sized bound, per unit ‖v‖, on a smooth problem."""
    model = _mlp(torch.float32)
    x, y = classification_data(30, d=4, dtype=torch.float32)
    obj = Objective(model, F.cross_entropy, (x, y), hvp_mode="finite_difference")
    _, grad, hess = dense_hessian_oracle(model, F.cross_entropy, x, y)
    gen = torch.Generator().manual_seed(0)
    eps = torch.finfo(torch.float32).eps
    for _ in range(3):
        v = torch.randn(obj.n, generator=gen)
        err = float((obj.hvp(v).double() - hess @ v.double()).norm() / v.norm())
        # Rounding term ε‖∇L‖/h plus ε^(2/3)·‖H‖ (truncation and rounding of θ ± h v̂).
        h = obj.fd_step()
        bound = 10 * (
            eps * float(grad.norm()) / h + eps ** (2 / 3) * float(torch.linalg.matrix_norm(hess, 2))
        )
        assert err < bound


# ---------------------------------------------------------------------------- non-smooth models
def _act_mlp(act, dtype, width=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 3)).to(
        dtype
    )


NON_SMOOTH = r"gradient jumps.*not smooth \(ReLU, max-pooling.*hvp_mode='reverse'"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_guard_warns_on_relu_networks(dtype):
    """ReLU: a kink inside the step adds J/2h to the product; every FD function warns, once.

    In float64 (h ≈ 6e-6) random vectors rarely cross a kink, but Lanczos vectors do (see
    benchmarks/README.md, bench_fd.py).
    """
    model = _act_mlp(nn.ReLU, dtype, width=64)
    x, y = classification_data(256, d=8, dtype=dtype)
    data = split(x, y, [128, 128])
    before = snapshot(model)
    with pytest.warns(NonSmoothWarning, match=NON_SMOOTH) as record:
        top = flatness.hessian_topk(
            model, F.cross_entropy, data, k=1, hvp_mode="finite_difference", max_hvp=60
        )
    assert sum(issubclass(w.category, NonSmoothWarning) for w in record) == 1
    assert_untouched(model, before)
    # The warning is warranted: λ₁ from finite differences is far from the exact one.
    exact = flatness.hessian_topk(model, F.cross_entropy, data, k=1, hvp_mode="reverse").eigenvalues[0]
    assert abs(float(top.eigenvalues[0]) - float(exact)) > 0.05 * abs(float(exact))
    if dtype == torch.float32:  # random probes already cross kinks at h ≈ 5e-3
        with pytest.warns(NonSmoothWarning, match=NON_SMOOTH):
            flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=8, hvp_mode="finite_difference")
        with pytest.warns(NonSmoothWarning, match=NON_SMOOTH):
            flatness.hessian_density(model, F.cross_entropy, data, n_steps=8, hvp_mode="finite_difference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU, nn.SiLU])
def test_fd_guard_is_silent_on_smooth_networks(act, dtype):
    model = _act_mlp(act, dtype)
    x, y = classification_data(64, d=8, dtype=dtype)
    data = split(x, y, [32, 32])
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonSmoothWarning)
        top = flatness.hessian_topk(model, F.cross_entropy, data, k=5, tol=1e-4, hvp_mode="finite_difference")
        flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=12, hvp_mode="finite_difference")
        flatness.hessian_density(model, F.cross_entropy, data, n_steps=12, hvp_mode="finite_difference")
    assert top.converged
    # The guard did look, and found ratios far below its threshold (~ε^(1/3) on smooth losses).
    obj = Objective(model, F.cross_entropy, data, hvp_mode="finite_difference")
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        obj.hvp(torch.randn(obj.n, generator=gen, dtype=dtype))
    guard = obj._kinks
    assert guard.n_checked == 4 and not guard.warned
    eps = torch.finfo(dtype).eps
    assert guard.worst < 2 * eps ** (1 / 3) < guard.tol / 5


def test_fd_guard_costs_one_gradient_per_theta_and_leaves_products_unchanged():
    model = _act_mlp(nn.Tanh, torch.float64)
    x, y = classification_data(20, d=8)
    obj = Objective(model, F.cross_entropy, split(x, y, [7, 13]), hvp_mode="finite_difference")
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(obj.n, generator=gen, dtype=torch.float64) for _ in range(3)]
    products = [obj.hvp(v) for v in vs]
    assert (obj.n_hvp, obj.n_grad, obj.n_passes) == (3, 1, 4)  # ∇L(θ₀) once, kept
    # The products are the central differences themselves.
    h = obj.fd_step()
    for v, hv in zip(vs, products, strict=True):
        c = h / float(v.norm())
        manual = (obj.grad(obj.theta0 + c * v) - obj.grad(obj.theta0 - c * v)) * (float(v.norm()) / (2 * h))
        assert rel(hv, manual) < 1e-9
    # Another θ: its own gradient, once; back at θ₀ (an equal tensor): computed again.
    theta = obj.theta0 + 1e-3
    grads = obj.n_grad
    obj.hvp(vs[0], theta)
    obj.hvp(vs[1], theta.clone())
    assert obj.n_grad == grads + 1
    obj.hvp(vs[0])
    assert obj.n_grad == grads + 2


def _fsdp_guard_worker(rank, port, tmp, act_name):
    import os
    import warnings as _warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[act_name]
        model = _act_mlp(act, torch.float32, width=64)
        mesh = init_device_mesh("cpu", (2,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x, y = classification_data(128, d=8, dtype=torch.float32, seed=rank)
        with _warnings.catch_warnings(record=True) as record:
            _warnings.simplefilter("always")
            trace = flatness.hessian_trace(model, F.cross_entropy, split(x, y, [64, 64]), n_hvp=8)
        warned = [str(w.message) for w in record if issubclass(w.category, NonSmoothWarning)]
        torch.save({"warned": warned, "trace": float(trace.estimate)}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fd_guard_on_fsdp_models(tmp_path):
    """FSDP models use finite differences by default: the guard runs there too, on every rank."""
    import socket
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    for act in ("relu", "tanh"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_fsdp_guard_worker, args=(port, str(tmp_path), act), nprocs=2, join=True)
        ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
        assert ranks[0]["trace"] == ranks[1]["trace"]
        if act == "relu":
            for r in ranks:
                assert len(r["warned"]) == 1
                assert (
                    "not smooth (ReLU" in r["warned"][0]
                    and "model in one process with hvp_mode='reverse'" in r["warned"][0]
                )
        else:
            assert ranks[0]["warned"] == ranks[1]["warned"] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_guard_is_not_fooled_by_a_symmetry_of_the_loss(dtype):
    """Shifting all logits (the last bias along ones) leaves the loss unchanged: H v = 0, and the
    product is rounding noise, whose second difference is noise of the same size. Not a jump."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)
    x, y = classification_data(64, d=8, dtype=dtype)
    v = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=dtype)
    v[-3:] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonSmoothWarning)
        for first in (None, torch.randn(v.shape, dtype=dtype)):
            obj = Objective(model, F.cross_entropy, split(x, y, [32, 32]), hvp_mode="finite_difference")
            if first is not None:
                obj.hvp(first)
            hv = obj.hvp(v)
            assert float(hv.norm()) < 1e-4 * float(obj.hvp(torch.ones_like(v)).norm())
            assert obj._kinks.worst < obj._kinks.tol / 10


class _CubeLoss(torch.autograd.Function):
    """(out − y)³ with a backward marked @once_differentiable, used as a custom loss on the outputs."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_once_differentiable_loss_on_the_outputs_is_refused_not_zero(curvature):
    """The incoming gradient of a loss's last op is a constant: the old check saw nothing and H v was 0."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    data = [(torch.randn(8, 2).double(), torch.zeros(8, 1).double())]

    def loss(out, y):
        return _CubeLoss.apply(out - y).mean()

    v = torch.ones(3, dtype=torch.float64)
    with pytest.raises(NoSecondDerivativeError, match="once_differentiable"):
        flatness.curvature_operator(model, loss, data, curvature=curvature) @ v
    # Finite differences need no second derivative: they match the dense oracle.
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x = data[0][0]

    def f(t):
        return ((x @ t[:2] + t[2]) ** 3).mean()

    exact = torch.autograd.functional.hessian(f, theta) @ v
    fd = flatness.Objective(model, loss, data, hvp_mode="finite_difference").hvp(v)
    assert torch.allclose(fd, exact, rtol=1e-6)
