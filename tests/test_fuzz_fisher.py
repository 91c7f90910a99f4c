"""Fuzzing the Fisher and the empirical Fisher where targets are ignored or outputs are
log-probabilities, against dense float64 oracles built here.

Each example draws a small model, a split into batches, which targets are ``ignore_index``
(rows, tokens, whole sequences, whole batches) and the form of the loss. The contract:

- the matrix equals the oracle to 1e-9 (relative to its norm), or
- the call raises a ``ValueError`` (``NonFiniteLossError`` is one) whose message names the
  argument to change (``likelihood``, ``batch_size``) or the loss, where the data leave the
  quantity undefined (a batch whose targets are all ignored);
- either way the model is bit-identical afterwards.

Profiles as in ``tests/test_fuzz.py``: a fixed set of examples by default, many random ones
with ``HYPOTHESIS_PROFILE=deep``.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import _output_function, assert_untouched, dense_jacobian_oracle, snapshot
from flatness import EmpiricalFisherOperator, FisherOperator, NonFiniteLossError, hessian_topk

F = nn.functional
D = torch.float64
DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"
FUZZ = settings(
    max_examples=100 if DEEP else 10,
    derandomize=not DEEP,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def sizes_of(draw, n):
    """A split of n rows into batches (1 to 3 of them)."""
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=2, unique=True))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [b - a for a, b in itertools.pairwise(bounds)]


def batches_of(x, y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    return out


def close(a, b):
    scale = max(float(b.norm()), 1e-300)
    assert float((a - b).norm()) <= 1e-9 * scale + 1e-13, float((a - b).norm()) / scale


# ---------------------------------------------------------------------------- log-probabilities
@FUZZ
@given(st.data())
def test_fuzz_fisher_of_log_probability_models(data):
    draw = data.draw
    seed = draw(st.integers(0, 10_000))
    classes = draw(st.integers(2, 4))
    n = draw(st.integers(2, 7))
    torch.manual_seed(seed)
    logits = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, classes)).to(D)
    shift = draw(st.sampled_from([0.0, 0.0, 2.5]))  # 2.5: outputs that are not log-probabilities
    model = nn.Sequential(logits, nn.LogSoftmax(dim=1)) if shift == 0 else logits
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    y = torch.randint(0, classes, (n,), generator=g)
    ignored = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    y = torch.where(torch.tensor(ignored), torch.full_like(y, -100), y)
    sizes = sizes_of(draw, n)
    data_ = batches_of(x, y, sizes)
    loss_fn = draw(st.sampled_from(["F.nll_loss", "nn.NLLLoss", "lambda"]))
    fn = {"F.nll_loss": F.nll_loss, "nn.NLLLoss": nn.NLLLoss(), "lambda": lambda z, t: F.nll_loss(z, t)}[
        loss_fn
    ]
    extra = {"likelihood": "categorical"} if loss_fn == "lambda" else {}
    mc = draw(st.sampled_from([None, None, 2]))
    before = snapshot(model)
    try:
        op = FisherOperator(model, fn, data_, mc_samples=mc, **extra)
        got = op.dense()
    except ValueError as e:
        msg = str(e)
        empty_batch = any(bool((yb == -100).all()) for _, yb in data_)
        if isinstance(e, NonFiniteLossError):
            assert empty_batch and "the loss is nan" in msg, msg  # 0/0: a batch with no target
        else:
            assert shift != 0 and msg.startswith("likelihood:") and "not log-probabilities" in msg, msg
        assert_untouched(model, before)
        return
    assert shift == 0, "NLL of outputs that are not log-probabilities was accepted"
    assert not any(bool((yb == -100).all()) for _, yb in data_)
    z, J = dense_jacobian_oracle(logits, x)
    p = torch.softmax(z, dim=1)
    Jr = J.reshape(n, classes, -1)
    oracle = torch.zeros(J.shape[1], J.shape[1], dtype=D)
    start = 0
    for s in sizes:  # batch weight s/n; within it the rows with a target share 1/n_valid
        rows = [i for i in range(start, start + s) if y[i] != -100]
        for i in rows:
            B = torch.diag(p[i]) - torch.outer(p[i], p[i])
            oracle += (s / n) * Jr[i].T @ B @ Jr[i] / len(rows)
        start += s
    if mc is None:
        close(got, oracle)
    else:  # a fixed symmetric PSD matrix, equal to F in expectation
        torch.testing.assert_close(got, got.T, rtol=0, atol=1e-12)
        assert float(torch.linalg.eigvalsh(got).min()) > -1e-10
    assert_untouched(model, before)


# ---------------------------------------------------------------------------- ignore_index patterns
class Tagger(nn.Module):
    """(N, T, 2) -> (N, C, T) logits with a causal running mean (tokens of a sequence interact)."""

    def __init__(self, classes):
        super().__init__()
        self.inp = nn.Linear(2, 3)
        self.out = nn.Linear(3, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.out(h).transpose(1, 2)


def sequence_gradients(model, x, y, loss_fn):
    """∇θ of each sequence's loss run alone (an independent oracle), one row per sequence."""
    out = []
    for i in range(x.shape[0]):
        f, theta0 = _output_function(model, x[i : i + 1])
        out.append(
            torch.autograd.functional.jacobian(lambda t, f=f, i=i: loss_fn(f(t), y[i : i + 1]), theta0)
        )
    return torch.stack(out)


