"""Public entry points: backend choice, shape checks, autograd wiring."""

from __future__ import annotations

import functools
import os
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from saes.kernels.autograd import SparseDecodeFn, TopKEncodeFn
from saes.kernels.cpu import sparse_decode_torch, topk_encode_torch

Backend = Literal["auto", "torch", "triton"]
Activation = Literal["relu", "identity"]


class TopK(NamedTuple):
    """A sparse code: ``values [..., k]`` (raw pre-activations, value desc) and ``indices [..., k]`` int64."""

    values: Tensor
    indices: Tensor


class TopKSAEOutput(NamedTuple):
    """Output of :func:`topk_sae_forward`."""

    x_hat: Tensor
    """Reconstruction ``[..., d_out]``."""
    acts: Tensor
    """Activations of the selected latents (after the activation function), ``[..., k]``."""
    indices: Tensor
    """Selected latent ids ``[..., k]`` int64, ordered by pre-activation desc, then id asc."""
    pre_acts: Tensor
    """Raw pre-activations of the selected latents, ``[..., k]``."""


@functools.cache
def triton_available() -> bool:
    """True when the Triton kernels import (``triton`` installed; a GPU or ``TRITON_INTERPRET=1``)."""
    try:
        import saes.kernels.triton_topk  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: Backend, device: torch.device) -> Literal["torch", "triton"]:
    """``auto`` -> ``triton`` for CUDA tensors when Triton imports, else ``torch``."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the optional 'triton' package (pip install steerscope[gpu])")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1, set before triton is imported")
    return backend


def _latent_ids(latents: Tensor | None, m: int) -> Tensor | None:
    if latents is None:
        return None
    if latents.dtype == torch.bool:
        if latents.shape != (m,):
            raise ValueError(f"latent mask must have shape ({m},), got {tuple(latents.shape)}")
        return latents.nonzero().flatten()
    return torch.unique(latents.long())  # sorted: keeps 'lowest id wins' on ties


def _encoder(k: int, latents: Tensor | None, backend: str, tile: int | None):
    def encode(x: Tensor, W_enc: Tensor, b_enc: Tensor | None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if latents is not None:
                W_enc = W_enc[:, latents]
                b_enc = None if b_enc is None else b_enc[latents]
            if backend == "triton":
                from saes.kernels.triton_topk import topk_encode_triton

                values, indices = topk_encode_triton(x, W_enc, b_enc, k)
            else:
                values, indices = topk_encode_torch(x, W_enc, b_enc, k, tile=tile)
            if latents is not None:
                indices = latents[indices]
            dtype = torch.promote_types(x.dtype, W_enc.dtype)
            return values.to(dtype), indices

    return encode


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    k: int,
    *,
    latents: Tensor | None = None,
    tile: int | None = None,
    backend: Backend = "auto",
    pre_bias: Tensor | None = None,
) -> TopK:
    """Top-``k`` latents of ``x @ W_enc + b_enc`` per row, never materialising the ``N x M`` matrix.

    Args:
        x: ``[..., d_in]`` inputs (fp32, bf16, fp16; fp64 on the torch backend).
        W_enc: ``[d_in, d_sae]`` (any strides; a transposed ``[d_sae, d_in]`` parameter is fastest).
        b_enc: ``[d_sae]`` or None.
        k: latents per row, ``1 <= k <= d_sae`` (or ``<=`` the number of ``latents``).
        latents: restrict the search to these latents (bool mask ``[d_sae]`` or ids), e.g. dead
            latents for AuxK. Returned indices are still global latent ids.
        tile: latent columns per block on the torch backend (default 4096).
        backend: ``auto`` (Triton on CUDA when installed, else torch), ``torch`` or ``triton``.
        pre_bias: ``[d_in]`` subtracted from ``x`` first (a TopK SAE's ``b_dec``). Same result as
            passing ``x - pre_bias``, but its gradient costs ``d * d_sae`` instead of the
            ``N * k * d`` gather that autograd needs for the gradient of ``x - pre_bias``.

    Returns:
        ``TopK(values, indices)``: raw pre-activations (no ReLU) in ``x``/``W_enc``'s promoted dtype,
        selected on fp32 accumulations, ordered by value desc with ties to the lowest latent id;
        indices int64. ``values`` is differentiable w.r.t. ``x``, ``W_enc`` and ``b_enc`` with a
        backward that touches only the ``N * k`` selected pairs.
    """
    if W_enc.dim() != 2 or x.shape[-1] != W_enc.shape[0]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match W_enc {tuple(W_enc.shape)} (expected [d_in, d_sae])")
    m = W_enc.shape[1]
    if b_enc is not None and b_enc.shape != (m,):
        raise ValueError(f"b_enc must have shape ({m},), got {tuple(b_enc.shape)}")
    if pre_bias is not None and pre_bias.shape != (W_enc.shape[0],):
        raise ValueError(f"pre_bias must have shape ({W_enc.shape[0]},), got {tuple(pre_bias.shape)}")
    ids = _latent_ids(latents, m)
    pool = m if ids is None else ids.numel()
    if not 1 <= k <= pool:
        raise ValueError(f"k={k} must be in [1, {pool}] (number of latents searched)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    encode = _encoder(k, ids, resolve_backend(backend, x.device), tile)
    values, indices = TopKEncodeFn.apply(x2, W_enc, b_enc, pre_bias, encode)
    return TopK(values.reshape(*lead, k), indices.reshape(*lead, k))


def _decode_impl(backend: str):
    def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
        if backend == "triton":
            from saes.kernels.triton_topk import sparse_decode_triton

            return sparse_decode_triton(values, indices, W_dec, b_dec)
        return sparse_decode_torch(values, indices, W_dec, b_dec)

    return decode


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None = None, *, backend: Backend = "auto"
) -> Tensor:
    """``x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec``: ``[..., d_out]``.

    ``W_dec`` is ``[d_sae, d_out]``; cost ``N * k * d_out`` (fp32 accumulation). Differentiable w.r.t.
    ``values``, ``W_dec`` and ``b_dec`` with a backward over the selected pairs only.
    """
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} differ in shape")
    if b_dec is not None and b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"b_dec must have shape ({W_dec.shape[1]},), got {tuple(b_dec.shape)}")
    lead, k = values.shape[:-1], values.shape[-1]
    decode = _decode_impl(resolve_backend(backend, W_dec.device))
    out = SparseDecodeFn.apply(values.reshape(-1, k), indices.reshape(-1, k), W_dec, b_dec, decode)
    return out.reshape(*lead, W_dec.shape[1])


def _activate(pre: Tensor, activation: Activation) -> Tensor:
    if activation == "relu":
        return torch.relu(pre)
    if activation == "identity":
        return pre
    raise ValueError(f"unknown activation {activation!r}; expected 'relu' or 'identity'")


def topk_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor | None,
    k: int,
    *,
    activation: Activation = "relu",
    tile: int | None = None,
    backend: Backend = "auto",
    pre_bias: Tensor | None = None,
) -> TopKSAEOutput:
    """TopK SAE / transcoder forward: fused top-k encoder, activation, sparse decode.

    Equals ``dense = act(topk_mask(x @ W_enc + b_enc)); x_hat = dense @ W_dec + b_dec`` (ties to the
    lowest latent id), and its gradients, for every input; only ``N * k`` pairs are touched after
    the encoder GEMM. ``pre_bias`` (e.g. ``b_dec``) encodes ``x - pre_bias`` with a cheaper gradient
    than subtracting it outside (see :func:`topk_encode`).
    """
    pre = topk_encode(x, W_enc, b_enc, k, tile=tile, backend=backend, pre_bias=pre_bias)
    acts = _activate(pre.values, activation)
    x_hat = sparse_decode(acts, pre.indices, W_dec, b_dec, backend=backend)
    return TopKSAEOutput(x_hat, acts, pre.indices, pre.values)


def auxk_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    W_dec: Tensor,
    k_aux: int,
    dead: Tensor,
    *,
    activation: Activation = "relu",
    backend: Backend = "auto",
    pre_bias: Tensor | None = None,
) -> TopKSAEOutput:
    """AuxK path: top-``k_aux`` among ``dead`` latents, decoded without bias (``e_hat``).

    ``dead`` is a bool mask ``[d_sae]`` or latent ids and must name at least one latent; ``k_aux``
    is clipped to their number. Recomputes pre-activations for the dead columns only
    (``2 * N * d * n_dead`` FLOPs). The AuxK loss, e.g. ``((e_hat - residual.detach())**2)``, sends
    gradients into ``W_dec`` rows and, unlike sparsify 1.3's fused encoder, into ``W_enc``/``b_enc``/``x``.
    """
    ids = _latent_ids(dead, W_enc.shape[1])
    if ids is None or ids.numel() == 0:
        raise ValueError("auxk_forward needs at least one dead latent")
    pre = topk_encode(x, W_enc, b_enc, min(k_aux, ids.numel()), latents=ids, backend=backend, pre_bias=pre_bias)
    acts = _activate(pre.values, activation)
    e_hat = sparse_decode(acts, pre.indices, W_dec, None, backend=backend)
    return TopKSAEOutput(e_hat, acts, pre.indices, pre.values)
