"""Language-model curvature in one line: ``**lm_loss(kind)`` for the Hessian, the GGN, the Fisher
and the empirical Fisher of the token-mean loss, against dense float64 oracles.

The oracles run every sequence alone, unpadded, and take the Jacobian of the logits of its
predicted tokens (torch.autograd.functional.jacobian): GGN = Fisher =
(1/N) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t over the N predicted tokens of the data; the empirical
Fisher Σ_i (n_i/N) g_i g_iᵀ with g_i the gradient of sequence i's token-mean loss and n_i its
number of predicted tokens (docs/operators.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from conftest import assert_untouched, dense_hessian_oracle, dense_jacobian_oracle, snapshot
from conftest import collate_lm as collate
from flatness import curvature_operator, hessian_topk
from flatness.integrations.huggingface import lm_loss

VOCAB = 5
F = nn.functional


class TinyLM(nn.Module):
    """A causal LM in the Hugging Face style: dict batches in, an output with ``.logits`` out.

    Each position sees the masked running mean of the embeddings up to it, so tokens interact
    and right padding changes nothing before it.
    """

    def __init__(self, seed: int = 0, d: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = mask.to(h.dtype)
        h = (h * mask[..., None]).cumsum(-2) / mask.cumsum(-1).clamp_min(1)[..., None]
        return SimpleNamespace(logits=self.head(h))


def sequences(kind: str):
    """(ids, labels) per sequence; the length-1 one has no predicted token after the causal shift."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length in (5, 2, 7, 1, 8, 3):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        if kind == "masked":
            labels = torch.where(torch.rand(length, generator=g) < 0.5, ids, torch.full_like(ids, -100))
            labels[0] = ids[0]
        elif length == 7:
            labels[3] = -100  # a prompt token not trained on
        out.append((ids, labels))
    return out


def batches(kind: str):
    seqs = sequences(kind)
    return [collate(seqs[:2]), collate(seqs[2:3]), collate(seqs[3:])]


def predicted(kind, logits, labels):
    if kind == "causal":
        logits, labels = logits[:-1], labels[1:]
    keep = labels != -100
    return logits[keep], labels[keep]


class Tokens(nn.Module):
    """The oracle's outputs: the logits of every predicted token, each sequence run alone."""

    def __init__(self, lm, kind, seqs) -> None:
        super().__init__()
        self.lm, self.kind, self.seqs = lm, kind, seqs

    def forward(self, _x):
        return torch.cat(
            [predicted(self.kind, self.lm(ids[None]).logits[0], lab)[0] for ids, lab in self.seqs]
        )


class SequenceLoss(nn.Module):
    """The oracle's loss of one sequence alone: the mean over its predicted tokens."""

    def __init__(self, lm, kind, seq) -> None:
        super().__init__()
        self.lm, self.kind, self.seq = lm, kind, seq

    def forward(self, _x):
        ids, lab = self.seq
        z, y = predicted(self.kind, self.lm(ids[None]).logits[0], lab)
        return F.cross_entropy(z, y)


def oracles(model, kind, names=None, hessian=True):
    """(token-mean Hessian or None, GGN = Fisher, empirical Fisher), dense float64."""
    seqs = sequences(kind)
    prefixed = None if names is None else ["lm." + n for n in names]
    targets = torch.cat([predicted(kind, torch.zeros(len(ids), 1), lab)[1] for ids, lab in seqs])
    z, J = dense_jacobian_oracle(Tokens(model, kind, seqs), torch.zeros(1), prefixed)
    N = z.shape[0]
    p = torch.softmax(z, dim=1)
    Jt = J.reshape(N, VOCAB, -1)
    curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("tan,tab,tbm->nm", Jt, curv, Jt) / N
    hess = None
    if hessian:
        _, _, hess = dense_hessian_oracle(
            Tokens(model, kind, seqs),
            lambda out, y: F.cross_entropy(out, y),
            torch.zeros(1),
            targets,
            prefixed,
        )
    ef = 0
    for seq in seqs:
        n_i = len(predicted(kind, torch.zeros(len(seq[0]), 1), seq[1])[1])
        if n_i == 0:
            continue  # no predicted token: no loss, no weight
        _, g, _ = dense_hessian_oracle(
            SequenceLoss(model, kind, seq), lambda out, _y: out, torch.zeros(1), None, prefixed
        )
        ef = ef + (n_i / N) * torch.outer(g, g)
    return hess, ggn, ef


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_every_curvature_of_the_token_mean_loss_in_one_line(kind):
    model = TinyLM().double()
    data = batches(kind)
    before = snapshot(model)
    hess, ggn, ef = oracles(model, kind)
    expected = {"hessian": hess, "ggn": ggn, "fisher": ggn, "empirical_fisher": ef}
    for curvature, oracle in expected.items():
        op = curvature_operator(model, None, data, curvature=curvature, **lm_loss(kind))
        torch.testing.assert_close(op.dense(), oracle, rtol=1e-9, atol=1e-12, msg=curvature)
        top = hessian_topk(model, None, data, k=3, curvature=curvature, tol=1e-10, **lm_loss(kind))
        exact = torch.linalg.eigvalsh(oracle).flip(0)[:3]
        torch.testing.assert_close(top.eigenvalues, exact, rtol=1e-6, atol=0, msg=curvature)
    assert_untouched(model, before)


@pytest.mark.slow
def test_monte_carlo_fisher_through_lm_loss_approaches_the_token_mean_fisher():
    model = TinyLM(1).double()
    data = batches("causal")
    _, ggn, _ = oracles(model, "causal", hessian=False)
    mc = curvature_operator(
        model, None, data, curvature="fisher", mc_samples=3000, **lm_loss("causal")
    ).dense()
    assert float((mc - ggn).norm() / ggn.norm()) < 0.1


def test_the_old_snippet_without_shift_and_token_weights_is_another_matrix():
    """Why the one line matters: logits and labels flattened as they come (no shift, sequence
    weights) give a different GGN, while lm_loss gives the token-mean one."""
    model = TinyLM(2).double()
    data = batches("causal")
    _, ggn, _ = oracles(model, "causal", hessian=False)
    naive = curvature_operator(
        model,
        nn.CrossEntropyLoss(),
        data,
        curvature="ggn",
        batch_outputs=lambda m, b: (m(input_ids=b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten()),
    ).dense()
    assert float((naive - ggn).norm() / ggn.norm()) > 1e-2
    one_line = curvature_operator(model, None, data, curvature="ggn", **lm_loss("causal")).dense()
    torch.testing.assert_close(one_line, ggn, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_gpt2_ggn_through_lm_loss_matches_the_dense_oracle():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_embd=4, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).double().eval()
    names = ["transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight"]
    data = batches("causal")
    _, ggn, ef = oracles(model, "causal", names, hessian=False)
    for curvature, oracle in (("ggn", ggn), ("fisher", ggn), ("empirical_fisher", ef)):
        op = curvature_operator(model, None, data, curvature=curvature, params=names, **lm_loss("causal"))
        torch.testing.assert_close(op.dense(), oracle, rtol=1e-9, atol=1e-12, msg=curvature)
