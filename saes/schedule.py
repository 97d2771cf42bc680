"""The learning-rate schedule, the data-dependent defaults and the decoder-bias initialisation of :mod:`saes.train`."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Any

from torch import Tensor

from probe.errors import SteerscopeError

if TYPE_CHECKING:
    from saes.train import TrainConfig

MIN_STEPS = 1000  # default runs over finite data repeat passes until they take this many steps...
MAX_EPOCHS = 25  # ...but at most this many passes; shorter runs warn (planted features need ~1000 steps)
WARMUP_FRAC, MAX_WARMUP = 0.05, 1000  # default warmup: 5% of the steps, at most 1000


def lr_at(cfg: TrainConfig, step: int, frac: float) -> float:
    """lr for 0-based ``step`` with ``frac`` = tokens trained so far / n_tokens (warmup by steps, decay by tokens)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    frac = min(max(frac, 0.0), 1.0)
    if cfg.decay == "linear":
        start = 1.0 - cfg.decay_frac
        decay = 1.0 if frac <= start else 1.0 - (1.0 - cfg.min_lr_frac) * (frac - start) / cfg.decay_frac
    elif cfg.decay == "cosine":
        decay = cfg.min_lr_frac + (1.0 - cfg.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))
    else:
        decay = 1.0
    return cfg.lr * warm * decay


def geometric_median(x: Tensor, n_iter: int = 20, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iteration for argmin_y sum_i ||x_i - y||, started at the mean."""
    x = x.double()
    y = x.mean(0)
    for _ in range(n_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y.float()


def resolve_defaults(cfg: TrainConfig, source: Any) -> TrainConfig:
    """Fill the data-dependent defaults: n_tokens (enough passes for MIN_STEPS steps, at most MAX_EPOCHS), the
    warmup (WARMUP_FRAC of the steps, at most MAX_WARMUP), lr, dead_tokens. A run under MIN_STEPS warns once."""
    n = cfg.n_tokens
    if n is None and source.default_tokens is not None:
        rows = source.default_tokens
        n = rows * min(MAX_EPOCHS, max(1, math.ceil(MIN_STEPS * cfg.batch_size / max(rows, 1))))
    if n is None:
        raise SteerscopeError("n_tokens is needed when data is an iterator (the lr schedule decays over it)")
    steps = math.ceil(n / cfg.batch_size)
    if steps < MIN_STEPS:
        need = MIN_STEPS * cfg.batch_size
        warnings.warn(f"this run takes only {steps} steps of {cfg.batch_size} rows; dictionaries usually need "
                      f">= {MIN_STEPS}: pass n_tokens={need} (more passes over the data) or batch_size="
                      f"{max(1, n // MIN_STEPS)}", UserWarning, stacklevel=4)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(MAX_WARMUP, round(WARMUP_FRAC * steps))
    return dataclasses.replace(cfg, n_tokens=n, warmup_steps=warmup, lr=cfg.lr or 2e-4 / math.sqrt(cfg.d_sae / 2**14),
                               dead_tokens=cfg.dead_tokens or max(1, min(1_000_000, n // 4)))
