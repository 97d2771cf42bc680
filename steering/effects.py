"""Measure what a steering intervention does: KL, target log-prob shift, off-target perplexity, words.

Every model-level measure runs the prompts once unsteered and once steered (prompt positions,
left-padded batch) and compares; the pure helpers below each do the arithmetic on tensors.

>>> kl = next_token_kl(model, ["The weather at Bath"], [v]).mean()
>>> ppl = perplexity_ratio(model, off_topic_texts, [v])           # ActAdd positions masked
>>> table = word_frequencies(steered_texts, baseline_texts, ["wedding", "weddings"])
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from steering.apply import check_vectors, left_pad, steer
from steering.vectors import SteeringVector

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class Perplexity(NamedTuple):
    ratio: float  # steered / baseline perplexity
    steered: float
    baseline: float
    n_tokens: int  # tokens scored (injected positions excluded)


class WordFreq(NamedTuple):
    word: str
    steered: int  # occurrences in the steered generations
    baseline: int
    steered_per_1000: float  # per 1000 words of the steered generations
    baseline_per_1000: float
    ratio: float  # steered_per_1000 / baseline_per_1000 (inf if only steered has it, nan if neither)


# --- pure arithmetic ---------------------------------------------------------------------------

def kl_from_logits(base: Tensor, steered: Tensor) -> Tensor:
    """KL(base || steered) over the last dimension, in nats: sum p_b (log p_b - log p_s)."""
    lb, ls = base.float().log_softmax(-1), steered.float().log_softmax(-1)
    return (lb.exp() * (lb - ls)).sum(-1)


def logprob_shift(base_logprobs: Tensor, steered_logprobs: Tensor, target_ids: Sequence[int]) -> float:
    """Mean over rows and targets of log p_steered(t) - log p_base(t); logprobs are [N, V]."""
    ids = torch.as_tensor(list(target_ids), dtype=torch.long, device=base_logprobs.device)
    return float((steered_logprobs[:, ids] - base_logprobs[:, ids]).mean())


def mean_nll(token_logprobs: Tensor, keep: Tensor) -> float:
    """Mean negative log-prob of the kept tokens (``keep`` a boolean mask of the same shape)."""
    if not bool(keep.any()):
        raise SteerscopeError("no tokens left to score (texts too short, or every position injected)")
    return float(-token_logprobs[keep].double().mean())


def count_words(texts: Sequence[str], words: Sequence[str]) -> tuple[dict[str, int], int]:
    """Occurrences of each word (case-insensitive, whole words) and the total number of words."""
    counts: Counter[str] = Counter()
    total = 0
    for text in texts:
        found = _WORD.findall(text.lower())
        total += len(found)
        counts.update(found)
    return {w: counts[w.lower()] for w in words}, total


# --- model-level measures ----------------------------------------------------------------------

def next_token_logprobs(model, prompts: Sequence[str], vectors: Sequence[SteeringVector] = (),
                        batch_size: int = 32) -> Tensor:
    """[N, V] next-token log-probs after each prompt, steered by ``vectors`` at the prompt positions."""
    rows = []
    for chunk in _chunks(prompts, batch_size):
        tokens, mask, pad_left = left_pad(model, chunk)
        with torch.no_grad(), steer(model, vectors, "prompt", prompt_len=tokens.shape[1], pad_left=pad_left):
            rows.append(model(tokens, attention_mask=mask)[:, -1].float().log_softmax(-1))
    return torch.cat(rows)


def next_token_kl(model, prompts: Sequence[str], vectors: Sequence[SteeringVector],
                  batch_size: int = 32) -> Tensor:
    """Per-prompt KL(unsteered || steered) of the next-token distribution on (neutral) prompts, [N]."""
    base = next_token_logprobs(model, prompts, (), batch_size)
    return kl_from_logits(base, next_token_logprobs(model, prompts, vectors, batch_size))


def target_logprob_shift(model, prompts: Sequence[str], targets: Sequence[str | int],
                         vectors: Sequence[SteeringVector], batch_size: int = 32) -> float:
    """Mean change in next-token log-prob of the ``targets`` (single tokens) after each prompt."""
    ids = [token_id(model, t) for t in targets]
    if not ids:
        raise SteerscopeError("no target tokens given")
    base = next_token_logprobs(model, prompts, (), batch_size)
    return logprob_shift(base, next_token_logprobs(model, prompts, vectors, batch_size), ids)


def perplexity_ratio(model, texts: Sequence[str], vectors: Sequence[SteeringVector],
                     mask_injected: bool = True, batch_size: int = 16, mask_next: bool = False) -> Perplexity:
    """Steered / unsteered perplexity on (off-target) ``texts``.

    With ``mask_injected`` the tokens at the positions a positional (ActAdd) vector is injected
    into (0..T-1) are left out of both losses (ActAdd's "mask_injection_logprob"); [d] vectors
    inject everywhere, so they exclude nothing. BOS is never scored. ``mask_next`` also leaves out token T,
    the one predicted *from* the last injected position, so only predictions made at un-injected positions
    (the steering's downstream effect through attention) are scored.
    """
    vectors = check_vectors(model, vectors, "prompt")
    T = max([v.tensor.shape[0] for v in vectors if v.positional] + [0])
    skip = max(T + int(mask_next and T > 0), 1) if mask_injected else 1
    base, steered, keeps = [], [], []
    for chunk in _chunks(texts, batch_size):
        tokens, mask, pad_left = left_pad(model, chunk)
        for out, vecs in ((base, ()), (steered, vectors)):
            with torch.no_grad(), steer(model, vecs, "prompt", prompt_len=tokens.shape[1], pad_left=pad_left):
                logits = model(tokens, attention_mask=mask)
            out.append(logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0].flatten())
        position = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :] - pad_left[:, None]
        keeps.append((position >= skip).flatten())
    keep = torch.cat(keeps)
    nll_b, nll_s = mean_nll(torch.cat(base), keep), mean_nll(torch.cat(steered), keep)
    return Perplexity(math.exp(nll_s - nll_b), math.exp(nll_s), math.exp(nll_b), int(keep.sum()))


def word_frequencies(steered: Sequence[str], baseline: Sequence[str], words: Sequence[str]) -> list[WordFreq]:
    """Counts and per-1000-word rates of ``words`` in steered vs baseline generations."""
    words = list(words)
    if not words:
        raise SteerscopeError("no words given to count")
    bad = [w for w in words if _WORD.fullmatch(w.lower()) is None]
    if bad:
        raise SteerscopeError(f"count single words only (letters, digits, one apostrophe); got {bad}")
    cs, ns = count_words(steered, words)
    cb, nb = count_words(baseline, words)
    rows = []
    for w in words:
        rs, rb = _rate(cs[w], ns), _rate(cb[w], nb)
        ratio = rs / rb if rb > 0 else (math.inf if rs > 0 else math.nan)
        rows.append(WordFreq(w, cs[w], cb[w], rs, rb, ratio))
    return rows


def _rate(count: int, total: int) -> float:
    return 1000.0 * count / total if total else 0.0


def token_id(model, target: str | int) -> int:
    """The id of a single-token string (or a checked id)."""
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < model.cfg.d_vocab:
            raise SteerscopeError(f"target token id {target} out of range (vocabulary {model.cfg.d_vocab})")
        return target
    try:
        return int(model.to_single_token(target))
    except (AssertionError, ValueError) as e:
        raise SteerscopeError(f"target {target!r} is not a single token; give single tokens or token ids") from e


def _chunks(items: Sequence[str], size: int):
    items = [items] if isinstance(items, str) else list(items)
    if not items:
        raise SteerscopeError("the prompt list is empty")
    return [items[i:i + size] for i in range(0, len(items), size)]


_SAMPLING = dict(do_sample=True, temperature=1.0, top_p=0.95)  # the sweeps' sampling, steered and unsteered alike


def unsteered_continuations(model, prompts: Sequence[str], samples: int = 4, max_new_tokens: int = 40,
                             seed: int = 0) -> list[str]:
    """The unsteered continuations ``coefficient_sweep`` compares against (same sampling settings)."""
    from steering.apply import generate

    batch = [p for p in ([prompts] if isinstance(prompts, str) else prompts) for _ in range(samples)]
    return generate(model, batch, max_new_tokens=max_new_tokens, seed=seed, **_SAMPLING)


class SweepRow(NamedTuple):
    coeff: float
    topic_words: int  # topic-word occurrences in the steered continuations
    baseline_words: int  # ... in the unsteered ones (the same prompts and seed)
    freq_ratio: float  # steered / unsteered rate of topic words per word
    freq_ratio_lo: float  # the ratio's ~95% band from Poisson counts: exp(log r -/+ 2 sqrt(1/s + 1/b))
    freq_ratio_hi: float
    ppl_ratio: float  # off-target perplexity ratio, injected positions masked
    kl: float  # mean next-token KL on the prompts


def coefficient_sweep(model, vector: SteeringVector, coeffs: Sequence[float], prompts: Sequence[str],
                      words: Sequence[str], off_target: Sequence[str], samples: int = 4, max_new_tokens: int = 40,
                      seed: int = 0, mode: str | None = None, baseline: Sequence[str] | None = None) -> list[SweepRow]:
    """ActAdd-style evaluation of ``vector`` at each coefficient: topic-word frequency ratio in sampled
    continuations (``samples`` per prompt, temperature 1, top-p 0.95, same seed for every row), off-target
    perplexity ratio, and next-token KL on the prompts. ``mode`` defaults to "prompt" for positional
    (ActAdd) vectors and "all" for [d] vectors. ``baseline``: the unsteered continuations of an earlier sweep
    with the same prompts, samples, length and seed (``unsteered_continuations``), to skip generating them again."""
    from steering.apply import generate

    prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
    if not prompts:
        raise SteerscopeError("the prompt list is empty")
    if not coeffs:
        raise SteerscopeError("no coefficients to sweep")
    mode = mode or ("prompt" if vector.positional else "all")
    batch = [p for p in prompts for _ in range(samples)]
    kw = dict(max_new_tokens=max_new_tokens, seed=seed, **_SAMPLING)
    if baseline is None:
        baseline = unsteered_continuations(model, prompts, samples, max_new_tokens, seed)
    elif len(baseline) != len(batch):
        raise SteerscopeError(f"baseline holds {len(baseline)} continuations; {len(prompts)} prompts x {samples} "
                              f"samples need {len(batch)}")
    base_counts, base_total = count_words(baseline, words)
    b = sum(base_counts.values())
    rows = []
    for c in coeffs:
        v = vector.with_coeff(float(c))
        texts = baseline if c == 0 else generate(model, batch, steer=[v], mode=mode, **kw)
        counts, total = count_words(texts, words)
        s = sum(counts.values())
        rs, rb = _rate(s, total), _rate(b, base_total)
        ratio = rs / rb if rb > 0 else (math.inf if rs > 0 else math.nan)
        band = 2 * math.sqrt(1 / s + 1 / b) if s and b else math.nan
        lo, hi = (ratio * math.exp(-band), ratio * math.exp(band)) if math.isfinite(band) else (math.nan, math.nan)
        ppl = perplexity_ratio(model, off_target, [v]).ratio
        kl = float(next_token_kl(model, prompts, [v]).mean())
        rows.append(SweepRow(float(c), s, b, ratio, lo, hi, ppl, kl))
    return rows
