"""Fuzzing the objective's error paths with hypothesis: the user's errors, reductions, seeds.

- An error raised by the user's own model or loss function — of any type, with any message,
  on any call (the first, a later one, every one) — propagates unchanged (the same exception
  object) under every ``hvp_mode`` and every curvature: only torch's own "forward AD is not
  implemented here" makes a forward-mode product fall back, and only torch's own "no second
  derivative" is explained. The model and the RNG states are untouched afterwards.
- A loss module (or ``functools.partial``) whose ``reduction`` contradicts ``reduction=`` raises a
  ValueError whose message starts with ``loss_fn:`` and names both; where they agree, the loss
  is exactly the size-weighted mean (or the sum) over all samples.
- A seed outside [0, 2**63 − 1] raises a ValueError starting with the argument's name; seeds
  inside (up to the boundary, NumPy integers too) are accepted.

Messages are checked to *start* with the argument's name (``"seed: got ..."``): a message that
merely contains the name somewhere would prove nothing.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import flatness
from conftest import assert_untouched, snapshot
from flatness import Objective

F = nn.functional
D = torch.float64
DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"
FUZZ = settings(
    max_examples=150 if DEEP else 20,
    derandomize=not DEEP,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Fragments of the words torch uses for forward-mode, double-backward and memory errors, which
# the user's own messages may well contain too (but not torch's exact sentences).
WORDS = [
    "forward",
    "forward AD",
    "forward-mode",
    "jvp",
    "not implemented",
    "is not implemented",
    "derivative for",
    "once_differentiable",
    "use_reentrant=True",
    "checkpoint",
    "saved tensor hooks",
    "ZeroTensors",
    "out of memory",
    "CUDA",
    "shape mismatch",
    "",
]


class UserError(RuntimeError):
    """An exception class of the user's own."""


ERROR_TYPES = [
    RuntimeError,
    NotImplementedError,
    ValueError,
    TypeError,
    IndexError,
    UserError,
    torch.OutOfMemoryError,
]


class Faulty(nn.Module):
    """A small tanh network whose forward raises ``error`` on the calls in ``fail_on``."""

    def __init__(self, error: BaseException, fail_on: frozenset[int] | None):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 5).to(D)
        self.l2 = nn.Linear(5, 3).to(D)
        self.error = error
        self.fail_on = fail_on  # None: every call
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fail_on is None or self.calls in self.fail_on:
            raise self.error
        return self.l2(torch.tanh(self.l1(x)))


