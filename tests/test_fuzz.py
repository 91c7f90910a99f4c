"""Fuzzing every public function of flatness with hypothesis.

Each example draws a model (plain, float32, tied weights, a reused module, partly frozen, all
frozen, no parameters at all), data (one batch, a list, a DataLoader, dict / namedtuple / nested
batches, and odd data: empty, zero-size batches, NaN or inf at a random place, mixed dtypes,
tensors without a batch dimension, bad batch-size callables) and option values of right and
wrong types. The contract:

- when no argument is wrong, the call returns a result whose numbers are finite (NaN only
  where documented: landscape points, with a warning, and one-sample standard errors);
- when some argument is wrong, the call raises TypeError or ValueError (NonFiniteLossError is
  one) and the message names one of the wrong arguments ("data" for the data; "batch_size" for
  batches whose size cannot be found);
- either way the model's parameters, buffers, requires_grad flags, .grad fields and modes, and
  the global torch / NumPy / Python random states, are bit-identical afterwards.

Errors raised by the user's own model or loss function (a shape mismatch inside ``forward``)
are the user's and propagate unchanged; the fuzzer builds data that fits the models.

Profiles: the default runs a fixed (derandomized) set of examples in well under a minute;
``HYPOTHESIS_PROFILE=deep`` draws many more, at random, for occasional runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flatness
from conftest import SharedLinear, TiedModel, assert_untouched, snapshot
from flatness.landscape import accuracy

F = nn.functional
D = torch.float64
DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"
FUZZ = settings(
    max_examples=150 if DEEP else 15,
    derandomize=not DEEP,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
OK_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError)


# ---------------------------------------------------------------------------- models
def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


class _Buffers(nn.Module):
    """A model with a buffer and no parameters at all."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(5, dtype=D))

    def forward(self, x):
        return (x * self.scale)[:, :3]


@dataclass
class Problem:
    """A model, its loss, samples (x, y) that fit it, and what is wrong with it (if anything)."""

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    classes: bool
    must: set[str] = field(default_factory=set)  # wrong for sure
    may: set[str] = field(default_factory=set)  # wrong unless another option fixes it


def make_problem(kind: str, seed: int) -> Problem:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x5 = torch.randn(9, 5, generator=g, dtype=D)
    y3 = torch.randint(0, 3, (9,), generator=g)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        return Problem(kind, m, F.cross_entropy, x5, y3, True)
    if kind == "mlp32":
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        return Problem(kind, m, F.cross_entropy, x5.float(), y3, True)
    if kind == "tied":
        x4 = x5[:, :4].contiguous()
        return Problem(kind, TiedModel().double(), _mse, x4, x4.clone(), False)
    if kind == "shared":
        return Problem(kind, SharedLinear().double(), F.cross_entropy, x5[:, :4].contiguous(), y3 % 2, True)
    if kind == "frozen":
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        m[0].requires_grad_(False)
        return Problem(kind, m, F.cross_entropy, x5, y3, True)
    if kind == "all_frozen":
        m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().requires_grad_(False)
        return Problem(kind, m, F.cross_entropy, x5, y3, True, may={"params"})
    if kind == "no_params":
        return Problem(kind, _Buffers(), F.cross_entropy, x5, y3, True, must={"model"})
    raise AssertionError(kind)


MODEL_KINDS = ["mlp", "mlp32", "tied", "shared", "frozen", "all_frozen", "no_params"]
Pair = namedtuple("Pair", ["inputs", "targets"])


# ---------------------------------------------------------------------------- data
@dataclass
class Data:
    value: Any
    batch_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None
    must: set[str] = field(default_factory=set)
    may: set[str] = field(default_factory=set)
    nan: bool = False  # a non-finite number somewhere in the inputs
    mixed: bool = False  # floating data of another dtype than the model's
    ambiguous: bool = False  # tensors of different leading sizes: a warning names them
    received: dict[str, Any] = field(default_factory=dict)  # the wrong options' values


