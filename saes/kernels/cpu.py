"""Torch backend (used on CPU; also runs on any device): tiled top-k encoder, sparse decode, sparse grads.

Encoder. The latent dimension is cut into tiles of ``tile`` columns and the rows into chunks of
``rows``, one block (``rows x tile``, at most 64 MB in fp32) at a time. Tall, narrow blocks (all the
rows of a 4096-row batch against 4096 latents, whose encoder slice stays in cache) make the GEMM
itself 5-25% faster than one monolithic ``N x M`` call on the 2-core test machine (measured with
``tile``/``rows`` sweeps: 256 x 8192 blocks were 10-20% *slower* than the monolithic call). Per block:

1. ``addmm`` writes ``x_chunk @ W_enc[:, tile] + b_enc[tile]`` into a reused buffer;
2. a max-pyramid: level ``l + 1`` holds the maxima of strided groups of ``g`` (4) entries of level
   ``l`` (vectorised ``amax`` passes, about one read of the block in all), with up to 3 levels
   while a level keeps at least ``2 (k + 1)`` groups;
3. top-down, ``topk(k)`` at each level picks the ``k`` best groups and their ``k * g`` members are
   the candidates one level down. Every element of the row's top-k lies in the ``k`` best groups
   (a group outside them has ``k`` groups whose maxima beat its own), so the selection is exact;
4. the ``k`` winners are packed into exact sort keys (:mod:`saes.kernels.keys`) and merged with
   the running top-k of each row (``topk`` over ``2k`` keys).

Rows where another candidate equals the k-th one at any level fall back to an exact top-k over
packed keys of the whole tile row, so ties are always broken by the lowest index.
Memory: ``N * k`` keys plus one block, never ``N x M``. Selection is done on fp32 (fp64 for fp64)
pre-activations, whatever the input dtype. Cost on top of the GEMM, per row and tile: one
``amax`` pass and ``topk`` over about ``tile / 4**levels + levels * 4 * k`` elements.

Backward helpers. The (row, latent) pairs are sorted by latent once (a CSR view of the sparse
code); ``F.embedding_bag`` over that order with per-sample weights gives dense ``[M, d]``
gradients for the encoder and decoder weights without atomics and without an ``N * k * d`` buffer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saes.kernels.keys import pack_keys, topk_keys, unpack_keys

BLOCK_ELEMS = 2**24
"""Pre-activation elements per block (rows x tile): 64 MB in fp32, independent of ``M``."""

DEFAULT_TILE = 4096
"""Latent columns per tile; with ``BLOCK_ELEMS`` a block holds up to 4096 rows."""

GROUP = 4
"""Group size of one level of the max-pyramid (2 where 4 leaves too few groups)."""

MAX_LEVELS = 3
"""Levels of the max-pyramid."""


def _levels(width: int, k: int) -> list[int]:
    """Group sizes of the max-pyramid over a tile: each level keeps at least ``2 * (k + 1)`` groups."""
    levels, n = [], width
    while len(levels) < MAX_LEVELS:
        g = next((g for g in (GROUP, 2) if n // g >= 2 * (k + 1)), 1)
        if g == 1:
            break
        levels.append(g)
        n //= g
    return levels


def _tile_topk_keys(pre: Tensor, width: int, levels: list[int], k: int, col0: int) -> Tensor:
    """Exact top-``k`` packed keys of each row of ``pre[:, :width]`` (``pre`` is ``[rows, P]`` with
    ``P`` a multiple of ``prod(levels)``; columns from ``width`` on are -inf padding)."""
    rows, padded = pre.shape
    if not levels:
        cols = torch.arange(col0, col0 + width, device=pre.device).expand(rows, width)
        return topk_keys(pack_keys(pre[:, :width], cols), k)
    pyramid = [pre]  # level l + 1 holds the maxima of strided groups of level l
    for g in levels:
        pyramid.append(pyramid[-1].view(rows, g, -1).amax(dim=1))
    pos = None  # candidate positions in the current level (None: all of it)
    tied = torch.zeros(rows, dtype=torch.bool, device=pre.device)
    for level in range(len(levels), -1, -1):
        cand = pyramid[level] if pos is None else pyramid[level].gather(1, pos)
        val, at = torch.topk(cand, k, dim=1, sorted=False)
        tied |= (cand >= val.amin(1, keepdim=True)).sum(1) > k  # another candidate equals the k-th
        best = at if pos is None else pos.gather(1, at)
        if level:  # the members of the k best groups are the next level's candidates
            stride = pyramid[level].shape[1]
            steps = torch.arange(0, stride * levels[level - 1], stride, device=pre.device)
            pos = (best[:, :, None] + steps).reshape(rows, -1)
    keys = pack_keys(val, best + col0)
    tied = tied.nonzero().flatten()
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
    buf = torch.empty(rows * (tile + GROUP**MAX_LEVELS), dtype=dtype, device=x.device)
    xc = x if x.dtype == dtype else None
    state = torch.empty(0, dtype=torch.int64, device=x.device)
    for c0 in range(0, m, tile):
        width = min(tile, m - c0)
        levels = _levels(width, k)
        unit = math.prod(levels)
        padded = -(-width // unit) * unit
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
            tops.append(_tile_topk_keys(pre, width, levels, k_tile, c0))
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
