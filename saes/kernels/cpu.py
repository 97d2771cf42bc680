"""Torch backend (used on CPU; also runs on any device): tiled top-k encoder, sparse decode, sparse grads.

Encoder. The latent dimension is cut into tiles of ``tile`` columns and the rows into chunks, so
that one block of pre-activations (``rows x tile`` fp32, about 8 MB) lives in the last-level
cache. Per block:

1. ``addmm`` writes ``x_chunk @ W_enc[:, tile] + b_enc[tile]`` into a reused buffer;
2. a cheap vectorised pass takes the maximum of each of ``tile / g`` strided column groups;
3. ``topk(k + 1)`` over the group maxima picks the ``k`` best groups; every element that can be in
   the row's top-k lies in them (a group outside them has ``k`` groups whose maxima beat its own);
4. ``topk(k + 1)`` over the ``k * g`` candidates; the best ``k`` are packed into exact sort keys
   (:mod:`saes.kernels.keys`) and merged with the running top-k of the row (``topk`` over ``2k`` keys).

Rows with a tie at the k-th place (of group maxima or of candidates) fall back to an exact top-k
over packed keys of the whole tile row, so ties are always broken by the lowest index.
Memory: ``N * k`` keys plus one block, never ``N x M``. Selection is done on fp32
pre-activations, whatever the input dtype. Cost on top of the GEMM, per row and tile: one
``amax`` pass over the tile and two ``topk`` over about ``2 * sqrt(tile * k)`` elements.

Backward helpers. The (row, latent) pairs are sorted by latent once (a CSR view of the sparse
code); ``F.embedding_bag`` over that order with per-sample weights gives dense ``[M, d]``
gradients for the encoder and decoder weights without atomics and without an ``N * k * d`` buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saes.kernels.keys import pack_keys, topk_keys, unpack_keys

BLOCK_ELEMS = 2**21
"""Pre-activation elements per block (rows x tile): 8 MB in fp32, fits a typical L3 slice."""

DEFAULT_TILE = 8192
"""Latent columns per tile; with ``BLOCK_ELEMS`` this gives 256-row chunks."""

GROUP = 16
"""Columns per strided group in the candidate pre-filter."""


def _group_size(width: int, k: int) -> int:
    """Largest power of two <= GROUP that leaves at least 2 * (k + 1) groups (1: no pre-filter)."""
    g = GROUP
    while g > 1 and width // g < 2 * (k + 1):
        g //= 2
    return g


def _tile_topk_keys(pre: Tensor, width: int, g: int, k: int, col0: int) -> Tensor:
    """Exact top-``k`` packed keys of each row of ``pre[:, :width]`` (``pre`` is ``[rows, P]``,
    ``P = ceil(width / g) * g``, columns from ``width`` on are -inf padding)."""
    rows, padded = pre.shape
    if g == 1:
        cols = torch.arange(col0, col0 + width, device=pre.device).expand(rows, width)
        return topk_keys(pack_keys(pre[:, :width], cols), k)
    n_groups = padded // g
    gmax = pre.view(rows, g, n_groups).amax(dim=1)
    gval, gidx = torch.topk(gmax, k + 1, dim=1, sorted=True)
    steps = torch.arange(0, padded, n_groups, device=pre.device)
    cand = (gidx[:, :k, None] + steps).reshape(rows, k * g)
    cval, cpos = torch.topk(pre.gather(1, cand), k + 1, dim=1, sorted=True)
    keys = pack_keys(cval[:, :k], cand.gather(1, cpos[:, :k]) + col0)
    tied = ((gval[:, k - 1] == gval[:, k]) | (cval[:, k - 1] == cval[:, k])).nonzero().flatten()
    if tied.numel():  # a tie at the k-th place: the lowest index must win, redo these rows exactly
        sub = pre[tied]
        cols = torch.arange(col0, col0 + padded, device=pre.device).expand_as(sub)
        keys[tied] = topk_keys(pack_keys(sub, cols), k)
    return keys


def topk_encode_torch(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    k: int,
    *,
    tile: int | None = None,
    rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``x @ W_enc + b_enc`` per row, without materialising ``N x M``.

    Returns ``(values [N, k], indices int64 [N, k])`` sorted by value descending, ties by index
    ascending. Values are fp32 (fp64 for fp64 inputs: ranked on their fp32 rounding, then
    recomputed exactly). ``tile`` is the number of latent columns per block, ``rows`` the rows per block.
    """
    n, _ = x.shape
    m = W_enc.shape[1]
    dtype = torch.float64 if torch.promote_types(x.dtype, W_enc.dtype) == torch.float64 else torch.float32
    tile = max(min(tile or DEFAULT_TILE, m), min(m, 2 * (k + 1)))
    rows = max(1, min(n, rows or BLOCK_ELEMS // tile))
    g_full = _group_size(tile, k)
    buf = torch.empty(rows * (tile + g_full), dtype=dtype, device=x.device)
    xc = x if x.dtype == dtype else None
    state = torch.empty(0, dtype=torch.int64, device=x.device)
    for c0 in range(0, m, tile):
        width = min(tile, m - c0)
        g = _group_size(width, k)
        padded = -(-width // g) * g
        w_tile = W_enc[:, c0 : c0 + width].to(dtype)
        b_tile = None if b_enc is None else b_enc[c0 : c0 + width].to(dtype)
        k_tile = min(k, width)
        tops = []
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            xr = xc[r0:r1] if xc is not None else x[r0:r1].to(dtype)
            pre = buf[: (r1 - r0) * padded].view(r1 - r0, padded)
            if b_tile is None:
                torch.mm(xr, w_tile, out=pre[:, :width])
            else:
                torch.addmm(b_tile, xr, w_tile, out=pre[:, :width])
            if padded > width:
                pre[:, width:] = float("-inf")
            tops.append(_tile_topk_keys(pre, width, g, k_tile, c0))
        tile_keys = torch.cat(tops) if len(tops) > 1 else tops[0]
        state = topk_keys(tile_keys if c0 == 0 else torch.cat([state, tile_keys], dim=1), k)
    values, indices = unpack_keys(state)
    if dtype == torch.float64:  # keys rank fp32-rounded values; give back exact fp64 values
        values = gather_dot(indices, latent_rows(W_enc).to(dtype), x.to(dtype))
        if b_enc is not None:
            values = values + b_enc.to(dtype)[indices]
    return values, indices


def sparse_decode_torch(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec)`` via ``embedding_bag``: ``[N, d_out]``."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    if b_dec is not None:
        out = out + b_dec
    return out


class LatentCSR(NamedTuple):
    """The (row, latent) pairs of a sparse code sorted by latent: a CSR view of its transpose."""

    order: Tensor
    """Permutation of the flattened ``[N * k]`` pairs that sorts them by latent (stable)."""
    tokens: Tensor
    """Row (token) of each sorted pair."""
    offsets: Tensor
    """Start of each latent's run in the sorted pairs, ``[M]``."""


def latent_csr(indices: Tensor, m: int) -> LatentCSR:
    """Sort the pairs of ``indices [N, k]`` by latent, for :func:`scatter_rows`."""
    flat = indices.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=m)
    offsets = torch.cumsum(counts, 0) - counts
    return LatentCSR(order, order // indices.shape[1], offsets)


def scatter_rows(csr: LatentCSR, src: Tensor, weights: Tensor) -> Tensor:
    """``out[m] = sum over pairs (n, j) with latent m of weights[n, j] * src[n]``: dense ``[M, d]``."""
    w = weights.reshape(-1)[csr.order].to(src.dtype)
    return F.embedding_bag(csr.tokens, src, csr.offsets, mode="sum", per_sample_weights=w)


def gather_dot(indices: Tensor, table: Tensor, g: Tensor) -> Tensor:
    """``out[n, j] = <table[indices[n, j]], g[n]>`` in cache-sized row chunks (no ``N * k * d`` buffer)."""
    n, k = indices.shape
    chunk = max(1, 2**19 // max(1, k * table.shape[1]))
    g = g.to(table.dtype)
    out = torch.empty(n, k, dtype=table.dtype, device=g.device)
    for r0 in range(0, n, chunk):
        rows = F.embedding(indices[r0 : r0 + chunk], table)
        torch.sum(rows.mul_(g[r0 : r0 + chunk, None, :]), dim=-1, out=out[r0 : r0 + chunk])
    return out


def latent_rows(W_enc: Tensor) -> Tensor:
    """``W_enc [d, M]`` as contiguous latent rows ``[M, d]`` (free when W_enc is a transposed view)."""
    rows = W_enc.t()
    return rows if rows.is_contiguous() else rows.contiguous()