def _splits(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    return out


@st.composite
def data_for(draw: st.DrawFn, p: Problem) -> Data:
    x, y = p.x.clone(), p.y.clone()
    kind = draw(
        st.sampled_from(
            [
                "tuple",
                "list",
                "loader",
                "dict",
                "namedtuple",
                "nested",
                "empty",
                "zero_size",
                "nonfinite",
                "mixed_dtype",
                "ambiguous",
                "no_tensor",
            ]
        )
    )
    sizes = [4, 3, 2]
    if kind == "tuple":
        return Data((x, y))
    if kind == "list":
        return Data(_splits(x, y, sizes))
    if kind == "loader":
        return Data(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=draw(st.booleans())))
    loss_fn = p.loss_fn
    if kind == "dict":
        batches = [{"x": a, "y": b} for a, b in _splits(x, y, sizes)]
        return Data(batches, batch_loss=lambda m, b: loss_fn(m(b["x"]), b["y"]))
    if kind == "namedtuple":
        batches = [Pair(a, b) for a, b in _splits(x, y, sizes)]
        return Data(batches, batch_loss=lambda m, b: loss_fn(m(b.inputs), b.targets))
    if kind == "nested":
        batches = [((a, {"unused": a[:, :1]}), (b,)) for a, b in _splits(x, y, sizes)]
        return Data(batches, batch_loss=lambda m, b: loss_fn(m(b[0][0]), b[1][0]))
    if kind == "empty":
        return Data([], must={"data"})
    if kind == "zero_size":
        batches = _splits(x, y, sizes)
        where = draw(st.integers(0, 3))
        batches.insert(where, (x[:0], y[:0]))
        # Later than the first batch, max_batches may stop before it: then the call succeeds.
        return Data(batches, must={"data"} if where == 0 else set(), may={"data"})
    if kind == "nonfinite":
        i, j = draw(st.integers(0, x.shape[0] - 1)), draw(st.integers(0, x.shape[1] - 1))
        x[i, j] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if not p.classes:
            y = x.clone()
        # max_batches may skip the bad sample: then the call must succeed.
        return Data(_splits(x, y, sizes), may={"data"}, nan=True)
    if kind == "mixed_dtype":
        other = torch.float32 if x.dtype == D else D
        # dtype= casts the data: then the call must succeed.
        return Data(
            _splits(x.to(other), y.to(other) if not p.classes else y, sizes), may={"data"}, mixed=True
        )
    if kind == "ambiguous":
        # A per-batch tensor of another length first: the size rule weights by it, with a
        # warning naming the tensors (batch_size= chooses); the call itself succeeds.
        batches = [{"mask": torch.ones(7, dtype=x.dtype), "x": a, "y": b} for a, b in _splits(x, y, sizes)]
        return Data(batches, batch_loss=lambda m, b: loss_fn(m(b["x"]), b["y"]), ambiguous=True)
    if kind == "no_tensor":
        return Data([("text", a.tolist(), b.tolist()) for a, b in _splits(x, y, sizes)], must={"data"})
    raise AssertionError(kind)


# ---------------------------------------------------------------------------- options
class Opt:
    """Valid and wrong values of one option (wrong ones must be named in the error)."""

    def __init__(self, good: list[Any], bad: list[Any]) -> None:
        self.good, self.bad = good, bad


NAN, INF = math.nan, math.inf
POSITIVE_FLOAT_BAD = [0.0, -1e-3, NAN, INF, "0.1", None, True, [0.1]]
POSITIVE_INT_BAD = [0, -1, 2.5, "3", True, None]
SEED = Opt([0, 7, np.int64(3)], [1.5, "0", None, [0]])


def objective_options(p: Problem) -> dict[str, Opt]:
    first = next(n for n, _ in p.model.named_parameters()) if list(p.model.parameters()) else "x"
    return {
        "params": Opt([None, [first], lambda n, t: n == first], [[], ["nope"], 5, {3}]),
        "reduction": Opt(["mean", "sum"], ["avg", None, 1, np.array(["mean"])]),
        "train": Opt([False, True], []),
        "max_batches": Opt([None, 1, 2], [0, -1, 1.5, True]),
        "batch_size": Opt([None], [5, lambda b: 0, lambda b: -2, lambda b: 2.5, lambda b: "3"]),
        "dtype": Opt([None, D], [torch.int64, "float64", float, torch.bool]),
        "hvp_mode": Opt(["auto", "forward", "reverse"], ["fwd", 1, None]),
        "data_seed": Opt([0, 3], [1.5, "0", None]),
        "epsilom": Opt([], [1e-3]),  # a typo: named in the TypeError
    }


@st.composite
def options(
    draw: st.DrawFn, table: dict[str, Opt], *, p_bad: float = 0.15
) -> tuple[dict[str, Any], set[str]]:
    """Some options of ``table``: omitted, right or wrong; and the names of the wrong ones."""
    chosen: dict[str, Any] = {}
    bad: set[str] = set()
    for name, opt in table.items():
        r = draw(st.floats(0, 1))
        if opt.bad and r < p_bad:
            chosen[name] = draw(st.sampled_from(opt.bad))
            bad.add(name)
        elif opt.good and r < 0.6:
            chosen[name] = draw(st.sampled_from(opt.good))
    return chosen, bad


# ---------------------------------------------------------------------------- the contract
def _finite(x: Any, nan_ok: frozenset[str] = frozenset()) -> bool:
    if isinstance(x, flatness.results.Result):
        import dataclasses

        return all(_finite(getattr(x, f.name), nan_ok) for f in dataclasses.fields(x) if f.name not in nan_ok)
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all()) if x.is_floating_point() else True
    if isinstance(x, np.ndarray):
        return bool(np.isfinite(x).all()) if np.issubdtype(x.dtype, np.floating) else True
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v, nan_ok) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v, nan_ok) for v in x)
    return True


def check_result(res: Any, *, nan_ok: frozenset[str] = frozenset()) -> None:
    """Every number of a result is finite, except the named fields (documented NaN cases)."""
    assert _finite(res, nan_ok), res


def names_argument(message: str, name: str) -> bool:
    """Whether ``message`` cites the argument ``name`` as a word of its own.

    A substring proves nothing: "k" is in "keskar" and "v" in "values". The name must stand
    alone: not inside a longer identifier ("max_batches" does not name "batches"), a hyphenated
    word ("top-k" does not name "k") or a dotted path ("torch.float64" does not name
    "float64"); "k=0", "k: got 0", "`k`" and "'k'" do.
    """
    return re.search(rf"(?<![\w.\-]){re.escape(name)}(?![\w\-])", message) is not None


