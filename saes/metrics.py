"""Dictionary metrics: sparsity, reconstruction, latent health, and downstream CE-loss / KL scores.

Notation: x [N, d] are the dictionary's inputs (for a transcoder: its targets), x_hat the
reconstruction (prediction), f [N, d_sae] the codes, mean_x the per-dimension mean of x over the N
evaluated tokens.

- ``L0 = mean_n #{i : f_ni != 0}``.
- ``FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean_x||^2`` (centred: the denominator is the total
  variance, not ``sum_n ||x_n||^2``, which would overstate EV for activations with a large mean, as
  residual streams have); ``explained_variance = 1 - FVU``.
- dead fraction: latents that never fired on the evaluated tokens; dense fraction: latents firing on
  more than ``dense_threshold`` (default 10%) of them.
- ``ce_score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)``: 1 = splicing the reconstruction
  in costs nothing, 0 = as bad as ablating the site. ``kl_score = (KL_ablated - KL_spliced) / KL_ablated``
  with ``KL = sum_v p_clean (log p_clean - log p)``. CE and KL are means over every predicted position.
- Splicing replaces the site's activation (a transcoder: the *target* site's, with the prediction
  made from the input site's clean activation) by the dictionary's output. Ablation replaces it with
  zeros (``ablation="zero"``, the default) or with its mean over the evaluated tokens (``"mean"``).
  Position 0 (BOS) is never spliced or ablated: its activations are outliers that stores exclude by
  default; the scores are unaffected because that position's terms are equal in all runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from probe.hooks import capture, hooks
from probe.sites import all_sites, resolve_one

Ablation = Literal["zero", "mean"]


# ---------------------------------------------------------------- batch metrics
def l0(codes: Tensor) -> Tensor:
    """Mean number of nonzero codes per token (a 0-d tensor); ``codes`` dense or sparse COO."""
    if codes.is_sparse:
        return (codes._values() != 0).float().sum() / codes.shape[0]
    return (codes != 0).float().sum(-1).mean()


def fired(codes: Tensor) -> Tensor:
    """Boolean [d_sae]: which latents are nonzero on at least one row; ``codes`` dense or sparse COO."""
    if codes.is_sparse:
        out = torch.zeros(codes.shape[1], dtype=torch.bool, device=codes.device)
        out[codes._indices()[1][codes._values() != 0]] = True
        return out
    return (codes != 0).any(0)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Centred fraction of variance unexplained of one batch (float64 0-d tensor).

    ``FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean_x||^2``, mean over the batch per dimension.
    """
    x, x_hat = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x.shape[-1]).double()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """``1 - fvu(x, x_hat)`` (centred)."""
    return 1.0 - fvu(x, x_hat)


def dead_fraction(fire_counts: Tensor) -> float:
    """Fraction of latents that never fired (``fire_counts[i]``: tokens on which latent i was nonzero)."""
    return float((fire_counts == 0).float().mean())


def dense_fraction(fire_counts: Tensor, n_tokens: int, threshold: float = 0.1) -> float:
    """Fraction of latents firing on more than ``threshold`` of ``n_tokens`` tokens."""
    return float((fire_counts.double() / max(n_tokens, 1) > threshold).float().mean())


