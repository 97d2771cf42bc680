"""Dense reference implementations: the definitions the fast kernels are tested against.

They materialise the ``N x M`` pre-activations and use plain autograd, exactly what SAELens does;
``bench/sae_step.py`` times them as the naive baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor | None) -> Tensor:
    """``x @ W_enc + b_enc`` in fp32 (fp64 for fp64 inputs): ``[N, M]``."""
    dtype = torch.float64 if torch.promote_types(x.dtype, W_enc.dtype) == torch.float64 else torch.float32
    pre = x.to(dtype) @ W_enc.to(dtype)
    return pre if b_enc is None else pre + b_enc.to(dtype)


def dense_topk_indices(pre: Tensor, k: int) -> Tensor:
    """Top-``k`` column ids per row of ``pre``: value desc, ties to the lowest id (stable sort)."""
    return torch.sort(pre, dim=-1, descending=True, stable=True).indices[..., :k]


def dense_topk_sae(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor | None,
    k: int,
    relu: bool = True,
    exact_ties: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense TopK SAE: ``(x_hat, dense_acts [N, M], indices)`` with autograd through everything.

    ``exact_ties=False`` selects with ``torch.topk`` (ties unspecified) instead of a stable sort:
    what a plain implementation does, and what the benchmark times.
    """
    pre = dense_pre_acts(x, W_enc, b_enc)
    idx = dense_topk_indices(pre.detach(), k) if exact_ties else pre.detach().topk(k, dim=-1).indices
    vals = pre.gather(-1, idx)
    vals = torch.relu(vals) if relu else vals
    acts = torch.zeros_like(pre).scatter(-1, idx, vals)
    x_hat = acts.to(W_dec.dtype) @ W_dec
    return (x_hat if b_dec is None else x_hat + b_dec), acts, idx
