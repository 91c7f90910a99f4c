"""Regressions for the audit of issue 14: each case failed silently or unclearly before.

Data that does not replay, half-precision sums, φ's domain, non-finite losses inside the box,
DistributedSampler padding, and the smaller items (inf matvecs, dtype mismatches, models
without parameters).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from conftest import assert_untouched, classification_data, make_mlp, snapshot
from flatness import (
    NonFiniteLossError,
    Objective,
    adaptive_sharpness,
    average_sharpness,
    hessian_topk,
    lanczos_eigsh,
    landscape_1d,
    landscape_2d,
    sharpness,
)
from flatness.sharpness import AdaptiveSharpnessResult, SharpnessResult

F = nn.functional
D = torch.float64


# ---------------------------------------------------------------------------- 1. replay
class AugmentedDataset(Dataset):
    """Fixed samples plus noise from the global torch RNG (as torchvision transforms draw)."""

    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.3 * torch.randn(5), self.y[i]


class EntropyStream(IterableDataset):
    """An IterableDataset seeded from OS entropy: every pass differs (and cannot be reseeded)."""

    def __iter__(self):
        rng = np.random.default_rng()  # OS entropy
        for _ in range(3):
            yield torch.from_numpy(rng.standard_normal((4, 5))).float(), torch.zeros(4, dtype=torch.long)


class OwnGeneratorBatches:
    """A re-iterable of batches whose augmentation holds its own, never rewound, generator."""

    def __init__(self):
        self.gen = np.random.default_rng(0)
        self.x, self.y = classification_data(12, dtype=torch.float32)

    def __iter__(self):
        for i in range(0, 12, 4):
            noise = torch.from_numpy(self.gen.standard_normal((4, 5))).float()
            yield self.x[i : i + 4] + noise, self.y[i : i + 4]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def test_persistent_workers_with_augmentation_replay_every_pass():
    model = small_model()
    loader = DataLoader(
        AugmentedDataset(), batch_size=16, shuffle=True, num_workers=1, persistent_workers=True
    )
    before = snapshot(model)
    obj = Objective(model, F.cross_entropy, loader)
    losses = [float(obj.loss()) for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    v = torch.linspace(-1, 1, obj.n)
    assert torch.equal(obj.hvp(v), obj.hvp(v))
    # Separate calls agree too, and the user's loader keeps no iterator of ours.
    a = sharpness(model, F.cross_entropy, loader, epsilon=1e-2)
    b = sharpness(model, F.cross_entropy, loader, epsilon=1e-2)
    assert a.value == b.value
    assert loader._iterator is None and loader.persistent_workers
    assert_untouched(model, before)
    # The same numbers as a non-persistent loader over the same data.
    plain = DataLoader(AugmentedDataset(), batch_size=16, shuffle=True, num_workers=1)
    assert float(Objective(model, F.cross_entropy, plain).loss()) == losses[0]


@pytest.mark.parametrize("source", ["entropy_stream", "own_generator"])
def test_data_whose_passes_differ_is_reported(source):
    model = small_model()
    data = (
        DataLoader(EntropyStream(), batch_size=None) if source == "entropy_stream" else OwnGeneratorBatches()
    )
    before = snapshot(model)
    obj = Objective(model, F.cross_entropy, data)
    obj.loss()  # the first pass is the reference
    with pytest.raises(ValueError, match=r"data: pass 2 over the data differs from the first \(batch 0"):
        obj.loss()
    with pytest.raises(ValueError, match="list\\(loader\\)"):
        hessian_topk(model, F.cross_entropy, data, k=1, max_hvp=5)
    assert_untouched(model, before)


def test_replaying_loaders_are_not_reported():
    # Shuffling and augmentation from the global RNG, a loader generator, workers: all replay.
    model = small_model()
    for loader in (
        DataLoader(AugmentedDataset(), batch_size=10, shuffle=True),
        DataLoader(
            AugmentedDataset(), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(3)
        ),
        DataLoader(AugmentedDataset(), batch_size=10, shuffle=True, num_workers=1),
    ):
        obj = Objective(model, F.cross_entropy, loader)
        assert len({float(obj.loss()) for _ in range(3)}) == 1


def test_fingerprint_sees_flips_within_a_batch():
    # A flip keeps every sum: the fingerprint is position-sensitive.
    from flatness.objective._data import _fingerprint, _same_prints

    x = torch.arange(12.0).reshape(3, 4)
    assert not _same_prints(_fingerprint((x, x)), _fingerprint((x.flip(1), x)))
    assert _same_prints(
        _fingerprint({"a": [x, (x.double(),)]}), _fingerprint({"a": [x.clone(), (x.double(),)]})
    )


# ---------------------------------------------------------------------------- 2. half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sums_accumulate_in_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 5, generator=g).to(dtype), torch.randint(0, 3, (4,), generator=g)) for _ in range(400)
    ]
    with torch.no_grad():
        own = [float(F.cross_entropy(model(x), y)) for x, y in batches]  # the model's own batch losses
    expected = math.fsum(own) / len(own)
    obj = Objective(model, F.cross_entropy, batches)
    loss = obj.loss()
    assert loss.dtype == torch.float32
    assert abs(float(loss) - expected) <= 1e-6 * expected  # was 7.7 % (bfloat16), 0.8 % (float16) off
    # Grids accumulate alike: the loop path runs the model's own kernels (same batch losses);
    # vmap's batched kernels round each bfloat16 batch loss differently (~0.4 % per batch).
    many, _ = obj.evaluate_many(obj.theta0[None].repeat(2, 1), vectorize=False)
    assert many.dtype == torch.float32
    assert torch.allclose(many.double(), torch.full((2,), expected, dtype=D), rtol=1e-6)
    # Gradients come back in the model's dtype (what the algorithms expect).
    assert Objective(model, F.cross_entropy, batches[:3]).grad().dtype == dtype


# ---------------------------------------------------------------------------- 3. φ's domain
class ShiftedQuadratic(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.t = nn.Parameter(torch.tensor([0.5, 0.0], dtype=D))
        self.c = c

    def forward(self, x):
        return ((self.t**2).sum() + self.c).expand(x.shape[0])


QDATA = (torch.zeros(3, 1, dtype=D), torch.zeros(3, dtype=D))


def mean_out(out, _y):
    return out.mean()


@pytest.mark.parametrize("c", [-3.12, -1.25])  # f(x) = -2.87 and f(x) = -1 (exactly)
def test_keskar_phi_needs_loss_above_minus_one(c):
    model = ShiftedQuadratic(c)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"defined for f\(x\) > −1.*adaptive_sharpness") as info:
        sharpness(model, mean_out, QDATA, epsilon=0.1)
    assert "ZeroDivision" not in str(info.value)
    assert_untouched(model, before)
    # The alternative the message names gives the unnormalized increase over Keskar's box.
    alt = adaptive_sharpness(model, mean_out, QDATA, rho=0.1, p="inf", eta=1.0)
    x = torch.tensor([0.5, 0.0], dtype=D)
    assert math.isclose(alt.value, float(((x.abs() + 0.1 * (x.abs() + 1)) ** 2 - x**2).sum()), rel_tol=1e-9)


def test_keskar_phi_just_above_minus_one_is_finite_and_non_negative():
    model = ShiftedQuadratic(-1.22)  # f(x) = -0.97
    res = sharpness(model, mean_out, QDATA, epsilon=0.1)
    assert res.value > 0 and math.isfinite(res.value)


# ---------------------------------------------------------------------------- 4. non-finite in the box
class BlowsUp(nn.Module):
    """f(t) = Σ t², NaN (or inf) once some |t_i - t0_i| exceeds a threshold."""

    def __init__(self, threshold: float, value: float = math.nan):
        super().__init__()
        self.t = nn.Parameter(torch.tensor([0.5, -0.25, 1.0], dtype=D))
        self.register_buffer("t0", self.t.detach().clone())
        self.threshold, self.value = threshold, value

    def forward(self, x):
        v = (self.t**2).sum()
        far = (self.t - self.t0).abs().max() > self.threshold
        return torch.where(far, torch.full_like(v, self.value), v).expand(x.shape[0])


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_inside_the_box_says_where_and_keeps_the_best(value):
    model = BlowsUp(threshold=0.12, value=value)
    before = snapshot(model)
    with pytest.raises(NonFiniteLossError, match=r"at a perturbed point θ \+ δ.*not at θ") as info:
        sharpness(model, mean_out, QDATA, epsilon=0.1)
    best = info.value.best
    assert isinstance(best, SharpnessResult)
    # The best finite point found before: a lower bound of φ, finite, with its evidence.
    assert best.status == -1 and "not finite" in best.message
    assert math.isfinite(best.value) and 0 <= best.value
    assert best.max_loss >= best.loss == pytest.approx(0.5**2 + 0.25**2 + 1.0)
    obj = Objective(model, mean_out, QDATA)
    assert float(obj.loss(obj.theta0 + obj.flatten(best.perturbation))) == pytest.approx(best.max_loss)
    assert_untouched(model, before)
    with pytest.raises(NonFiniteLossError, match="perturbed point") as info:
        adaptive_sharpness(model, mean_out, QDATA, rho=0.5, p="inf")
    assert isinstance(info.value.best, AdaptiveSharpnessResult)
    with pytest.raises(NonFiniteLossError, match="draw 1 of 4, not at θ"):
        average_sharpness(model, mean_out, QDATA, rho=0.5, n_samples=4)
    assert_untouched(model, before)


def test_non_finite_loss_at_theta_says_so():
    model = BlowsUp(threshold=-1.0)  # NaN everywhere, θ included
    with pytest.raises(NonFiniteLossError, match="at θ itself") as info:
        sharpness(model, mean_out, QDATA)
    assert info.value.best is None
    with pytest.raises(NonFiniteLossError, match="at θ itself"):
        average_sharpness(model, mean_out, QDATA, rho=0.1, n_samples=2)


# ---------------------------------------------------------------------------- 5. landscape centre
def test_landscape_with_non_finite_centre_says_the_centre_is_the_problem():
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    data = (torch.randn(4, 2, dtype=D), torch.randn(4, 1, dtype=D))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = landscape_1d(model, F.mse_loss, data, alphas=[-1.0, 0.0, 1.0])
        landscape_2d(model, F.mse_loss, data, alphas=[-1.0, 1.0], betas=[0.0, 1.0])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2
    for m in messages:
        assert "centre itself" in m and "too far" not in m
    assert math.isnan(res.center_loss)
    # A finite centre with a grid that overflows keeps the reach hint.
    ok = nn.Linear(2, 1).double()
    with pytest.warns(RuntimeWarning, match="too far from the centre"):
        landscape_1d(
            ok, lambda o, y: torch.exp(F.mse_loss(o, y)), data, alphas=[0.0, 1e3], normalization=None
        )


# ---------------------------------------------------------------------------- 6. DistributedSampler
class Indexed(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)]), torch.tensor(0)


def _indices_seen(loader) -> list[int]:
    from flatness.objective._data import DataSource

    return [int(v) for x, _ in DataSource(loader) for v in x.reshape(-1)]


@pytest.mark.parametrize("n", [37, 5, 3, 1])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_distributed_sampler_padding_is_dropped(n, shuffle, replicas):
    seen = []
    for rank in range(replicas):
        sampler = DistributedSampler(Indexed(n), num_replicas=replicas, rank=rank, shuffle=shuffle, seed=4)
        loader = DataLoader(Indexed(n), batch_size=4, sampler=sampler)
        seen += _indices_seen(loader)
        assert len(list(loader.sampler)) == sampler.num_samples  # the user's sampler still pads
    assert sorted(seen) == list(range(n))  # every sample exactly once over the ranks


def test_distributed_sampler_padding_loss_equals_one_process():
    # The audit's case: 37 samples on 2 ranks; rank losses combined by size = all the data.
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(37, 3, dtype=D)
    y = torch.randint(0, 2, (37,))
    full = float(Objective(model, F.cross_entropy, (x, y)).loss())
    total, size = 0.0, 0
    for rank in range(2):
        sampler = DistributedSampler(TensorDataset(x, y), num_replicas=2, rank=rank, shuffle=True)
        loader = DataLoader(TensorDataset(x, y), batch_size=5, sampler=sampler)
        obj = Objective(model, F.cross_entropy, loader)
        m = sum(len(b[0]) for b in obj.data)
        total += float(obj.loss()) * m
        size += m
    assert size == 37
    assert total / size == pytest.approx(full, rel=1e-12)  # was 0.34 % off


def test_distributed_sampler_padding_that_cannot_be_undone_is_refused():
    class Custom(DistributedSampler):
        def __iter__(self):
            return iter(list(super().__iter__())[::-1])

    ds = Indexed(7)
    sampler = Custom(ds, num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(ValueError, match="drop_last=True"):
        Objective(make_mlp(d_in=1), F.cross_entropy, DataLoader(ds, batch_size=2, sampler=sampler))
    plain = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)
    custom_batches = torch.utils.data.BatchSampler(plain, 2, False)

    class MyBatchSampler(torch.utils.data.BatchSampler):
        pass

    loader = DataLoader(ds, batch_sampler=MyBatchSampler(plain, 2, False))
    with pytest.raises(ValueError, match="drop_last=True"):
        Objective(make_mlp(d_in=1), F.cross_entropy, loader)
    # No padding (N divisible, or drop_last=True): used as given.
    for sampler in (
        DistributedSampler(Indexed(8), num_replicas=2, rank=1, shuffle=False),
        DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False, drop_last=True),
    ):
        loader = DataLoader(sampler.dataset, batch_size=3, sampler=sampler)
        assert _indices_seen(loader) == [int(i) for i in sampler]
    assert custom_batches.sampler is plain


# ---------------------------------------------------------------------------- smaller items
def test_lanczos_on_an_infinite_matvec_is_a_clear_error():
    with pytest.raises(ValueError, match="matvec: returned 5 non-finite"):
        lanczos_eigsh(lambda v: v * math.inf, 5, 1)
    with pytest.raises(ValueError, match="matvec: returned 1 non-finite"):
        lanczos_eigsh(lambda v: torch.cat([v[:-1], torch.tensor([math.nan], dtype=v.dtype)]), 5, 1)
    # The trace and density routines too (before: an inf estimate, or nodes silently dropped).
    from flatness import hutchpp, slq_density

    with pytest.raises(ValueError, match="matvec: returned 5 non-finite"):
        hutchpp(lambda v: v * math.inf, 5, n_matvec=6)
    with pytest.raises(ValueError, match="matvec: returned 5 non-finite"):
        slq_density(lambda v: v * math.inf, 5, n_runs=1, n_steps=3)


def test_mixed_data_and_model_dtypes_name_data_and_dtypes():
    model = make_mlp(dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(
        TypeError, match=r"data: the batch holds float64 tensors but the model's parameters are float32"
    ):
        Objective(model, F.cross_entropy, classification_data(dtype=D)).loss()
    with pytest.raises(TypeError, match=r"dtype=torch\.float64"):
        sharpness(model, F.cross_entropy, classification_data(dtype=D))
    assert_untouched(model, before)
    # With dtype= the data is cast: no error.
    Objective(model, F.cross_entropy, classification_data(dtype=D), dtype=D).loss()


def test_model_without_parameters_has_its_own_message():
    with pytest.raises(ValueError, match="has no parameters at all"):
        Objective(nn.ReLU(), F.mse_loss, (torch.randn(3, 2), torch.randn(3, 2)))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="all requires_grad=False"):
        Objective(frozen, F.mse_loss, (torch.randn(3, 2), torch.randn(3, 2)))


def test_hessian_topk_on_replaying_persistent_loader_converges():
    # The audit's hessian_topk ran to 2000 HVPs without converging on such a loader.
    model = small_model()
    loader = DataLoader(AugmentedDataset(24), batch_size=8, num_workers=1, persistent_workers=True)
    res = hessian_topk(model, F.cross_entropy, loader, k=1, tol=1e-4)
    assert res.converged and res.n_matvec <= 60


# ---------------------------------------------------------------------------- found by tests/test_fuzz.py
def test_fuzz_findings_are_clear_errors(tmp_path):
    model = make_mlp()
    checkpoints = [make_mlp(i) for i in range(1, 4)]
    saturating = nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double()
    data = classification_data()
    before = snapshot(model)
    # NumPy integer seeds are ints everywhere; a string seed is named before it is used.
    landscape_2d(model, F.cross_entropy, data, alphas=[0.0, 1.0], betas=[0.0], seed=np.int64(2))
    hessian_topk(model, F.cross_entropy, data, k=1, seed=np.int64(1), max_hvp=25, data_seed=np.int64(3))
    with pytest.raises(TypeError, match="seed: expected an int"):
        landscape_2d(model, F.cross_entropy, data, alphas=[0.0], betas=[0.0], seed="0")
    # params of the wrong kind, reduction as an array.
    with pytest.raises(TypeError, match="params: expected None, a list"):
        Objective(model, F.cross_entropy, data, params=5)
    with pytest.raises(TypeError, match=r"params: got the string '0.weight'; pass a list of names"):
        Objective(model, F.cross_entropy, data, params="0.weight")
    with pytest.raises(ValueError, match="reduction: got array"):
        Objective(model, F.cross_entropy, data, reduction=np.array(["mean"]))
    # Empty batches and sizes.
    x, y = data
    with pytest.raises(ValueError, match="data: a batch has 0 samples"):
        Objective(model, F.cross_entropy, [(x[:3], y[:3]), (x[:0], y[:0])]).loss()
    obj = Objective(model, F.cross_entropy, [(x[:3], y[:3])], batch_size=lambda b: np.int64(len(b[0])))
    assert math.isfinite(float(obj.loss()))
    with pytest.raises(ValueError, match=r"batch_size: returned 2\.5"):
        Objective(model, F.cross_entropy, data, batch_size=lambda b: 2.5).loss()
    # A non-finite gradient with finite losses points at the data too.
    xi = x.clone()
    xi[0, 0] = math.inf
    with pytest.raises(NonFiniteLossError, match=r"gradient is not finite.*data"):
        Objective(saturating, F.cross_entropy, (xi, y)).grad()
    # Trajectory PCA asking for more components than the checkpoints or θ allow.
    from flatness import pca_directions

    with pytest.raises(ValueError, match="checkpoints, n_components"):
        pca_directions(model, checkpoints[:2], n_components=2)
    with pytest.raises(ValueError, match="n_components: got 100"):
        pca_directions(model, checkpoints, n_components=100)
    assert_untouched(model, before)
    # A normalization of another type than str is named, not compared elementwise.
    from flatness import random_direction

    with pytest.raises(ValueError, match="normalization: got array"):
        random_direction(model, normalization=np.array(["filter"]))
    # Files that are not landscapes.
    from flatness import load_landscape

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz file at all")
    with pytest.raises(ValueError, match=r"path: .* is not a flatness landscape result"):
        load_landscape(bad)
    with pytest.raises(FileNotFoundError, match="path: no file"):
        load_landscape(tmp_path / "missing.npz")
