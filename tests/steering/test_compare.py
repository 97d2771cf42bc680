"""Matched-KL comparison: streaming statistics against direct formulas, calibration hits its target, and the
concept gain ranks a direction that writes the concept's unembedding above random directions."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from probe.errors import SteerscopeError
from probe.zoo.specs import MODEL_SPECS
from steering.compare import (
    Contrast,
    calibrate,
    check_disjoint,
    compare_at_matched_kl,
    concept_comparison,
    concept_logmass,
    concept_positions,
    concept_token_ids,
    unit,
)
from steering.effects import kl_from_logits, next_token_logprobs
from steering.vectors import SteeringVector

TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}
PROMPTS = ["The weather at Bath", "Mr. Darcy said", "It is a truth universally acknowledged", "She wrote a letter",
           "They walked to the village", "Her mother was"]
EVAL = ["Elizabeth smiled and", "The ball was", "A young man of", "Sir Walter had"]


@pytest.fixture(scope="module")
def model(noisy_tiny_dense):
    return noisy_tiny_dense


def test_contrast_matches_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=gen) * torch.arange(1, 8) + 3.0
    labels = torch.rand(500, 3, generator=gen) < torch.tensor([0.1, 0.5, 0.9])
    c = Contrast()
    for xs, ls in zip(x.split(64), labels.split(64), strict=True):  # streamed in chunks
        c.update(xs, ls)
    for j in range(3):
        a, b = x[labels[:, j]].double(), x[~labels[:, j]].double()
        assert_close(c.mean_diff()[j], (a.mean(0) - b.mean(0)).float(), rtol=1e-5, atol=1e-5)
        d = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / 2).sqrt()
        assert_close(c.cohens_d()[j], d.float(), rtol=1e-5, atol=1e-5)


def test_contrast_constant_column_and_too_few_rows():
    c = Contrast()
    x = torch.ones(10, 2)
    x[:, 1] = torch.arange(10.0)
    labels = (torch.arange(10) < 5)[:, None]
    c.update(x, labels)
    d = c.cohens_d()[0]
    assert d[0] == 0 and d[1] < 0  # constant column: 0; positives are the small values
    c2 = Contrast()
    c2.update(x, (torch.arange(10) < 1)[:, None])
    with pytest.raises(SteerscopeError, match="at least 2 positive"):
        c2.cohens_d()


def test_concept_positions_and_logmass():
    tokens = torch.tensor([[0, 5, 7, 5, 9]])
    assert concept_positions(tokens, [5]).tolist() == [[True, False, True, False, False]]
    lp = torch.log_softmax(torch.randn(3, 11), -1)
    assert_close(concept_logmass(lp, [2, 4]), (lp[:, 2].exp() + lp[:, 4].exp()).log())


def test_concept_token_ids_keep_single_tokens(model):
    ids, kept = concept_token_ids(model, ["the", "xqzjvwpk"])
    assert kept == ["the"] and ids == [model.to_single_token(" the")]


def test_unit_refuses_positional_and_zero():
    with pytest.raises(SteerscopeError, match="positional"):
        unit(SteeringVector("blocks.0.hook_resid_pre", torch.ones(2, 4)))
    with pytest.raises(SteerscopeError, match="zero"):
        unit(SteeringVector("blocks.0.hook_resid_pre", torch.zeros(4)))
    assert float(unit(SteeringVector("blocks.0.hook_resid_pre", torch.full((4,), 3.0))).tensor.norm()) == pytest.approx(1)


@pytest.mark.parametrize("target", [0.02, 0.2])
def test_calibrate_hits_the_target_kl(model, target):
    gen = torch.Generator().manual_seed(1)
    v = unit(SteeringVector("blocks.1.hook_resid_pre", torch.randn(64, generator=gen)))
    c, kl = calibrate(model, v, target, PROMPTS, rtol=0.02)
    assert abs(kl - target) <= 0.02 * target
    base = next_token_logprobs(model, PROMPTS)
    again = float(kl_from_logits(base, next_token_logprobs(model, PROMPTS, [v.with_coeff(c)])).mean())
    assert again == pytest.approx(kl, rel=1e-5)  # the reported KL is the KL at that coefficient


def test_calibrate_refuses_an_unreachable_target(model):
    v = unit(SteeringVector("blocks.1.hook_resid_pre", torch.randn(64)))
    with pytest.raises(SteerscopeError, match="stays below"):
        calibrate(model, v, 1e9, PROMPTS, max_coeff=64)


def test_unembedding_direction_beats_random_directions_at_matched_kl(model):
    """Adding W_U[:, t] to the last residual stream raises the concept's log-mass more than random directions
    that move the prediction just as much; the measure could rank them the other way."""
    site = f"blocks.{TINY['n_layers'] - 1}.hook_resid_post"
    concept = [int(model.to_single_token(w)) for w in (" letter", " mother")]
    toward = model.W_U[:, concept].sum(1).detach()
    gen = torch.Generator().manual_seed(0)
    vectors = {"unembed": SteeringVector(site, toward)}
    vectors |= {f"random{i}": SteeringVector(site, torch.randn(64, generator=gen)) for i in range(3)}
    rows = compare_at_matched_kl(model, vectors, concept, PROMPTS, EVAL, kl_targets=(0.1,))
    assert all(abs(r.kl - 0.1) <= 0.002 for r in rows)
    gains = {r.name: r.gain for r in rows}
    assert gains["unembed"] > 0.2 and gains["unembed"] > max(g for n, g in gains.items() if n != "unembed") + 0.1


def test_selection_calibration_and_scoring_must_be_disjoint(model):
    docs = [f"Chapter {i}. " + " ".join(["the letter came"] * 40) for i in range(6)]
    check_disjoint(a=docs[:2], b=docs[2:4], c=docs[4:])
    with pytest.raises(SteerscopeError, match="the calibration and evaluation texts share 1 document"):
        concept_comparison(model, {}, {"letters": ["letter"]}, docs[:2], docs[2:5], docs[4:], "blocks.1.hook_resid_post",
                           progress=False)
    with pytest.raises(SteerscopeError, match="the selection and calibration texts share 2 document"):
        concept_comparison(model, {}, {"letters": ["letter"]}, docs[:2], docs[:2], docs[4:], "blocks.1.hook_resid_post",
                           progress=False)
