"""The GPU path: every function on CUDA equals the CPU result (float64), vectors stay on the device.

Skipped where no GPU exists; run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flatness
from conftest import assert_untouched, image_data, make_cnn, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

F = nn.functional


def _pair():
    model = make_cnn(0)
    x, y = image_data(12)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    gpu = copy.deepcopy(model).cuda()
    gpu_data = [(a.cuda(), b.cuda()) for a, b in data]
    return (model, data), (gpu, gpu_data)


def close(a, b, tol=1e-9):
    a = torch.as_tensor(a).cpu().double()
    b = torch.as_tensor(b).cpu().double()
    return torch.allclose(a, b, rtol=tol, atol=tol)


def test_objective_on_cuda_matches_cpu_and_stays_on_device():
    (cpu, data), (gpu, gdata) = _pair()
    before = snapshot(gpu)
    for mode in ("forward", "reverse"):
        o_cpu = flatness.Objective(cpu, F.cross_entropy, data, hvp_mode=mode)
        o_gpu = flatness.Objective(gpu, F.cross_entropy, gdata, hvp_mode=mode)
        v = torch.linspace(-1, 1, o_cpu.n, dtype=torch.float64)
        hv = o_gpu.hvp(v.cuda())
        assert hv.is_cuda
        assert close(hv, o_cpu.hvp(v))
        l_gpu, g_gpu = o_gpu.loss_and_grad()
        l_cpu, g_cpu = o_cpu.loss_and_grad()
        assert g_gpu.is_cuda and close(g_gpu, g_cpu) and close(l_gpu, l_cpu)
    # Data on the CPU with a model on the GPU: batches are moved to the model's device.
    o_mixed = flatness.Objective(gpu, F.cross_entropy, data)
    assert close(o_mixed.loss(), flatness.Objective(cpu, F.cross_entropy, data).loss())
    assert_untouched(gpu, before)


def test_measures_on_cuda_match_cpu():
    (cpu, data), (gpu, gdata) = _pair()
    top_c = flatness.hessian_topk(cpu, F.cross_entropy, data, k=3, tol=1e-8)
    top_g = flatness.hessian_topk(gpu, F.cross_entropy, gdata, k=3, tol=1e-8)
    assert top_g.eigenvectors.is_cuda
    assert close(top_g.eigenvalues, top_c.eigenvalues, 1e-7)
    tr_c = flatness.hessian_trace(cpu, F.cross_entropy, data, n_hvp=12, seed=1)
    tr_g = flatness.hessian_trace(gpu, F.cross_entropy, gdata, n_hvp=12, seed=1)
    # Random probes are drawn on the CPU and moved, so the estimate is device-independent.
    assert abs(tr_c.estimate - tr_g.estimate) <= 1e-8 * abs(tr_c.estimate)
    s_c = flatness.sharpness(cpu, F.cross_entropy, data, epsilon=1e-2)
    s_g = flatness.sharpness(gpu, F.cross_entropy, gdata, epsilon=1e-2)
    assert abs(s_c.value - s_g.value) <= 1e-6 * max(1.0, abs(s_c.value))
    c = torch.linspace(-0.5, 0.5, 5)
    l_c = flatness.landscape_2d(cpu, F.cross_entropy, data, alphas=c, betas=c, seed=0)
    l_g = flatness.landscape_2d(gpu, F.cross_entropy, gdata, alphas=c, betas=c, seed=0)
    assert close(l_c.loss, l_g.loss, 1e-9)


def test_lanczos_basis_on_the_host():
    """basis_device="cpu": the operator on the GPU, the basis and eigenvectors in host memory."""
    (cpu, data), (gpu, gdata) = _pair()
    ref = flatness.hessian_topk(cpu, F.cross_entropy, data, k=2, tol=1e-8)
    for keep in (True, False):
        res = flatness.hessian_topk(
            gpu, F.cross_entropy, gdata, k=2, tol=1e-8, basis_device="cpu", keep_products=keep
        )
        assert res.eigenvectors.device.type == "cpu" and res.converged
        assert close(res.eigenvalues, ref.eigenvalues, 1e-7)
    dens = flatness.hessian_density(gpu, F.cross_entropy, gdata, n_runs=2, n_steps=6, basis_device="cpu")
    dens_c = flatness.hessian_density(cpu, F.cross_entropy, data, n_runs=2, n_steps=6)
    assert close(dens.nodes[torch.isfinite(dens.nodes)], dens_c.nodes[torch.isfinite(dens_c.nodes)], 1e-7)


def test_kept_graph_on_cuda_matches_cpu():
    (cpu, data), (gpu, gdata) = _pair()
    op_c = flatness.HessianOperator(cpu, F.cross_entropy, data)
    op_g = flatness.HessianOperator(gpu, F.cross_entropy, gdata)
    v = torch.linspace(-1, 1, op_c.shape[0], dtype=torch.float64)
    with op_g.reusing_graph():
        op_g @ v.cuda()
        hv = op_g @ v.cuda()
        assert op_g.graph_reused and hv.is_cuda
    assert close(hv, op_c @ v)
