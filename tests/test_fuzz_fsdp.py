"""Fuzz: sharded (FSDP2) replay on 2 gloo ranks against one process.

Hypothesis draws batches of cases (each rank's data source, the shard split, the batch size,
``max_batches``, ``reduction`` and the measure); one spawn of 2 ranks runs a whole batch. A case
whose data replays on both ranks must give one process's numbers on the same batches; a case
where a rank's passes differ must raise the one-process replay ``ValueError`` on both ranks
(never a number, never one rank left waiting in a collective). Spawning ranks is slow: few
examples, marked slow.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import test_fsdp as fs  # the 2-rank harness, models and data

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.slow,
]

F = torch.nn.functional
KINDS = ("list", "iter", "loader", "noise", "epoch", "drop")


class Epochs:
    """A source that changes between epochs (deterministically): x shifted by 0.01 per pass."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        shift, self.passes = 0.01 * self.passes, self.passes + 1
        return iter([(xb + shift, yb) for xb, yb in self.batches])


class DropLast:
    """A source that yields one batch fewer on every second pass."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        drop, self.passes = self.passes % 2 == 1, self.passes + 1
        return iter(self.batches[:-1] if drop else self.batches)


def _shard(case, rank):
    x, y = fs.make_data()
    lo, hi = (0, case["split"]) if rank == 0 else (case["split"], fs.N_SAMPLES)
    return x[lo:hi], y[lo:hi]


def _source(case, rank):
    """(the rank's data source, the batches its first pass yields after max_batches)."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _shard(case, rank)
    bs, kind = case["bs"], case["kinds"][rank]
    batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]
    if kind == "loader":

        def loader():
            gen = torch.Generator().manual_seed(7 + rank)
            return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=gen)

        data, batches = loader(), list(loader())
    else:
        wrap = {"list": list, "iter": fs.Replayable, "noise": fs.Noisy, "epoch": Epochs, "drop": DropLast}
        data = wrap[kind](batches)
    mb = case["max_batches"]
    return data, batches if mb is None else batches[:mb]


def _n_batches(case, rank):
    n = case["split"] if rank == 0 else fs.N_SAMPLES - case["split"]
    return math.ceil(n / case["bs"])


def _differs(case, rank):
    """Whether this rank's second pass differs from its first (after max_batches)."""
    kind, mb = case["kinds"][rank], case["max_batches"]
    if kind in ("noise", "epoch"):
        return True
    if kind == "drop":
        nb = _n_batches(case, rank)
        return mb is None or nb <= mb
    return False


def _measure(case, model, data):
    import flatness
    from flatness import Objective as ShardedObjective

    opts = {"reduction": case["reduction"], "max_batches": case["max_batches"]}
    what = case["what"]
    if what == "trace":
        return flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=6, seed=2, **opts).estimate
    obj = ShardedObjective(model, F.cross_entropy, data, **opts)
    gen = torch.Generator().manual_seed(4)
    if what == "loss2":
        return torch.stack([obj.loss(), obj.loss()])
    if what == "grad2":
        return torch.stack([obj.grad(), obj.grad()])
    if what == "hvp":
        return obj.hvp(obj.space.randn(gen))
    dirs = obj.space.randn(gen, 2)
    coords = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=torch.float64)
    return torch.stack([obj.evaluate_many(coords, directions=dirs)[0] for _ in range(2)]), dirs


def _fuzz(rank, payload):
    model = fs._sharded(payload["state"])
    model.eval()
    before = fs.local_state(model)
    out = {"cases": []}
    for case in payload["cases"]:
        data, seen = _source(case, rank)
        out["cases"].append((fs._outcome(lambda: _measure(case, model, data)), seen))  # noqa: B023
    from flatness import Objective as ShardedObjective

    obj = ShardedObjective(model, F.cross_entropy, fs.shard(*fs.make_data(), rank))
    out["ranges"], out["n"] = obj.space.ranges, obj.n
    out["untouched"] = fs.same_state(before, fs.local_state(model))
    return out


def _oracle(case, model, batches, v=None, dirs=None):
    """The same measure in one process on the ranks' batches (a list: no replay check needed)."""
    import flatness
    from flatness.algorithms import trace_estimate

    obj = flatness.Objective(model, F.cross_entropy, batches, reduction=case["reduction"])
    what = case["what"]
    if what == "trace":
        return trace_estimate(fs._OneProcess(obj), method="hutch++", n_matvec=6, seed=2).estimate
    if what == "loss2":
        return obj.loss()
    if what == "grad2":
        return obj.grad()
    if what == "hvp":
        return obj.hvp(v)
    coords = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=torch.float64)
    return obj.evaluate_many(coords, directions=dirs)[0]


