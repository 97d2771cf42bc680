"""Effect measures against hand computations: on fixed numbers, and against per-prompt manual runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from probe.errors import SteerscopeError
from probe.zoo.specs import MODEL_SPECS
from steering.apply import steer
from steering.effects import (
    count_words,
    kl_from_logits,
    logprob_shift,
    mean_nll,
    next_token_kl,
    perplexity_ratio,
    target_logprob_shift,
    word_frequencies,
)
from steering.vectors import SteeringVector

TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}
SITE = "blocks.1.hook_resid_pre"
PROMPTS = ["The weather at Bath", "Mr. Darcy", "It is a truth universally acknowledged"]


@pytest.fixture(scope="module")
def model(noisy_tiny_dense):
    return noisy_tiny_dense


@pytest.fixture(scope="module")
def flat():
    torch.manual_seed(1)
    return SteeringVector.from_direction(torch.randn(64), SITE, 2.0)


def _logprobs(model, text, vecs=()):
    """Unpadded, one prompt at a time: log-probs at every position [T, V]."""
    with torch.no_grad(), steer(model, vecs, mode="prompt"):
        return model(model.to_tokens(text))[0].float().log_softmax(-1)


# --- the arithmetic on fixed numbers ---------------------------------------------------------------
def test_kl_by_hand():
    base, steered = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.25, 0.75]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert_close(kl_from_logits(base, steered), torch.tensor(expected), atol=1e-6, rtol=0)
    assert float(kl_from_logits(base, base)) == 0.0


def test_logprob_shift_by_hand():
    base = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]).log()
    steered = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.4, 0.5]]).log()
    expected = (math.log(0.5 / 0.25) + math.log(0.4 / 0.2)) / 2  # target token 1 in both rows
    assert logprob_shift(base, steered, [1]) == pytest.approx(expected, abs=1e-6)


def test_mean_nll_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    keep = torch.tensor([[False, True, True], [False, False, True]])
    assert mean_nll(lp, keep) == pytest.approx((2 + 3 + 6) / 3)
    with pytest.raises(SteerscopeError, match="no tokens"):
        mean_nll(lp, torch.zeros_like(keep))


def test_word_frequencies_by_hand():
    steered = ["The wedding was a wedding.", "Weddings, weddings!"]  # 7 words
    baseline = ["A walk in the park", "No wedding here at all"]  # 10 words
    counts, total = count_words(steered, ["wedding", "weddings"])
    assert counts == {"wedding": 2, "weddings": 2} and total == 7
    rows = {r.word: r for r in word_frequencies(steered, baseline, ["wedding", "park", "bride"])}
    assert (rows["wedding"].steered, rows["wedding"].baseline) == (2, 1)
    assert rows["wedding"].steered_per_1000 == pytest.approx(2000 / 7)
    assert rows["wedding"].baseline_per_1000 == pytest.approx(100.0)
    assert rows["wedding"].ratio == pytest.approx(20 / 7)
    assert rows["park"].ratio == 0.0 and math.isnan(rows["bride"].ratio)
    with pytest.raises(SteerscopeError, match="single words"):
        word_frequencies(steered, baseline, ["two words"])


# --- model-level measures against per-prompt manual runs --------------------------------------------
def test_next_token_kl_matches_manual(model, flat):
    kl = next_token_kl(model, PROMPTS, [flat])
    manual = torch.stack([kl_from_logits(_logprobs(model, p)[-1], _logprobs(model, p, [flat])[-1]) for p in PROMPTS])
    assert kl.shape == (3,) and bool((kl > 0).all())
    assert_close(kl, manual, atol=1e-4, rtol=1e-4)
    assert torch.equal(next_token_kl(model, PROMPTS, [flat.with_coeff(0.0)]), torch.zeros(3))


def test_target_logprob_shift_matches_manual(model, flat):
    targets = [" the", " and", model.to_single_token(" of")]
    ids = [model.to_single_token(" the"), model.to_single_token(" and"), targets[2]]
    shift = target_logprob_shift(model, PROMPTS, targets, [flat])
    manual = torch.stack([_logprobs(model, p, [flat])[-1, ids] - _logprobs(model, p)[-1, ids] for p in PROMPTS])
    assert shift == pytest.approx(float(manual.mean()), abs=1e-4)
    with pytest.raises(SteerscopeError, match="single token"):
        target_logprob_shift(model, PROMPTS, [" weddings constantly"], [flat])


def test_perplexity_ratio_masks_actadd_positions(model):
    v = SteeringVector.actadd(model, "Love", "Hate", layer=1, coeff=3.0)
    T = v.tensor.shape[0]
    texts = ["She walked into the room and sat down", "It is a truth universally acknowledged"]
    out = perplexity_ratio(model, texts, [v])
    nll_b, nll_s, n = 0.0, 0.0, 0
    for text in texts:
        tokens = model.to_tokens(text)[0]
        targets = tokens[T:]  # tokens at positions T.. (the injected positions 0..T-1 are left out)
        nll_b -= float(_logprobs(model, text)[T - 1:-1].gather(-1, targets[:, None]).sum())
        nll_s -= float(_logprobs(model, text, [v])[T - 1:-1].gather(-1, targets[:, None]).sum())
        n += len(targets)
    assert out.n_tokens == n
    assert out.ratio == pytest.approx(math.exp((nll_s - nll_b) / n), rel=1e-4)
    assert out.baseline == pytest.approx(math.exp(nll_b / n), rel=1e-4)
    assert perplexity_ratio(model, texts, [v], mask_injected=False).n_tokens == n + len(texts) * (T - 1)
    assert perplexity_ratio(model, texts, [v.with_coeff(0.0)]).ratio == 1.0
    # mask_next also leaves out token T, the one predicted from the last injected position
    down = perplexity_ratio(model, texts, [v], mask_next=True)
    nll_b, nll_s, n = 0.0, 0.0, 0
    for text in texts:
        targets = model.to_tokens(text)[0][T + 1:]
        nll_b -= float(_logprobs(model, text)[T:-1].gather(-1, targets[:, None]).sum())
        nll_s -= float(_logprobs(model, text, [v])[T:-1].gather(-1, targets[:, None]).sum())
        n += len(targets)
    assert down.n_tokens == n == out.n_tokens - len(texts)
    assert down.ratio == pytest.approx(math.exp((nll_s - nll_b) / n), rel=1e-4)


def test_effects_bad_inputs(model, flat):
    with pytest.raises(SteerscopeError, match="empty"):
        next_token_kl(model, [], [flat])
    with pytest.raises(SteerscopeError, match="no target"):
        target_logprob_shift(model, PROMPTS, [], [flat])
    long = SteeringVector.actadd(model, "I talk about weddings constantly", "Hate", layer=1)
    with pytest.raises(SteerscopeError, match="longer than the prompt"):
        perplexity_ratio(model, ["Mr. Darcy"], [long])


def test_coefficient_sweep_rows(model):
    import re
    from collections import Counter

    from steering.apply import generate
    from steering.effects import coefficient_sweep

    v = SteeringVector.actadd(model, "Love", "Hate", layer=1)
    prompts = ["The weather at Bath", "Mr. Darcy"]
    base = generate(model, [p for p in prompts for _ in range(2)], max_new_tokens=12, do_sample=True, temperature=1.0,
                    top_p=0.95, seed=0)  # what the sweep's baseline will be: count its commonest words
    common = [w for w, _ in Counter(re.findall(r"[a-z0-9]+", " ".join(base).lower())).most_common(3)]
    rows = coefficient_sweep(model, v, [0, 4], prompts, common,
                             ["It is a truth universally acknowledged that a single man"], samples=2, max_new_tokens=12)
    zero, four = rows
    # coefficient 0 reuses the baseline: every ratio is exactly 1 and the KL 0
    assert (zero.coeff, zero.freq_ratio, zero.ppl_ratio, zero.kl) == (0.0, 1.0, 1.0, 0.0)
    assert zero.topic_words == zero.baseline_words == four.baseline_words
    assert four.kl > 0 and four.ppl_ratio != 1.0
    if four.topic_words and four.baseline_words:
        assert four.freq_ratio_lo < four.freq_ratio < four.freq_ratio_hi
    with pytest.raises(SteerscopeError, match="empty"):
        coefficient_sweep(model, v, [1], [], ["the"], ["text"])
