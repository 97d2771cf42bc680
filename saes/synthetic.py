"""Ground truth for dictionaries: sparse features in superposition (Elhage et al. 2022, "Toy Models of Superposition").

n unit feature directions F [n, d] live in d < n dimensions. Each sample switches feature j on
independently with probability p and gives it a magnitude m ~ Uniform(min_mag, max_mag) > 0:

    codes[s, j] = B[s, j] * m[s, j],   B ~ Bernoulli(p)          [N, n], mostly zeros
    X = codes @ F  (+ noise_std * standard normal noise)          [N, d]

A dictionary that has learned the features has, for every true feature, a decoder row pointing the
same way; ``mean_max_cosine`` measures that: the mean over true features of the largest cosine
similarity with any learned direction (1.0: every feature recovered exactly).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from probe.errors import SteerscopeError


class Superposition(NamedTuple):
    X: Tensor  # [N, d] the observed activations
    features: Tensor  # [n, d] the true unit feature directions
    codes: Tensor  # [N, n] the true nonnegative sparse coefficients (X = codes @ features + noise)


def superposition(n_features: int, d: int, n_samples: int, p_active: float = 0.05,
                  min_mag: float = 0.5, max_mag: float = 1.5, noise_std: float = 0.0,
                  seed: int = 0) -> Superposition:
    """Sample ``n_samples`` activations made of sparse, positive combinations of ``n_features`` directions in R^d."""
    if not 0 < d < n_features:
        raise SteerscopeError(f"superposition needs 0 < d < n_features, got d={d}, n_features={n_features}")
    if not 0 < p_active <= 1 or not 0 < min_mag <= max_mag or n_samples <= 0:
        raise SteerscopeError(f"need 0 < p_active <= 1, 0 < min_mag <= max_mag and n_samples > 0, got "
                              f"p_active={p_active}, min_mag={min_mag}, max_mag={max_mag}, n_samples={n_samples}")
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features = features / features.norm(dim=1, keepdim=True)
    on = torch.rand(n_samples, n_features, generator=g) < p_active
    mags = min_mag + (max_mag - min_mag) * torch.rand(n_samples, n_features, generator=g)
    codes = on * mags
    X = codes @ features
    if noise_std > 0:
        X = X + noise_std * torch.randn(n_samples, d, generator=g)
    return Superposition(X, features, codes)


def mean_max_cosine(learned: Tensor, true: Tensor) -> float:
    """mean_j max_i cos(learned_i, true_j) for learned [m, d] and true [n, d] directions (rows)."""
    if learned.shape[-1] != true.shape[-1]:
        raise SteerscopeError(f"directions differ in width: learned {tuple(learned.shape)}, true {tuple(true.shape)}")
    a = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((b @ a.T).max(dim=1).values.mean())
