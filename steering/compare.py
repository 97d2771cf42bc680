"""Compare steering directions at matched KL, scored by the log-prob gain of concept tokens.

Protocol (after the causal steering evaluation of Shafran, Geiger, Geva, "Decomposing MLP activations
into interpretable features via semi-NMF"):

1. every direction is scaled to unit norm and added at every prompt position of its site;
2. for each target KL, its coefficient is found by bisection so that the mean next-token
   KL(unsteered || steered) over *calibration* prompts hits the target (to ``rtol``);
3. at that coefficient it is scored on separate *evaluation* prompts by the concept gain
   ``mean_p [log sum_{t in C} p_steered(t | p) - log sum_{t in C} p_base(t | p)]`` (nats): how much more
   probability mass the next token puts on the concept's tokens C.

Matching KL puts directions of different origins (an SAE decoder row, an SNMF feature, a
diff-in-means vector) on one budget of "how much the model's predictions move", so the gain says
how much of that movement goes to the concept.

Choosing the directions (:func:`concept_positions`, :func:`select_feature`, :func:`diff_in_means`):
a position is *positive* when the next token is in C. The diff-in-means vector is the mean site
activation at positive positions minus that at the others; a dictionary's feature for the concept
is the one whose code separates positive from other positions best (Cohen's d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from steering.effects import kl_from_logits, next_token_logprobs
from steering.vectors import SteeringVector


class Matched(NamedTuple):
    """One direction at one target KL."""

    name: str
    target_kl: float
    coeff: float  # the coefficient of the unit-norm direction
    kl: float  # mean KL on the calibration prompts at ``coeff``
    eval_kl: float  # mean KL on the evaluation prompts
    gain: float  # concept log-mass gain on the evaluation prompts (nats), mean over prompts
    gain_se: float  # its standard error over the evaluation prompts


def unit(v: SteeringVector) -> SteeringVector:
    """``v`` scaled to unit norm (coefficient 1); positional (ActAdd) vectors are refused."""
    if v.positional:
        raise SteerscopeError("matched-KL comparison needs [d] directions, not positional (ActAdd) vectors")
    norm = float(v.tensor.float().norm())
    if norm == 0:
        raise SteerscopeError(f"the direction at {v.site} is zero")
    return SteeringVector(v.site, v.tensor.float() / norm, 1.0, dict(v.provenance))


def concept_logmass(logprobs: Tensor, concept_ids: Sequence[int]) -> Tensor:
    """log sum_{t in C} p(t) per row of ``logprobs [N, V]``."""
    ids = torch.as_tensor(list(concept_ids), dtype=torch.long, device=logprobs.device)
    if ids.numel() == 0:
        raise SteerscopeError("no concept tokens given")
    return logprobs[:, ids].logsumexp(-1)


def calibrate(model, v: SteeringVector, target_kl: float, prompts: Sequence[str], base: Tensor | None = None,
              rtol: float = 0.02, max_iter: int = 40, max_coeff: float = 1e4) -> tuple[float, float]:
    """Coefficient c >= 0 with mean KL(base || steered by c * v) within ``rtol`` of ``target_kl``.

    Doubling from c = 1 brackets the target, then bisection (geometric) narrows it. Returns
    ``(c, kl)``; raises if even ``max_coeff`` stays below the target. ``base`` are the unsteered
    next-token log-probs of ``prompts`` (computed if not given).
    """
    if not target_kl > 0:
        raise SteerscopeError(f"target KL must be positive, got {target_kl}")
    if base is None:
        base = next_token_logprobs(model, prompts)

    def kl(c: float) -> float:
        return float(kl_from_logits(base, next_token_logprobs(model, prompts, [v.with_coeff(c)])).mean())

    lo, hi = 0.0, 1.0
    k_hi = kl(hi)
    while k_hi < target_kl:
        lo, hi = hi, hi * 2
        if hi > max_coeff:
            raise SteerscopeError(f"KL stays below {target_kl} up to coefficient {max_coeff:g} for the direction at "
                                  f"{v.site}")
        k_hi = kl(hi)
    best = (hi, k_hi)
    for _ in range(max_iter):
        if abs(best[1] - target_kl) <= rtol * target_kl:
            break
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        k_mid = kl(mid)
        if abs(k_mid - target_kl) < abs(best[1] - target_kl):
            best = (mid, k_mid)
        lo, hi = (mid, hi) if k_mid < target_kl else (lo, mid)
    return best


def compare_at_matched_kl(model, vectors: dict[str, SteeringVector], concept_ids: Sequence[int],
                          calib_prompts: Sequence[str], eval_prompts: Sequence[str],
                          kl_targets: Sequence[float] = (0.05, 0.1, 0.25, 0.5), rtol: float = 0.02) -> list[Matched]:
    """Each (unit-normed) vector at each target KL: its coefficient and concept gain; see the module doc."""
    if not vectors:
        raise SteerscopeError("no vectors to compare")
    base_cal = next_token_logprobs(model, calib_prompts)
    base_eval = next_token_logprobs(model, eval_prompts)
    mass_base = concept_logmass(base_eval, concept_ids)
    rows = []
    for name, v in vectors.items():
        u = unit(v)
        for target in kl_targets:
            c, k = calibrate(model, u, target, calib_prompts, base_cal, rtol=rtol)
            lp = next_token_logprobs(model, eval_prompts, [u.with_coeff(c)])
            gains = (concept_logmass(lp, concept_ids) - mass_base).double()
            se = float(gains.std() / math.sqrt(len(gains))) if len(gains) > 1 else float("nan")
            rows.append(Matched(name, target, c, k, float(kl_from_logits(base_eval, lp).mean()), float(gains.mean()), se))
    return rows


def figure(rows: Sequence[Matched], title: str = "Concept gain at matched KL"):
    """A plotly chart: concept gain against KL, one line per direction."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name in dict.fromkeys(r.name for r in rows):
        rs = [r for r in rows if r.name == name]
        fig.add_trace(go.Scatter(x=[r.target_kl for r in rs], y=[r.gain for r in rs], mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title="next-token KL on calibration prompts (nats)", xaxis_type="log",
                      yaxis_title="concept log-mass gain (nats)", height=420)
    return fig


# --- choosing directions for a concept ---------------------------------------------------------

def concept_positions(tokens: Tensor, concept_ids: Sequence[int]) -> Tensor:
    """Boolean [B, T]: the next token is a concept token (the last position has no next token: False)."""
    ids = torch.as_tensor(list(concept_ids), dtype=torch.long, device=tokens.device)
    out = torch.zeros_like(tokens, dtype=torch.bool)
    out[:, :-1] = torch.isin(tokens[:, 1:], ids)
    return out


class Contrast:
    """Streaming per-column statistics of rows ``x [n, F]`` split by ``C`` boolean labels ``[n, C]``.

    Sums and sums of squares are kept in fp64 for the positives of each label and for all rows, so
    memory is ``O(C * F)`` however many rows stream through.
    """

    def __init__(self) -> None:
        self.n = 0
        self.n_pos: Tensor | None = None
        self.pos_sum = self.pos_sq = self.sum = self.sq = None

    def update(self, x: Tensor, labels: Tensor) -> None:
        x, lab = x.detach().double().reshape(-1, x.shape[-1]), labels.double().reshape(-1, labels.shape[-1])
        if x.shape[0] != lab.shape[0]:
            raise SteerscopeError(f"{x.shape[0]} rows but {lab.shape[0]} label rows")
        parts = (lab.sum(0), lab.T @ x, lab.T @ (x * x), x.sum(0), (x * x).sum(0))
        if self.n_pos is None:
            self.n_pos, self.pos_sum, self.pos_sq, self.sum, self.sq = parts
        else:
            for name, part in zip(("n_pos", "pos_sum", "pos_sq", "sum", "sq"), parts, strict=True):
                getattr(self, name).add_(part)
        self.n += x.shape[0]

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        if self.n_pos is None:
            raise SteerscopeError("no rows seen")
        n_pos = self.n_pos[:, None]
        n_neg = self.n - n_pos
        if bool((n_pos < 2).any()) or bool((n_neg < 2).any()):
            raise SteerscopeError(f"every label needs at least 2 positive and 2 other rows (positives: "
                                  f"{self.n_pos.long().tolist()} of {self.n})")
        neg_sum, neg_sq = self.sum - self.pos_sum, self.sq - self.pos_sq
        return n_pos, n_neg, self.pos_sum / n_pos, neg_sum / n_neg, self.pos_sq, neg_sq

    def mean_diff(self) -> Tensor:
        """[C, F]: mean over positive rows minus mean over the other rows (diff-in-means)."""
        _, _, mean_pos, mean_neg, _, _ = self._split()
        return (mean_pos - mean_neg).float()

    def cohens_d(self) -> Tensor:
        """[C, F]: mean difference over the pooled sd (unbiased variances); 0 where the sd is 0."""
        n_pos, n_neg, mean_pos, mean_neg, pos_sq, neg_sq = self._split()
        var_pos = ((pos_sq - n_pos * mean_pos**2) / (n_pos - 1)).clamp_min(0)
        var_neg = ((neg_sq - n_neg * mean_neg**2) / (n_neg - 1)).clamp_min(0)
        pooled = ((var_pos + var_neg) / 2).sqrt()
        scale = mean_pos.abs().maximum(mean_neg.abs())
        ok = pooled > 1e-12 * scale.clamp_min(1e-300)
        return torch.where(ok, (mean_pos - mean_neg) / pooled.where(ok, torch.ones_like(pooled)), 0.0).float()


# --- the whole comparison for a model, an SAE and an SNMF --------------------------------------

AUSTEN_CONCEPTS: dict[str, list[str]] = {
    "family": ["sister", "mother", "father", "brother", "aunt", "uncle", "daughter", "cousin"],
    "money": ["money", "fortune", "pounds", "income", "rich", "thousand"],
    "marriage": ["marry", "married", "marriage", "wedding", "engaged", "engagement"],
    "time of day": ["morning", "evening", "night", "dinner", "breakfast"],
    "happiness": ["happy", "happiness", "pleasure", "delight", "joy"],
    "letters": ["letter", "letters", "write", "wrote", "note"],
}
"""Concepts the Austen novels talk about, each as words whose ' word' form is one token."""


class ConceptResult(NamedTuple):
    concept: str
    words: list[str]  # the words kept (single tokens)
    features: dict[str, tuple[int, float]]  # dictionary name -> (chosen feature, its Cohen's d)
    rows: list[Matched]


def concept_token_ids(model, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of ``' ' + word`` for the words that are single tokens, and those words."""
    from steering.effects import token_id

    ids, kept = [], []
    for w in words:
        try:
            ids.append(token_id(model, " " + w.strip()))
            kept.append(w.strip())
        except SteerscopeError:
            continue
    return ids, kept


def check_disjoint(**splits: Sequence[str]) -> None:
    """Refuse splits (name=texts) that share a document: each step of the protocol needs data of its own."""
    docs = {name: {t.strip() for t in texts if t.strip()} for name, texts in splits.items()}
    names = list(docs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = docs[a] & docs[b]
            if shared:
                raise SteerscopeError(f"the {a} and {b} texts share {len(shared)} document(s): features are chosen, KL "
                                      "calibrated and gains scored on three disjoint splits (e.g. the corpus's train, "
                                      "val and test)")


def window_prompts(model, texts: Sequence[str], n: int, n_ctx: int = 32) -> list[str]:
    """``n`` text windows of ``n_ctx - 1`` tokens, evenly spaced through ``texts``, as strings."""
    from probe.tokens import pack_texts

    tok = model.tokenizer
    rows = pack_texts(model, list(texts), n_ctx)
    if len(rows) < n:
        raise SteerscopeError(f"the texts give only {len(rows)} windows of {n_ctx} tokens, {n} wanted")
    pick = torch.linspace(0, len(rows) - 1, n).round().long()
    return [tok.decode(rows[i, 1:].tolist()) for i in pick.tolist()]


@torch.no_grad()
def concept_comparison(model, dictionaries: dict[str, object], concepts: dict[str, Sequence[str]],
                       select_texts: Sequence[str], calib_texts: Sequence[str], eval_texts: Sequence[str],
                       dim_site: str, kl_targets: Sequence[float] = (0.05, 0.1, 0.25, 0.5),
                       n_select: int = 256, n_prompts: int = 64, random_control: bool = True, seed: int = 0,
                       progress: bool = True) -> list[ConceptResult]:
    """Diff-in-means at ``dim_site`` against the best feature of each dictionary, per concept, at matched KL.

    With ``random_control`` a random direction at ``dim_site`` (seeded by ``seed`` and the concept's
    position) runs the same protocol: the gain that spending the KL budget in no particular direction buys.

    Features and the diff-in-means vector are chosen on ``n_select`` 128-token contexts evenly spaced through
    ``select_texts`` (BOS and last positions left out); KL is calibrated on windows of ``calib_texts``
    and the concept gain scored on windows of ``eval_texts``. The three must be disjoint (no document in two
    of them; checked): choosing, calibrating and scoring on the same text would reward directions fitted to it.
    """
    from tqdm.auto import tqdm

    from probe.hooks import capture
    from probe.sites import resolve_one
    from probe.tokens import pack_texts

    bad = [t for t in kl_targets if not (isinstance(t, int | float) and math.isfinite(t) and t > 0)]
    if bad or not kl_targets:
        raise SteerscopeError(f"KL targets must be positive finite numbers of nats, got {list(kl_targets)}")
    if min(n_select, n_prompts) < 1:
        raise SteerscopeError(f"n_select and n_prompts must be >= 1, got {n_select} and {n_prompts}")
    check_disjoint(selection=select_texts, calibration=calib_texts, evaluation=eval_texts)
    ids, words = {}, {}
    for name, ws in concepts.items():
        ids[name], words[name] = concept_token_ids(model, ws)
        if not ids[name]:
            raise SteerscopeError(f"concept {name!r}: none of {list(ws)} is a single token (' word') for this model")
    dim_site = resolve_one(model, dim_site)
    sites = {name: resolve_one(model, d.cfg.site) for name, d in dictionaries.items()}
    contexts = pack_texts(model, list(select_texts), 128)
    if len(contexts) > n_select:
        contexts = contexts[torch.linspace(0, len(contexts) - 1, n_select).round().long()]
    stats = {name: Contrast() for name in [*dictionaries, dim_site]}
    for batch in tqdm(contexts.split(16), desc="feature statistics", disable=not progress):
        labels = torch.stack([concept_positions(batch, ids[c]) for c in concepts], -1)[:, 1:-1]
        with capture(model, sorted({dim_site, *sites.values()})) as acts:
            model(batch)
        stats[dim_site].update(acts[dim_site][:, 1:-1], labels)
        for name, d in dictionaries.items():
            stats[name].update(d.encode(acts[sites[name]][:, 1:-1].float()), labels)
    means = stats[dim_site].mean_diff()
    effect = {name: stats[name].cohens_d() for name in dictionaries}
    calib = window_prompts(model, calib_texts, n_prompts)
    evals = window_prompts(model, eval_texts, n_prompts)
    results = []
    for c, concept in enumerate(tqdm(concepts, desc="concepts", disable=not progress)):
        vectors = {"diff-in-means": SteeringVector.from_direction(means[c], dim_site)}
        chosen = {}
        for name, d in dictionaries.items():
            i = int(effect[name][c].argmax())
            chosen[name] = (i, float(effect[name][c, i]))
            vectors[name] = SteeringVector.from_feature(d, i, model=model)
        if random_control:
            gen = torch.Generator().manual_seed(seed + c)
            vectors["random direction"] = SteeringVector.from_direction(torch.randn(means.shape[1], generator=gen),
                                                                        dim_site)
        rows = compare_at_matched_kl(model, vectors, ids[concept], calib, evals, kl_targets)
        results.append(ConceptResult(concept, words[concept], chosen, rows))
    return results