def _data(n: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


MODES = [
    {"hvp_mode": "auto"},
    {"hvp_mode": "forward"},
    {"hvp_mode": "reverse"},
    {"hvp_mode": "finite_difference"},
    {"curvature": "ggn"},
    {"curvature": "fisher", "likelihood": "categorical"},
    {"curvature": "empirical_fisher"},
]


def _rng_states():
    return (torch.random.get_rng_state(), np.random.get_state()[1].copy())


FAIL_ON = st.one_of(
    st.sampled_from([None, frozenset({1}), frozenset({2})]),
    st.frozensets(st.integers(1, 4), min_size=1, max_size=2),
)


@FUZZ
@given(
    kind=st.sampled_from(ERROR_TYPES),
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
    fail_on=FAIL_ON,
    in_loss=st.booleans(),
    options=st.sampled_from(MODES),
    call=st.sampled_from(["hessian_topk", "hessian_trace", "hvp"]),
)
# The cases the audit found swallowed: an error on the first call only, under forward mode (a
# warning blamed forward AD and the pass was re-run) and under GGN / Fisher ("forward" in it).
@example(RuntimeError, ["forward"], frozenset({1}), False, MODES[1], "hessian_topk")
@example(torch.OutOfMemoryError, ["out of memory"], frozenset({1}), False, MODES[1], "hvp")
@example(RuntimeError, ["forward", "shape mismatch"], frozenset({1}), False, MODES[4], "hessian_topk")
@example(NotImplementedError, ["not implemented"], frozenset({1}), True, MODES[5], "hessian_trace")
def test_user_errors_propagate_unchanged(kind, words, fail_on, in_loss, options, call):
    error = kind(" ".join(words) or "boom")
    model = Faulty(error, None if in_loss else fail_on)
    loss_calls = [0]

    def loss_fn(out, target):
        loss_calls[0] += 1
        if in_loss and (fail_on is None or loss_calls[0] in fail_on):
            raise error
        return F.cross_entropy(out, target)

    data = _data()
    before, rng = snapshot(model), _rng_states()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback's warning is not the point here
        try:
            if call == "hessian_topk":
                flatness.hessian_topk(model, loss_fn, data, k=1, max_hvp=30, **options)
            elif call == "hessian_trace":
                flatness.hessian_trace(model, loss_fn, data, n_hvp=6, **options)
            else:
                opts = {"hvp_mode": options.get("hvp_mode", "auto")}
                obj = Objective(model, loss_fn, data, **opts)
                obj.hvp(torch.ones(obj.n, dtype=D))
        except BaseException as raised:  # the point is which one
            assert raised is error, f"{type(raised).__name__}: {raised}"
        else:
            # Only possible where the failing calls were never made (e.g. fail_on={4} and
            # fewer calls), and then the model ran cleanly throughout.
            assert fail_on is not None and (model.calls if not in_loss else loss_calls[0]) < max(fail_on)
    assert_untouched(model, before)
    after = _rng_states()
    assert torch.equal(rng[0], after[0]) and np.array_equal(rng[1], after[1])


LOSSES = {
    "CrossEntropyLoss": lambda r: nn.CrossEntropyLoss(reduction=r),
    "MSELoss": lambda r: nn.MSELoss(reduction=r),
    "partial(cross_entropy)": lambda r: functools.partial(F.cross_entropy, reduction=r),
    # a plain function: its reduction cannot be inspected (the user's word is taken)
    "lambda": lambda r: lambda out, target: F.cross_entropy(out, target, reduction=r),
}


@FUZZ
@given(
    loss=st.sampled_from(sorted(LOSSES)),
    declared=st.sampled_from(["mean", "sum", "none"]),
    reduction=st.sampled_from(["mean", "sum"]),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
)
def test_reduction_mismatch_is_named_and_agreement_is_exact(loss, declared, reduction, sizes):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D)
    n = sum(sizes)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (n,), generator=g)
    if loss == "MSELoss":
        y = torch.randn(n, 3, generator=g, dtype=D)
    bounds = np.cumsum([0, *sizes])
    data = [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]
    loss_fn = LOSSES[loss](declared)
    inspectable = loss != "lambda"
    mismatch = inspectable and (declared == "none" or declared != reduction)
    if mismatch:
        with pytest.raises(ValueError, match=r"^loss_fn: .*reduction='(mean|sum|none)'") as info:
            Objective(model, loss_fn, data, reduction=reduction)
        assert f"reduction={reduction!r}" in str(info.value)
        return
    if declared == "none":  # not inspectable: caught later, when the batch loss is not one number
        if max(sizes) > 1:
            with pytest.raises(ValueError, match=r"^loss_fn: the loss of a batch is a tensor"):
                Objective(model, loss_fn, data, reduction=reduction).loss()
        return
    value = float(Objective(model, loss_fn, data, reduction=reduction).loss())
    with torch.no_grad():
        per = LOSSES[loss]("sum")(model(x), y)
    if declared == reduction == "mean":  # the mean over all samples (and outputs, for MSE)
        assert value == pytest.approx(float(per) / (n * (3 if loss == "MSELoss" else 1)), rel=1e-12)
    elif declared == reduction == "sum":
        assert value == pytest.approx(float(per), rel=1e-12)


BAD_SEEDS = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63, max_value=2**200),
    st.sampled_from([np.uint64(2**63), np.uint64(2**64 - 1), 2**64]),
)
GOOD_SEEDS = st.one_of(
    st.integers(0, 2**63 - 1),
    st.sampled_from([0, 2**63 - 1, np.int64(2**63 - 1), np.uint64(2**63 - 1), np.int32(7)]),
)


def _seed_call(name: str, seed):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D)
    data = _data()
    if name == "hessian_trace":
        return flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=4, seed=seed)
    if name == "hessian_topk":
        return flatness.hessian_topk(model, F.cross_entropy, data, k=1, seed=seed)
    if name == "landscape_1d":
        return flatness.landscape_1d(model, F.cross_entropy, data, alphas=[0.0, 0.5], seed=seed)
    if name == "average_sharpness":
        return flatness.average_sharpness(model, F.cross_entropy, data, rho=0.01, n_samples=2, seed=seed)
    if name == "random_direction":
        return flatness.landscape.random_direction(model, seed=seed)
    if name == "data_seed":
        return Objective(model, F.cross_entropy, data, data_seed=seed).loss()
    raise AssertionError(name)


SEED_CALLS = [
    "hessian_trace",
    "hessian_topk",
    "landscape_1d",
    "average_sharpness",
    "random_direction",
    "data_seed",
]


@FUZZ
@given(seed=BAD_SEEDS, name=st.sampled_from(SEED_CALLS))
def test_seeds_out_of_range_are_named(seed, name):
    arg = "data_seed" if name == "data_seed" else "seed"
    with pytest.raises(ValueError, match=rf"^{arg}: got -?\d+; expected an int in \[0, 2\*\*63 - 1\]"):
        _seed_call(name, seed)


@FUZZ
@given(seed=GOOD_SEEDS, name=st.sampled_from(SEED_CALLS))
def test_seeds_in_range_are_accepted(seed, name):
    _seed_call(name, seed)
