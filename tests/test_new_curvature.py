"""A new curvature as one file: examples/custom_curvature.py's damped Hessian, against a dense oracle."""

from __future__ import annotations

import pathlib
import re
import runpy

import pytest
import torch
import torch.nn.functional as F

import flatness
from flatness.operators import CurvatureOperator, curvatures, register_curvature

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "custom_curvature.py"


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE))  # registers "damped_hessian"


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    return model, [(x[:7], y[:7]), (x[7:], y[7:])], x, y


def _dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(t):
        pieces, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            pieces[n] = t[i : i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, pieces, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta)


def test_the_damped_hessian_is_h_plus_lambda_i(example):
    model, data, x, y = _problem()
    op = flatness.curvature_operator(model, F.cross_entropy, data, curvature="damped_hessian", damping=0.25)
    exact = _dense_hessian(model, x, y) + 0.25 * torch.eye(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.dense(), exact, rtol=1e-10, atol=1e-12)
    block = op.block(["2.weight", "2.bias"])  # the diagonal block of the last layer
    n_last = 4 * 2 + 2
    torch.testing.assert_close(block.dense(), exact[-n_last:, -n_last:], rtol=1e-10, atol=1e-12)


def test_registered_name_works_in_the_spectrum_functions(example):
    model, data, x, y = _problem()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, x, y))
    top = flatness.hessian_topk(
        model, F.cross_entropy, data, k=2, curvature="damped_hessian", damping=0.5, tol=1e-10
    )
    assert top.curvature == "damped_hessian"
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:2] + 0.5, rtol=1e-8, atol=1e-10)
    trace = flatness.hessian_trace(
        model, F.cross_entropy, data, curvature="damped_hessian", damping=0.5, n_hvp=60
    )
    assert trace.estimate == pytest.approx(float(exact.sum()) + 0.5 * exact.numel(), rel=0.3)
    with pytest.raises(ValueError, match="damping"):
        flatness.curvature_operator(model, F.cross_entropy, data, curvature="damped_hessian", damping=-1.0)
    with pytest.raises(TypeError, match="damping"):
        flatness.hessian_topk(model, F.cross_entropy, data, curvature="ggn", damping=0.5)
    assert "damped_hessian" in curvatures()


def test_register_curvature_refuses_bad_classes(example):
    with pytest.raises(TypeError, match="cls"):
        register_curvature(int)

    class Clash(CurvatureOperator):
        name = "hessian"

    with pytest.raises(ValueError, match="already"):
        register_curvature(Clash)

    class Nameless(CurvatureOperator):
        pass

    with pytest.raises(ValueError, match="name"):
        register_curvature(Nameless)


def test_the_docs_show_the_example_file():
    """docs/operators.md's "A new curvature" code is the example's class, character for character."""
    docs = (ROOT / "docs" / "operators.md").read_text()
    section = docs[docs.index("## A new curvature") :]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    code = EXAMPLE.read_text()
    cls = code[code.index("@register_curvature") : code.index("def main()")].rstrip()
    assert cls in block


def test_the_example_runs_as_a_script(example, capsys):
    example["main"]()
    lines = capsys.readouterr().out.splitlines()
    damped = lines[0].split(":", 1)[1].strip()
    plain = lines[1].split(":", 1)[1].strip()
    assert damped == plain  # the damped top-2 are H's top-2 + λ, to the printed 6 digits