def _renderings(value: Any) -> list[str] | None:
    """How a message may show a wrong value; None where no one spelling is expected."""
    if value is None or isinstance(value, (bool, str)):
        return [repr(value)]
    if isinstance(value, (int, np.integer)):
        return [str(int(value))]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return [repr(v), str(v), f"{v:g}", f"{v:.6g}"]
    if isinstance(value, torch.dtype):
        return [str(value)]
    return None  # tensors, lists, sets, callables: a shape or a type name is enough


def shows_value(message: str, value: Any) -> bool:
    """Whether ``message`` shows the received ``value``: its repr, a number's usual forms, or
    its type's name (a TypeError's "got str")."""
    forms = _renderings(value)
    kind = re.escape(type(value).__name__)
    return (
        forms is None
        or any(f in message for f in forms)
        or re.search(rf"\bgot (an? )?{kind}\b|\({kind}\)|\btype {kind}\b", message) is not None
    )


@contextlib.contextmanager
def contract(
    model: nn.Module | None,
    must: set[str],
    may: set[str],
    *,
    errors: tuple = OK_ERRORS,
    received: dict[str, Any] | None = None,
):
    """Run the block under the contract; yields a dict whose "result" the block fills in.

    An error must name one of the wrong arguments as a word (:func:`names_argument`); where it
    names a wrong option whose value is in ``received``, it must also show that value.
    """
    before = snapshot(model) if model is not None else None
    out: dict[str, Any] = {"result": None, "raised": None, "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield out
        except errors as e:
            out["raised"] = e
        out["warnings"] = [str(w.message) for w in caught]
    e = out["raised"]
    if e is not None:
        names = must | may
        assert names, f"raised although every argument is right: {type(e).__name__}: {e}"
        message = str(e)
        assert any(names_argument(message, n) for n in names), (
            f"{type(e).__name__} names none of {sorted(names)} as a word: {message}"
        )
        cited = [n for n in (received or {}) if names_argument(message, n)]
        assert not cited or any(shows_value(message, received[n]) for n in cited), (  # type: ignore[index]
            f"{type(e).__name__} names {cited} but not the value received "
            f"({', '.join(f'{n}={received[n]!r}' for n in cited)}): {message}"  # type: ignore[index]
        )
    else:
        assert not must, f"no error although {sorted(must)} is wrong"
    if model is not None:
        assert_untouched(model, before)


def prepare_model(p: Problem, draw: st.DrawFn) -> None:
    """Random modes and .grad fields, which every call must leave as they are."""
    p.model.train(draw(st.booleans()))
    for i, t in enumerate(p.model.parameters()):
        if draw(st.booleans()):
            t.grad = torch.full_like(t, float(i + 1))


def data_names(d: Data, opts: dict[str, Any], bad: set[str]) -> tuple[set[str], set[str]]:
    """The names an error may or must cite, given the data and the options."""
    must, may = set(d.must), set(d.may)
    if "batch_size" in bad or d.must:
        may |= {"batch_size", "data"}
    if d.mixed and opts.get("dtype") is None:
        may |= {"data"}
    return must, may


def problem_and_data(draw: st.DrawFn, kinds: list[str] | None = None) -> tuple[Problem, Data, dict, set, set]:
    p = make_problem(draw(st.sampled_from(kinds or MODEL_KINDS)), draw(st.integers(0, 3)))
    d = draw(data_for(p))
    opts, bad = draw(options(objective_options(p)))
    prepare_model(p, draw)
    must, may = data_names(d, opts, bad)
    # An unknown keyword (the typo) is refused first, by name: no value to show then.
    d.received = {} if "epsilom" in bad else {n: opts[n] for n in bad}
    must |= p.must | bad
    may |= p.may
    if d.batch_loss is not None:
        opts["batch_loss"] = d.batch_loss
    if p.name == "all_frozen" and opts.get("params") is None:
        must |= {"params"}
    return p, d, opts, must, may


def check_warnings(d: Data, out: dict[str, Any]) -> None:
    """After a successful call on ambiguous batches, a warning named the tensors' sizes."""
    if d.ambiguous and out["raised"] is None:
        assert any("different leading sizes" in w for w in out["warnings"]), out["warnings"]


def loss_fn_for(p: Problem, d: Data) -> Any:
    return None if d.batch_loss is not None else p.loss_fn


# ---------------------------------------------------------------------------- model-level functions
SHARPNESS = {
    "epsilon": Opt([1e-3, 0.05], POSITIVE_FLOAT_BAD),
    "subspace": Opt([None, 1, 2], [0, -1, 10**6, "random", 2.5, torch.ones(3, 2)]),
    "max_iter": Opt([1, 3], POSITIVE_INT_BAD),
    "max_evals": Opt([None, 1, 6], [0, -2, 1.5]),
    "tol": Opt([0.0, 1e-8], [-1.0, NAN, "x"]),
    "start": Opt(["auto", "keskar"], ["lanczos", 1, None]),
    "seed": SEED,
}
ADAPTIVE = {
    "rho": Opt([0.05], [0.0, -1.0, NAN, "x", None]),
    "p": Opt([2, "inf", math.inf], [1, 3, "two", None]),
    "adaptive": Opt([True, False], ["yes", 1]),
    "eta": Opt([0.0, 0.1], [-1.0, NAN, "x"]),
    "max_iter": Opt([1, 4], POSITIVE_INT_BAD),
    "start": Opt(["auto", "keskar"], ["x"]),
    "seed": SEED,
}
AVERAGE = {
    "rho": Opt([0.05], [0.0, -1.0, NAN, "x", None]),
    "n_samples": Opt([1, 3], [0, -1, 2.5, "3"]),
    "adaptive": Opt([True, False], ["yes"]),
    "eta": Opt([0.0, 0.1], [-1.0, NAN]),
    "seed": SEED,
}
CURVATURE = {
    "curvature": Opt(["hessian", "ggn", "fisher", "empirical_fisher"], ["laplace", 1, None]),
    "blocks": Opt([None, "module", "parameter"], ["rows", 5]),
}
TOPK = {
    "k": Opt([1, 2], [0, -1, 10**6, 1.5]),
    "which": Opt(["largest", "smallest", "magnitude"], ["top", 1, None]),
    "tol": Opt([1e-3, 0.5], [0.0, -1.0, NAN, "x"]),
    "max_hvp": Opt([None, 30], [0, -5, 2.5]),
    "seed": SEED,
}
TRACE = {
    "method": Opt(["hutch++", "hutchinson"], ["exact", None]),
    "n_hvp": Opt([4, 9], [0, -3, 1, 2.5]),
    "seed": SEED,
}
DENSITY = {
    "n_runs": Opt([1, 2], [0, -1, 1.5]),
    "n_steps": Opt([3, 6], [0, -2, 1.5]),
    "sigma": Opt([None, 0.1], [0.0, -1.0, NAN]),
    "grid": Opt([50, torch.linspace(-1, 1, 20)], [0, 1, -5, "x"]),
    "seed": SEED,
}
GRID_COMMON = {
    "normalization": Opt(["filter", "layer", None], ["unit", 1]),
    "ignore_1d": Opt([True, False], []),
    "seed": SEED,
    "metrics": Opt([None], ["acc", {"a": 1}]),
    "vectorize": Opt(["auto", False], ["yes", 2]),
    "chunk_size": Opt([None, 2], [0, -1, 1.5]),
    "points_per_pass": Opt([None, 1, 3], [0, -2, 1.5]),
}
ALPHAS_BAD = [[], [NAN], "abc", [[1.0, 2.0]], None]


def _call_model_level(fn_name: str, p: Problem, d: Data, opts: dict, fn_opts: dict) -> Any:
    fn = getattr(flatness, fn_name)
    return fn(p.model, loss_fn_for(p, d), d.value, **fn_opts, **opts)


NAN_OK = {
    "average_sharpness": frozenset({"std_error"}),
    "hessian_trace": frozenset({"std_error"}),
    # nodes: NaN-padded where a run stopped early (a block with fewer parameters than n_steps)
    "hessian_density": frozenset({"nodes"}),
}


def _run_model_level(draw: st.DrawFn, fn_name: str, table: dict[str, Opt], required: dict[str, Any]) -> None:
    p, d, opts, must, may = problem_and_data(draw)
    if fn_name.startswith("hessian_"):
        table = {**table, **CURVATURE}
    fn_opts, fn_bad = draw(options(table))
    curvature = fn_opts.get("curvature", "hessian")
    if curvature in ("ggn", "fisher", "empirical_fisher") and "curvature" not in fn_bad:
        # They need the model's outputs apart from the loss (not an opaque batch_loss), and the
        # Fisher a likelihood it can infer from the loss function (cross-entropy or MSE).
        may |= {"batch_loss", "likelihood", "loss_fn", "curvature"}
    if fn_opts.get("blocks") is not None and "blocks" not in fn_bad:
        may |= {"k", "blocks"}  # a block may hold fewer parameters than k + 1
    for name, value in required.items():
        fn_opts.setdefault(name, value)
    must |= fn_bad
    if fn_name == "hessian_trace" and fn_opts.get("method") == "hutch++" and fn_opts.get("n_hvp") == 3:
        must.add("n_hvp")
    if "k" in fn_opts and "k" not in fn_bad:
        may.add("k")  # k must stay below n: small models with few trainable parameters
    if "subspace" in fn_opts and "subspace" not in fn_bad:
        may.add("subspace")
    if d.nan:
        may |= {"data"}
    received = {} if "epsilom" in opts else {**d.received, **{n: fn_opts[n] for n in fn_bad}}
    with contract(p.model, must, may, received=received) as out:
        out["result"] = _call_model_level(fn_name, p, d, opts, fn_opts)
    check_warnings(d, out)
    if out["raised"] is None:
        check_result(out["result"], nan_ok=NAN_OK.get(fn_name, frozenset()))
        res = out["result"]
        if fn_name in ("sharpness", "adaptive_sharpness"):
            assert res.value >= 0 and res.max_loss >= res.loss
        if fn_name == "average_sharpness" and res.n_samples > 1:
            assert math.isfinite(res.std_error)


@FUZZ
@given(st.data())
def test_fuzz_sharpness(data):
    _run_model_level(data.draw, "sharpness", SHARPNESS, {})


@FUZZ
@given(st.data())
def test_fuzz_adaptive_sharpness(data):
    _run_model_level(data.draw, "adaptive_sharpness", ADAPTIVE, {"rho": 0.05})


@FUZZ
@given(st.data())
def test_fuzz_average_sharpness(data):
    _run_model_level(data.draw, "average_sharpness", AVERAGE, {"rho": 0.05, "n_samples": 2})


@FUZZ
@given(st.data())
def test_fuzz_hessian_topk(data):
    _run_model_level(data.draw, "hessian_topk", TOPK, {"max_hvp": 40})


@FUZZ
@given(st.data())
def test_fuzz_hessian_trace(data):
    _run_model_level(data.draw, "hessian_trace", TRACE, {"n_hvp": 6})


@FUZZ
@given(st.data())
def test_fuzz_hessian_density(data):
    _run_model_level(data.draw, "hessian_density", DENSITY, {"n_runs": 1, "n_steps": 4})


# The composable core: the same options, the budgets under the algorithms' names.
CORE_TABLES = {
    "topk": {**{k: v for k, v in TOPK.items() if k != "max_hvp"}, "max_matvec": TOPK["max_hvp"]},
    "trace": {**{k: v for k, v in TRACE.items() if k != "n_hvp"}, "n_matvec": TRACE["n_hvp"]},
    "density": DENSITY,
}
CORE_REQUIRED = {"topk": {"max_matvec": 40}, "trace": {"n_matvec": 6}, "density": {"n_runs": 1, "n_steps": 4}}


@FUZZ
@given(st.data())
def test_fuzz_spectrum_core(data):
    """topk / trace / density / by_block on an operator built once, on the same odd models and data."""
    draw = data.draw
    p, d, opts, must, may = problem_and_data(draw)
    analysis = draw(st.sampled_from(["topk", "trace", "density"]))
    blocks = draw(st.sampled_from([None, None, "module", "parameter", "rows"]))
    curvature = draw(st.sampled_from(["hessian", "hessian", "ggn", "empirical_fisher"]))
    wrong_op = draw(st.sampled_from([False] * 5 + [True]))
    fn_opts, fn_bad = draw(options(CORE_TABLES[analysis]))
    for name, value in CORE_REQUIRED[analysis].items():
        fn_opts.setdefault(name, value)
    must |= fn_bad
    if "k" in fn_opts and "k" not in fn_bad:
        may.add("k")  # k must stay below n: small models with few trainable parameters
    if blocks is not None:
        may |= {"k", "blocks"}  # a block may hold fewer parameters than k + 1
        if blocks == "rows":
            must.add("blocks")
    if curvature == "ggn":
        may |= {"batch_loss", "likelihood", "loss_fn", "curvature", "model outputs"}
    elif curvature == "empirical_fisher":
        may |= {"batch_loss", "loss_fn", "curvature", "batch_size", "data"}
    if wrong_op:
        must.add("op")
    if d.nan:
        may |= {"data"}
    received = {} if "epsilom" in opts else {**d.received, **{n: fn_opts[n] for n in fn_bad}}
    with contract(p.model, must, may, received=received) as out:
        op = flatness.curvature_operator(p.model, loss_fn_for(p, d), d.value, curvature=curvature, **opts)
        target = torch.eye(3) if wrong_op else op
        if blocks is None:
            out["result"] = getattr(flatness, analysis)(target, **fn_opts)
        else:
            out["result"] = flatness.by_block(target, blocks, analysis, **fn_opts)
    check_warnings(d, out)
    if out["raised"] is None:
        res = out["result"]
        check_result(res, nan_ok=NAN_OK[f"hessian_{analysis}"] if analysis != "topk" else frozenset())
        for one in res.values() if blocks is not None else [res]:
            assert one.curvature == curvature


def _run_grid(draw: st.DrawFn, fn_name: str) -> None:
    p, d, opts, must, may = problem_and_data(draw)
    table = dict(GRID_COMMON)
    if fn_name == "interpolate":
        for key in ("normalization", "ignore_1d", "seed"):
            table.pop(key)
        table["interpolate_buffers"] = Opt([True, False], [])
    table["alphas"] = Opt([[-1.0, 0.0, 1.0], np.linspace(-1, 1, 4), torch.tensor([0.0, 0.5])], ALPHAS_BAD)
    if fn_name == "landscape_2d":
        table["betas"] = Opt([[0.0, 1.0], np.array([-0.5, 0.5])], ALPHAS_BAD)
    fn_opts, fn_bad = draw(options(table))
    fn_opts.setdefault("alphas", [-0.5, 0.0, 0.5])
    if fn_name == "landscape_2d":
        fn_opts.setdefault("betas", [0.0, 0.5])
    if p.classes and draw(st.booleans()) and "metrics" not in fn_bad:
        fn_opts["metrics"] = {"accuracy": accuracy}
    must |= fn_bad
    if fn_opts.get("metrics") and d.batch_loss is not None:
        must.add("metrics")  # metrics need loss_fn's outputs
    if opts.get("train") and fn_opts.get("vectorize") is True:
        must.add("vectorize")
    fn = getattr(flatness, fn_name)
    if fn_name == "interpolate":
        with torch.random.fork_rng():
            other = make_problem(p.name, 9).model if p.name != "no_params" else p.model
    received = {} if "epsilom" in opts else {**d.received, **{n: fn_opts[n] for n in fn_bad}}
    with contract(p.model, must, may, received=received) as out:
        if fn_name == "interpolate":
            before_b = snapshot(other)
            out["result"] = fn(p.model, other, loss_fn_for(p, d), d.value, **fn_opts, **opts)
            assert_untouched(other, before_b)
        else:
            out["result"] = fn(p.model, loss_fn_for(p, d), d.value, **fn_opts, **opts)
    check_warnings(d, out)
    if out["raised"] is None:
        res = out["result"]
        if d.nan and not np.isfinite(res.loss).all():
            assert any("non-finite" in w for w in out["warnings"]), out["warnings"]
            check_result(res, nan_ok=frozenset({"loss", "metrics", "center_loss"}))
        else:
            check_result(res)
            assert res.done.all() and res.n_nonfinite == 0


@FUZZ
@given(st.data())
def test_fuzz_landscape_1d(data):
    _run_grid(data.draw, "landscape_1d")


@FUZZ
@given(st.data())
def test_fuzz_landscape_2d(data):
    _run_grid(data.draw, "landscape_2d")


@FUZZ
@given(st.data())
def test_fuzz_interpolate(data):
    _run_grid(data.draw, "interpolate")


# ---------------------------------------------------------------------------- Objective, operator, monitor
@FUZZ
@given(st.data())
def test_fuzz_objective_methods(data):
    draw = data.draw
    p, d, opts, must, may = problem_and_data(draw)
    if d.nan:
        may |= {"data"}
    with contract(p.model, must, may, received=d.received) as out:
        obj = flatness.Objective(p.model, loss_fn_for(p, d), d.value, **opts)
        n = obj.n
        theta = draw(st.sampled_from(["none", "vector", "numpy", "short", "list", "nan"]))
        values = {
            "none": None,
            "vector": obj.theta0 + 0.01,
            "numpy": obj.theta0.detach().cpu().numpy(),
            "short": torch.zeros(max(n - 1, 0) or 2),
            "list": [0.0] * n,
            "nan": torch.full((n,), NAN),
        }[theta]
        if theta in ("short", "list"):
            must.add("theta")
        if theta == "nan":
            may |= {"data"}  # a non-finite θ gives a non-finite loss: reported like data's
        results = [obj.loss(values), *obj.loss_and_grad(values), obj.grad(values)]
        v = draw(st.sampled_from(["ok", "wrong"]))
        if v == "wrong":
            must.add("v")
            results.append(obj.hvp(torch.ones(n + 1)))
        else:
            results.append(obj.hvp(torch.linspace(-1, 1, n), values))
        k = draw(st.integers(1, 3))
        losses, _ = obj.evaluate_many(obj.theta0[None].repeat(k, 1) + 1e-3)
        results.append(losses)
        results.append(obj.flatten(obj.unflatten(obj.theta0)))
        out["result"] = results
    check_warnings(d, out)
    if out["raised"] is None:
        check_result(out["result"])
        # Whatever the batch structure, the loss is the size-weighted mean over the samples
        # (ambiguous batches are weighted by the tensor the rule picks, as the warning says).
        mean = opts.get("reduction", "mean") == "mean"
        if mean and opts.get("max_batches") is None and not d.nan and not d.ambiguous:
            plain = {k: v for k, v in opts.items() if k != "batch_loss"}
            ref = flatness.Objective(p.model, p.loss_fn, (p.x.to(obj.dtype), p.y), **plain).loss()
            tol = 1e-10 if obj.dtype == D else 1e-5
            assert math.isclose(float(obj.loss()), float(ref), rel_tol=tol), (float(obj.loss()), float(ref))


@FUZZ
@given(st.data())
def test_fuzz_hessian_operator(data):
    draw = data.draw
    p, d, opts, must, may = problem_and_data(draw)
    if d.nan:
        may |= {"data"}
    with contract(p.model, must, may, received=d.received) as out:
        op = flatness.HessianOperator(p.model, loss_fn_for(p, d), d.value, **opts)
        n = op.shape[0]
        arg = draw(st.sampled_from(["tensor", "numpy", "wrong", "string"]))
        if arg in ("wrong", "string"):
            must.add("v")
        v = {"tensor": torch.ones(n), "numpy": np.ones(n), "wrong": np.ones(n + 2), "string": "v"}[arg]
        out["result"] = [op @ v, op.to_scipy() @ np.ones(n)]
    if out["raised"] is None:
        check_result(out["result"])


@FUZZ
@given(st.data())
def test_fuzz_curvature_operators(data):
    """GGN, Fisher and empirical Fisher on the same odd models, data and options."""
    draw = data.draw
    p, d, opts, must, may = problem_and_data(draw)
    curvature = draw(st.sampled_from(["ggn", "fisher", "empirical_fisher", "gauss-newton"]))
    if d.nan:
        may |= {"data"}
    if curvature == "gauss-newton":
        must.add("curvature")
    elif curvature != "empirical_fisher":
        if "batch_loss" in opts:
            must.add("batch_loss")
        # a loss the Fisher cannot name a likelihood for, or outputs that are not one tensor
        may |= {"likelihood", "model outputs"}
    else:
        may |= {"batch_size", "data"}  # per-sample losses need per-sample tensors
    way = draw(st.sampled_from(["function", "class"]))
    classes = {
        "ggn": flatness.GGNOperator,
        "fisher": flatness.FisherOperator,
        "empirical_fisher": flatness.EmpiricalFisherOperator,
    }
    with contract(p.model, must, may, received=d.received) as out:
        if way == "function" or curvature not in classes:
            op = flatness.curvature_operator(p.model, loss_fn_for(p, d), d.value, curvature=curvature, **opts)
        else:
            op = classes[curvature](p.model, loss_fn_for(p, d), d.value, **opts)
        n = op.shape[0]
        out["result"] = [op @ torch.ones(n), op.to_scipy() @ np.ones(n)]
    if out["raised"] is None:
        check_result(out["result"])


@FUZZ
@given(st.data())
def test_fuzz_monitor(data):
    draw = data.draw
    p, d, opts, must, may = problem_and_data(draw)
    if d.nan:
        may |= {"data"}
    table = {
        "every": Opt([1, 2], [0, -1, 1.5, "2"]),
        "measures": Opt(
            [("loss",), ["loss", "grad_norm"], {"custom": lambda m: 1.0}], ["nope", [], {"x": 1}]
        ),
    }
    m_opts, m_bad = draw(options(table))
    measures = m_opts.get("measures", ("loss",))
    if isinstance(measures, dict) or not measures:
        # Custom measures see only the model: the data and the options are never used.
        must, may = set(m_bad), set()
    else:
        must |= m_bad
        m_opts["options"] = {"*": opts}
    received = {n: m_opts[n] for n in m_bad}
    if not (isinstance(measures, dict) or not measures):
        received = {} if "epsilom" in opts else {**received, **d.received}
    with contract(p.model, must, may, received=received) as out:
        mon = flatness.Monitor(loss_fn_for(p, d), d.value, **m_opts)
        out["result"] = [mon.step(p.model), mon.step(p.model)]
    if out["raised"] is None:
        rows = [r for r in out["result"] if r is not None]
        assert rows
        for row in rows:
            assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row


# ---------------------------------------------------------------------------- directions, files
@FUZZ
@given(st.data())
def test_fuzz_directions(data):
    draw = data.draw
    p = make_problem(draw(st.sampled_from(MODEL_KINDS)), draw(st.integers(0, 3)))
    prepare_model(p, draw)
    fn = draw(st.sampled_from(["random_direction", "eigen_directions", "pca_directions"]))
    must, may = set(p.must), set(p.may)
    trainable = [t for t in p.model.parameters() if t.requires_grad]
    n = sum(t.numel() for t in trainable)
    if fn == "random_direction":
        fn_opts, bad = draw(options({"normalization": GRID_COMMON["normalization"], "seed": SEED}))
        call = lambda: flatness.random_direction(p.model, **fn_opts)  # noqa: E731
    elif fn == "eigen_directions":
        kind = draw(st.sampled_from(["tensor", "list", "wrong", "empty", "string"]))
        bad = {"eigenvectors"} if kind in ("wrong", "empty", "string") else set()
        vecs = {
            "tensor": torch.ones(2, max(n, 1)),
            "list": [torch.ones(max(n, 1))],
            "wrong": torch.ones(2, n + 3),
            "empty": [],
            "string": "v",
        }[kind]
        if p.name == "all_frozen":
            must |= {"params"} if kind in ("tensor", "list") else set()
            may |= {"eigenvectors"}
        call = lambda: flatness.eigen_directions(p.model, vecs)  # noqa: E731
    else:
        kind = draw(st.sampled_from(["models", "states", "one", "mismatch"]))
        bad = {"checkpoints"} if kind in ("one", "mismatch") else set()
        with torch.random.fork_rng():
            others = [make_problem(p.name, s).model for s in (5, 6, 7)]
        ckpts = {
            "models": others,
            "states": [m.state_dict() for m in others],
            "one": others[:1],
            "mismatch": [*others[:2], {"nope": torch.zeros(2)}],
        }[kind]
        n_comp, nc_bad = draw(options({"n_components": Opt([1, 2], [0, -1, 1.5, 10])}))
        bad |= nc_bad
        if kind == "one":
            may |= {"n_components"}
        call = lambda: flatness.pca_directions(p.model, ckpts, **n_comp)  # noqa: E731
    must |= bad
    if p.name == "all_frozen":
        may |= {"params"}
    if p.name == "no_params":
        may |= {"eigenvectors", "checkpoints", "n_components"}
    with contract(p.model, must, may) as out:
        out["result"] = call()
    if out["raised"] is None:
        check_result(out["result"])


@FUZZ
@given(kind=st.sampled_from(["missing", "garbage", "npz_without_meta", "bad_meta", "ok"]))
def test_fuzz_load_landscape(kind, tmp_path_factory):
    path = tmp_path_factory.mktemp("ls") / "f.npz"
    if kind == "garbage":
        path.write_bytes(os.urandom(64))
    elif kind == "npz_without_meta":
        np.savez(path, a=np.zeros(2))
    elif kind == "bad_meta":
        np.savez(path, meta=np.array("{not json"))
    elif kind == "ok":
        p = make_problem("mlp", 0)
        flatness.landscape_1d(p.model, p.loss_fn, (p.x, p.y), alphas=[0.0, 1.0]).save(path)
    # A missing file is a FileNotFoundError (documented), naming the path like the others.
    with contract(
        None, set() if kind == "ok" else {"path"}, set(), errors=(*OK_ERRORS, FileNotFoundError)
    ) as out:
        out["result"] = flatness.load_landscape(path)
    if out["raised"] is None:
        check_result(out["result"])


# ---------------------------------------------------------------------------- operator-level functions
def _symmetric(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=D)
    return (a + a.T) / 2


MATVECS = ["ok", "wrong_size", "not_tensor", "nonfinite"]


@FUZZ
@given(st.data())
def test_fuzz_numerical_layer(data):
    draw = data.draw
    n = draw(st.integers(1, 6))
    H = _symmetric(n, draw(st.integers(0, 5)))
    kind = draw(st.sampled_from(MATVECS))
    matvec = {
        "ok": lambda v: (H @ v.to(D)).to(v.dtype),
        "wrong_size": lambda v: torch.ones(n + 1, dtype=D),
        "not_tensor": lambda v: (H @ v.to(D)).tolist(),
        "nonfinite": lambda v: H @ v.to(D) * math.inf,
    }[kind]
    must = set() if kind == "ok" else {"matvec"}
    fn = draw(st.sampled_from(["lanczos_eigsh", "hutchinson", "hutchpp", "slq_density"]))
    common = {"seed": SEED, "dtype": Opt([None, D, torch.float32], [torch.int64, "x"])}
    tables = {
        "lanczos_eigsh": {
            "k": Opt([1], [0, -1, 1.5, n + 5]),
            "which": TOPK["which"],
            "tol": TOPK["tol"],
            "ncv": Opt([None], [0, -1, n + 9]),
            "max_matvec": Opt([None, 30], [0, -5, 2.5]),
            "v0": Opt([None], [torch.zeros(n), torch.ones(n + 2), "v"]),
        },
        "hutchinson": {"n_matvec": Opt([2, 5], [0, 1, -1, 2.5])},
        "hutchpp": {"n_matvec": Opt([4, 7], [0, 3, -1, 2.5])},
        "slq_density": {k: v for k, v in DENSITY.items() if k != "seed"},
    }
    fn_opts, bad = draw(options({**tables[fn], **common}))
    must |= bad
    may = set()
    if fn == "lanczos_eigsh":
        fn_opts.setdefault("k", 1)
        if n == 1:
            may |= {"k", "ncv"}  # k < n is impossible for n = 1
    if fn in ("hutchinson", "hutchpp"):
        fn_opts.setdefault("n_matvec", 4 if fn == "hutchpp" else 2)
    if fn == "slq_density":
        fn_opts.setdefault("n_steps", 3)
    with contract(None, must, may, received={k: fn_opts[k] for k in bad}) as out:
        out["result"] = getattr(flatness, fn)(matvec, n, **fn_opts)
    if out["raised"] is None:
        check_result(out["result"], nan_ok=frozenset({"std_error"}))


def test_every_public_function_is_fuzzed():
    fuzzed = {
        "sharpness",
        "adaptive_sharpness",
        "average_sharpness",
        "hessian_topk",
        "hessian_trace",
        "hessian_density",
        "landscape_1d",
        "landscape_2d",
        "interpolate",
        "Objective",
        "HessianOperator",
        "CurvatureOperator",
        "GGNOperator",
        "FisherOperator",
        "EmpiricalFisherOperator",
        "curvature_operator",
        "Monitor",
        "random_direction",
        "eigen_directions",
        "pca_directions",
        "load_landscape",
        "lanczos_eigsh",
        "hutchinson",
        "hutchpp",
        "slq_density",
        "topk",
        "trace",
        "density",
        "by_block",
    }

    def is_function_or_tool(obj: Any) -> bool:
        if isinstance(obj, type):
            return not issubclass(obj, (Exception, flatness.results.Result))
        return callable(obj)

    public = {name for name in flatness.__all__ if is_function_or_tool(getattr(flatness, name))}
    assert public - fuzzed == set(), public - fuzzed


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_fuzz_models_have_valid_baselines(kind):
    # Sanity of the fuzzer itself: with right arguments every model either works or, for the
    # models that are wrong on purpose, is refused naming the model or params.
    p = make_problem(kind, 0)
    with contract(p.model, p.must | (p.may if kind == "all_frozen" else set()), set()) as out:
        out["result"] = flatness.Objective(p.model, p.loss_fn, (p.x, p.y)).loss()
    if out["raised"] is None:
        check_result(out["result"])


def test_names_argument_needs_the_name_as_a_word():
    # The contract's check itself: a substring proves nothing.
    assert names_argument("k: got 0; expected an int >= 1", "k")
    assert names_argument("expected k=1 or more", "k")
    assert names_argument("the argument `v` has length 3", "v")
    assert names_argument("'v' must be a vector", "v")
    assert not names_argument("start='keskar' is not valid", "k")
    assert not names_argument("the top-k eigenvalues", "k")
    assert not names_argument("invalid values", "v")
    assert not names_argument("max_batches: got 0", "batches")
    assert not names_argument("dtype=torch.float64", "float64")
    assert shows_value("epsilon: got -0.001; expected a number > 0", -1e-3)
    assert shows_value("start: got 'lanczos'; expected one of", "lanczos")
    assert shows_value("metrics: expected a dict, got str", "acc")
    assert not shows_value("epsilon: expected a number > 0", -1e-3)
    assert not shows_value("max_iter: expected an int >= 1", 0)  # "int" alone is not "got int"