@FUZZ
@given(st.data())
def test_fuzz_empirical_fisher_with_ignored_targets(data):
    draw = data.draw
    seed = draw(st.integers(0, 10_000))
    n = draw(st.integers(2, 6))
    T = draw(st.integers(1, 4))
    classes = draw(st.integers(2, 3))
    torch.manual_seed(seed)
    model = Tagger(classes).to(D)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, 2, generator=g, dtype=D)
    y = torch.randint(0, classes, (n, T), generator=g)
    pattern = draw(st.sampled_from(["tokens", "sequences", "right_padding", "none"]))
    if pattern == "tokens":
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n * T, max_size=n * T))).reshape(n, T)
    elif pattern == "sequences":
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))[:, None].expand(n, T)
    elif pattern == "right_padding":
        lengths = torch.tensor(draw(st.lists(st.integers(0, T), min_size=n, max_size=n)))
        mask = torch.arange(T)[None, :] >= lengths[:, None]
    else:
        mask = torch.zeros(n, T, dtype=torch.bool)
    y = torch.where(mask, torch.full_like(y, -100), y)
    sizes = sizes_of(draw, n)
    data_ = batches_of(x, y, sizes)
    token_weighted = draw(st.booleans())
    options = {"batch_size": lambda b: int((b[1] != -100).sum())} if token_weighted else {}
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    before = snapshot(model)
    try:
        got = EmpiricalFisherOperator(model, loss_fn, data_, **options).dense()
    except ValueError as e:
        msg = str(e)
        assert any(bool((yb == -100).all()) for _, yb in data_), msg  # only for a batch with no target
        if token_weighted:
            assert msg.startswith("batch_size:"), msg
        else:
            assert isinstance(e, NonFiniteLossError) and "the loss is nan" in msg, msg
        assert_untouched(model, before)
        return
    counts = (y != -100).sum(1).to(D)
    gr = sequence_gradients(model, x, y, loss_fn)
    gr = torch.where(counts[:, None] > 0, gr, 0.0)  # a sequence without a target has no loss
    oracle = torch.zeros(gr.shape[1], gr.shape[1], dtype=D)
    start = 0
    for s in sizes:
        c = counts[start : start + s]
        w = c if token_weighted else (c > 0).to(D)  # s_i
        batch_weight = (c.sum() / counts.sum()) if token_weighted else s / n
        for i in range(s):
            if w[i] > 0:
                oracle += batch_weight * (w[i] / w.sum()) * torch.outer(gr[start + i], gr[start + i])
        start += s
    close(got, oracle)
    if got.shape[0] and float(oracle.norm()) > 1e-8:
        top = hessian_topk(model, loss_fn, data_, k=1, curvature="empirical_fisher", tol=1e-10, **options)
        assert top.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(oracle)[-1]), rel=1e-6)
    assert_untouched(model, before)
