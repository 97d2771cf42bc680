"""The learning-rate schedule and the decoder-bias initialisation of :mod:`saes.train`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from saes.train import TrainConfig


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