def _full(ranks, pieces):
    """Gather local vectors (one per rank) into full ones."""
    return fs.gather(
        [{"x": p, "ranges": r["ranges"], "n": r["n"]} for r, p in zip(ranks, pieces, strict=True)], "x"
    )


def _check(case, ranks, outcomes, model):
    (o0, seen0), (o1, seen1) = outcomes
    d0, d1 = _differs(case, 0), _differs(case, 1)
    empty = [case["kinds"][r] == "drop" and d and _n_batches(case, r) == 1 for r, d in ((0, d0), (1, d1))]
    if any(empty):
        # A second pass with no batches on a rank: refused on both ranks as an empty shard.
        for kind, message in (o0, o1):
            assert kind == "ValueError" and "yielded no batches" in message, (case, message)
        return
    if d0 or d1:
        for rank, (kind, message), d in ((0, o0, d0), (1, o1, d1)):
            assert kind == "ValueError", (case, rank, kind, message)
            if d:
                assert message.startswith("data: pass 2 over the data differs from the first"), (
                    case,
                    message,
                )
            else:
                assert message.startswith(
                    "data: the passes over the data differ on 1 other rank(s), whose error"
                ), (case, message)
        return
    assert o0[0] == o1[0] == "ok", (case, o0, o1)
    batches = seen0 + seen1
    what, v0, v1 = case["what"], o0[1], o1[1]
    if what == "trace":
        assert v0 == v1 == pytest.approx(_oracle(case, model, batches), rel=1e-6), case
    elif what == "loss2":
        expected = float(_oracle(case, model, batches))
        for value in (*v0.tolist(), *v1.tolist()):
            assert value == pytest.approx(expected, rel=1e-12), case
    elif what == "grad2":
        expected = _oracle(case, model, batches)
        for i in range(2):
            assert fs.rel(_full(ranks, [v0[i], v1[i]]), expected) < 1e-12, case
    elif what == "hvp":
        # The same v as the ranks drew (Philox by entry, any number of ranks).
        from flatness.objective._fsdp import ShardedVectorSpace

        n = ranks[0]["n"]
        v = ShardedVectorSpace([(0, n)], n, dtype=torch.float64).randn(torch.Generator().manual_seed(4))
        assert fs.rel(_full(ranks, [v0, v1]), _oracle(case, model, batches, v=v)) < 1e-7, case
    else:
        (t0, dirs0), (t1, dirs1) = v0, v1
        expected = _oracle(case, model, batches, dirs=_full(ranks, [dirs0, dirs1]))
        for table in (t0, t1):
            for row in table:
                assert torch.allclose(row, expected, rtol=1e-12, atol=0), case


def _case():
    return st.fixed_dictionaries(
        {
            "kinds": st.tuples(st.sampled_from(KINDS), st.sampled_from(KINDS)),
            "split": st.integers(3, fs.N_SAMPLES - 3),
            "bs": st.integers(2, 7),
            "max_batches": st.none() | st.integers(1, 4),
            "reduction": st.sampled_from(["mean", "sum"]),
            "what": st.sampled_from(["loss2", "grad2", "hvp", "many", "trace"]),
        }
    )


@settings(max_examples=int(os.environ.get("FUZZ_FSDP_EXAMPLES", "2")))
@given(cases=st.lists(_case(), min_size=8, max_size=8))
def test_fuzz_sharded_replay(tmp_path_factory, cases):
    model = fs.make_model()
    tmp = tmp_path_factory.mktemp("ranks")
    ranks = fs.run_ranks(tmp, _fuzz, {"state": model.state_dict(), "cases": cases})
    for r in ranks:
        assert r["untouched"], "the sharded model was changed"
    for i, case in enumerate(cases):
        _check(case, ranks, [ranks[0]["cases"][i], ranks[1]["cases"][i]], model)


PAIRS = [("noise", "list"), ("iter", "epoch"), ("loader", "drop"), ("noise", "noise"), ("loader", "iter")]


def test_sharded_replay_kinds(tmp_path):
    """Each kind of source on a fixed split (17 / 13, batches of 5) through every measure, one spawn."""
    model = fs.make_model()
    cases = [
        {"kinds": kinds, "split": 17, "bs": 5, "max_batches": None, "reduction": "mean", "what": what}
        for kinds in PAIRS
        for what in ("loss2", "grad2", "hvp", "many", "trace")
    ]
    ranks = fs.run_ranks(tmp_path, _fuzz, {"state": model.state_dict(), "cases": cases})
    for r in ranks:
        assert r["untouched"], "the sharded model was changed"
    for i, case in enumerate(cases):
        _check(case, ranks, [ranks[0]["cases"][i], ranks[1]["cases"][i]], model)
