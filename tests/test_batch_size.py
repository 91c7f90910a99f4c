"""The weight of a batch: the documented rule, the ambiguity warning, batch_size= recipes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from flatness import Objective
from flatness.objective._data import batch_size_of


def test_the_rule():
    x, y = torch.zeros(4, 3), torch.zeros(4)
    assert batch_size_of((x, y)) == 4
    assert batch_size_of(x) == 4
    # Tuple batches: the inputs decide, even when the targets come first in another order.
    assert batch_size_of(([x, torch.zeros(4, 1)], y)) == 4
    # Dict batches: the first tensor in dict order; scalars and non-tensors are skipped.
    assert batch_size_of({"n": torch.tensor(3), "name": "a", "x": {"ids": torch.zeros(5, 2)}}) == 5
    assert batch_size_of({"x": x}, lambda b: torch.tensor(7)) == 7


def test_ambiguous_sizes_warn_and_consistent_ones_do_not():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_size_of(
            {"input_ids": torch.zeros(8, 5), "attention_mask": torch.zeros(8, 5), "labels": torch.zeros(8)}
        )
        batch_size_of((torch.zeros(8, 5), torch.zeros(8)))
        batch_size_of({"a": torch.zeros(8), "b": torch.zeros(2)}, lambda b: 8)  # the user chose
    with pytest.warns(
        UserWarning,
        match=r"different leading sizes \(batch\['images'\]: 4, batch\['ids'\]: 6\).*weighted by 4",
    ):
        assert batch_size_of({"images": torch.zeros(4, 3), "ids": torch.zeros(6)}) == 4
    with pytest.warns(
        UserWarning, match=r"batch\[1\]: 10\); it is weighted by 5, the leading size of batch\[0\]"
    ):
        assert batch_size_of((torch.zeros(5, 2), torch.zeros(10))) == 5


def test_bad_sizes():
    with pytest.raises(TypeError, match="batch_size=callable"):
        batch_size_of({"n": torch.tensor(3)})
    with pytest.raises(ValueError, match="size 0"):
        batch_size_of({"x": torch.zeros(2)}, lambda b: 0)
    with pytest.raises(ValueError, match=r"size 2\.5"):
        batch_size_of({"x": torch.zeros(2)}, lambda b: 2.5)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x):
        return self.lin(x).squeeze(-1)


def test_batch_size_recipe_gives_a_per_element_mean():
    """Each sample has a variable number of valid elements; weighting by that count gives the
    element mean over the whole dataset, weighting by samples (the rule) does not."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for n, valid in ((3, [4, 1, 2]), (2, [6, 6])):
        x = torch.randn(n, 6, 3, generator=g, dtype=torch.float64)
        mask = torch.zeros(n, 6, dtype=torch.bool)
        for i, v in enumerate(valid):
            mask[i, :v] = True
        batches.append({"x": x, "mask": mask, "y": torch.randn(n, 6, generator=g, dtype=torch.float64)})
    model = DictModel()

    def batch_loss(m, b):
        return ((m(b["x"]) - b["y"])[b["mask"]] ** 2).mean()

    per_element = Objective(
        model, data=batches, batch_loss=batch_loss, batch_size=lambda b: int(b["mask"].sum())
    )
    with torch.no_grad():
        errs = torch.cat([((model(b["x"]) - b["y"])[b["mask"]] ** 2) for b in batches])
    assert float(per_element.loss()) == pytest.approx(float(errs.mean()), rel=1e-12)
    per_sample = Objective(model, data=batches, batch_loss=batch_loss)
    assert abs(float(per_sample.loss()) - float(errs.mean())) > 1e-3