class ReconStats:
    """Running centred FVU over many batches (float64; per-dimension mean and M2 merged as in Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.sse = 0, 0.0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor, x_hat: Tensor) -> ReconStats:
        x, x_hat = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x.shape[-1]).double().to(x.device)
        b_n, b_mean = len(x), x.mean(0)
        b_m2 = (x - b_mean).pow(2).sum(0)
        self.sse += float((x - x_hat).pow(2).sum())
        if self.mean is None:
            self.mean, self.m2 = b_mean, b_m2
        else:
            total = self.n + b_n
            delta = b_mean - self.mean
            self.mean = self.mean + delta * (b_n / total)
            self.m2 = self.m2 + b_m2 + delta.pow(2) * (self.n * b_n / total)
        self.n += b_n
        return self

    @property
    def fvu(self) -> float:
        return self.sse / max(float(self.m2.sum()), 1e-30) if self.m2 is not None else math.nan


class EvalStats:
    """What :func:`evaluate` collects from the spliced run: reconstruction, L0, firing counts."""

    def __init__(self, d_sae: int):
        self.recon = ReconStats()
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.n, self.nonzero = 0, 0

    def update(self, goal: Tensor, recon: Tensor, codes: Tensor) -> None:
        nz = codes != 0
        self.recon.update(goal, recon)
        self.fires += nz.sum(0).cpu()
        self.n += len(codes)
        self.nonzero += int(nz.sum())

    def summary(self, dense_threshold: float = 0.1) -> dict[str, float]:
        f = self.recon.fvu
        return {"l0": self.nonzero / max(self.n, 1), "fvu": f, "explained_variance": 1.0 - f,
                "dead_frac": dead_fraction(self.fires), "dense_frac": dense_fraction(self.fires, self.n, dense_threshold)}


# ---------------------------------------------------------------- splicing
@torch.no_grad()
def ce_kl_scores(model, dictionary, tokens: Tensor, site: str | None = None, target_site: str | None = None,
                 ablation: Ablation = "zero", batch_size: int = 8, stats: EvalStats | None = None) -> dict[str, Any]:
    """CE losses (clean, spliced, ablated), KL divergences to the clean run, and the two scores.

    ``tokens`` [n_contexts, n_ctx] start with BOS. ``site``/``target_site`` default to the dictionary's
    config; a transcoder's output replaces ``target_site``. See the module docstring for definitions.
    """
    if ablation not in ("zero", "mean"):
        raise SteerscopeError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    site, target = _sites(model, dictionary, site, target_site)
    tokens = _check_tokens(tokens)
    fill = _mean_activation(model, tokens, target, batch_size) if ablation == "mean" else None
    sums = dict.fromkeys(("ce_loss_clean", "ce_loss_spliced", "ce_loss_ablated", "kl_spliced", "kl_ablated"), 0.0)
    n = 0
    for batch in tokens.split(batch_size):
        clean = _logprobs(model, batch, [])
        runs = {"spliced": _logprobs(model, batch, _splice_hooks(dictionary, site, target, stats)),
                "ablated": _logprobs(model, batch, [(target, _ablate_hook(fill))])}
        nxt = batch[:, 1:].unsqueeze(-1)
        sums["ce_loss_clean"] -= float(clean.gather(-1, nxt).sum())
        for name, lp in runs.items():
            sums[f"ce_loss_{name}"] -= float(lp.gather(-1, nxt).sum())
            sums[f"kl_{name}"] += float((clean.exp() * (clean - lp)).sum())
        n += nxt.numel()
    m = {k: v / n for k, v in sums.items()}
    d_ce = m["ce_loss_ablated"] - m["ce_loss_clean"]
    m["ce_score"] = (m["ce_loss_ablated"] - m["ce_loss_spliced"]) / d_ce if d_ce else math.nan
    m["kl_score"] = (m["kl_ablated"] - m["kl_spliced"]) / m["kl_ablated"] if m["kl_ablated"] else math.nan
    return {**m, "ablation": ablation, "site": site, "target_site": target if target != site else None,
            "n_tokens_scored": n}


def _sites(model, dictionary, site: str | None, target_site: str | None) -> tuple[str, str]:
    site = site or dictionary.cfg.site
    if site is None:
        raise SteerscopeError("which site? pass site= (the dictionary's config names none)")
    site = resolve_one(model, site)
    target = resolve_one(model, target_site or dictionary.cfg.target_site or site)
    order = all_sites(model)
    if order.index(target) < order.index(site):
        raise SteerscopeError(f"target site {target} runs before the input site {site}; a transcoder predicts a later site")
    return site, target


def _check_tokens(tokens: Any) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64) or tokens.shape[1] < 2:
        raise SteerscopeError(f"tokens must be integer ids [n_contexts, n_ctx >= 2], got {tokens.dtype} {tuple(tokens.shape)}")
    return tokens.long()


def _logprobs(model, batch: Tensor, fwd: list) -> Tensor:
    """Log-probabilities [B, T-1, vocab] of the next token at every position but the last."""
    with hooks(model, fwd):
        logits = model(batch.to(model.cfg.device))
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def _splice_hooks(dictionary, site: str, target: str, stats: EvalStats | None) -> list:
    """Hooks that replace ``target``'s activation (positions >= 1) by the dictionary's output on ``site``'s."""
    seen: dict[str, Tensor] = {}
    p = next(dictionary.parameters())
    d_in, d_out = dictionary.cfg.d_in, dictionary.cfg.d_out

    def grab(t: Tensor, hook) -> None:
        seen["x"] = t

    def replace(t: Tensor, hook) -> Tensor:
        x = seen.pop("x") if target != site else t
        if x[0, 0].numel() != d_in or t[0, 0].numel() != d_out:
            raise SteerscopeError(f"site {site} has width {x[0, 0].numel()} (target {t[0, 0].numel()}); the dictionary "
                                  f"expects d_in={d_in}, d_out={d_out}")
        goal = t[:, 1:].reshape(-1, d_out).to(p)
        x_in = x[:, 1:].reshape(-1, d_in).to(p)
        out = dictionary(x_in, goal) if target != site else dictionary(x_in)
        if stats is not None:
            stats.update(goal, out.recon, out.codes)
        new = t.clone()
        new[:, 1:] = out.recon.reshape(t[:, 1:].shape).to(t)
        return new

    return [(target, replace)] if target == site else [(site, grab), (target, replace)]


def _ablate_hook(fill: Tensor | None):
    def fn(t: Tensor, hook) -> Tensor:
        new = t.clone()
        new[:, 1:] = 0.0 if fill is None else fill.to(t)
        return new
    return fn


def _mean_activation(model, tokens: Tensor, site: str, batch_size: int) -> Tensor:
    """Mean of ``site``'s activation over every evaluated position but BOS (what mean-ablation writes)."""
    total, n = None, 0
    with capture(model, [site]) as acts:
        for batch in tokens.split(batch_size):
            model(batch.to(model.cfg.device))
            a = acts[site][:, 1:].double()
            total = a.sum((0, 1)) if total is None else total + a.sum((0, 1))
            n += a.shape[0] * a.shape[1]
    return (total / n).float()


# ---------------------------------------------------------------- evaluate
def evaluate(dictionary, model, tokens_or_texts: Tensor | list[str] | str, site: str | None = None,
             target_site: str | None = None, *, ablation: Ablation = "zero", n_ctx: int = 128,
             n_contexts: int | None = None, batch_size: int = 8, dense_threshold: float = 0.1,
             out: str | Path | None = None, device: str | None = None) -> dict[str, Any]:
    """Every metric of ``dictionary`` at its site on held-out text, as a JSON-able dict.

    ``dictionary``: a Dictionary or its directory; ``model``: a HookedTransformer or a name for
    ``probe.models.load_model``; ``tokens_or_texts``: ids [n, n_ctx] starting with BOS, or texts packed
    into ``n_ctx``-token contexts (BOS first). Only the first ``n_contexts`` contexts are used if given.
    ``eval.json`` is written into ``out``, or into the dictionary's directory when a path was given; it
    carries the dictionary's ``fingerprint``, so a feature store shows it only for the dictionary it was built from.
    """
    from saes.base import fingerprint, load_dictionary

    if isinstance(dictionary, str | Path):
        out = dictionary if out is None else out
        dictionary = load_dictionary(dictionary, device=device or "cpu")
    if isinstance(model, str):
        from probe.models import load_model

        model = load_model(model, device=device)
    if n_contexts is not None and n_contexts < 1:
        raise SteerscopeError(f"n_contexts must be a positive number of contexts (or None: all), got {n_contexts}")
    if not isinstance(tokens_or_texts, Tensor) and not 2 <= n_ctx <= model.cfg.n_ctx:
        raise SteerscopeError(f"n_ctx must be from 2 to the model's context length {model.cfg.n_ctx}, got {n_ctx}")
    tokens = _as_tokens(model, tokens_or_texts, n_ctx)[:n_contexts]
    if len(tokens) == 0:
        raise SteerscopeError("no evaluation context: the text is shorter than one context of n_ctx tokens")
    stats = EvalStats(dictionary.cfg.d_sae)
    scores = ce_kl_scores(model, dictionary, tokens, site, target_site, ablation, batch_size, stats)
    res = {**stats.summary(dense_threshold), **scores, "dense_threshold": dense_threshold,
           "architecture": dictionary.architecture, "n_contexts": len(tokens), "fingerprint": fingerprint(dictionary)}
    res = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "eval.json").write_text(json.dumps(res, indent=2))
    return res


def _as_tokens(model, data: Tensor | list[str] | str, n_ctx: int) -> Tensor:
    if isinstance(data, Tensor):
        return _check_tokens(data)
    from probe.tokens import pack_texts

    if model.tokenizer is None:
        raise SteerscopeError("this model has no tokenizer: pass token ids [n_contexts, n_ctx] instead of texts")
    return pack_texts(model, [data] if isinstance(data, str) else list(data), n_ctx)
