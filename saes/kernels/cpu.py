"""Torch backend (used on CPU; also runs on any device): tiled top-k encoder, sparse decode, sparse grads.

Encoder. The latent dimension is cut into tiles of ``tile`` columns and the rows into chunks of
``rows``, one block of pre-activations (``rows x tile``, at most 64 MB in fp32) at a time; each
block is merged into every row's running top-k and then overwritten. Memory: ``N * k`` values and
ids plus the blocks, never ``N x M``. Selection is done on fp32 (fp64 for fp64) pre-activations,
whatever the input dtype. Three paths, all exact and in the order of the packed keys
(:mod:`saes.kernels.keys`: value descending, ties to the lowest id), tested to agree bit for bit:

- default on CPU (fp32/fp64, numba, numpy on OpenBLAS): :func:`saes.kernels.cpu_select.encode_blocks`.
  The rows are split over ``torch.get_num_threads()`` threads; each runs single-threaded OpenBLAS
  GEMMs on its rows, block after block, and the compiled selection on each block right after, on
  the same thread. On the 2-core AMD EPYC test machine OpenBLAS's sgemm runs ~1.3x faster than
  the MKL sgemm of torch's CPU wheels (187 vs 141 GFLOP/s on a 4096 x 768 x 4096 block), and no
  BLAS thread spins on a core while the selection runs.
- ``gemm="torch"``: torch GEMMs (``mm`` on all threads, 4096 x 4096 blocks: 5-25% faster than one
  monolithic call on the test machine), then the compiled selection over the block
  (:func:`saes.kernels.cpu_select.merge_block`, rows split over threads): a chunk is entered only
  if one of its values can beat the row's current ``k``-th. 5-25 ms per 4096 x 4096 block on 2 cores
  against 30 ms for the best torch-op formulation we found (and 34 ms for one ``torch.topk``).
- ``select="torch"`` (other devices, or without numba): ``addmm`` blocks, then a threshold ``tau``
  per row that is at most its ``k``-th value so far (the running state's last key; on the first
  tile the ``k``-th largest maximum at the top of a max-pyramid of strided groups); the candidates
  ``>= tau`` are found through the maxima of strided groups of ``GROUP`` columns (``amax`` +
  ``nonzero``), packed into keys and merged with the state by one ``topk``.

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

from saes.kernels import cpu_select
from saes.kernels.keys import KEY_MIN, pack_keys, topk_keys, unpack_keys

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


def _threshold_lb(pre: Tensor, levels: list[int], k: int) -> Tensor:
    """A lower bound on each row's ``k``-th largest value: the ``k``-th largest group maximum at the
    top of the max-pyramid (the maxima of ``k`` disjoint groups are ``k`` distinct elements)."""
    top = pre
    for g in levels:
        top = top.view(pre.shape[0], g, -1).amax(dim=1)
    return torch.topk(top, k, dim=1, sorted=False).values.amin(1)


def _merge_block(pre: Tensor, width: int, state: Tensor | None, levels: list[int], k: int, col0: int) -> Tensor:
    """The sorted top-``k`` keys of ``state`` (``[rows, k]``, None before the first tile) together with
    ``pre[:, :width]`` (latent ids ``col0 + j``; ``pre`` is -inf padded to a multiple of ``GROUP``).

    Candidates are the elements not below a per-row threshold ``tau`` that is at most the row's
    ``k``-th best value so far: the running state's last key, or :func:`_threshold_lb` on the first
    tile. So no top-``k`` element (nor any element tied with the ``k``-th) is missed, and the packed
    keys break ties by the lowest id. They are found through the maxima of strided groups of
    ``GROUP`` columns: one pass over the block, then work proportional to the candidates (about
    ``k`` per row on the first tile and ``k * tile / (latents seen)`` after it). ``not (x < tau)``
    keeps NaNs, which rank first. Rows with more than ``max(4k, 256)`` candidates (values tied with
    ``tau``) take an exact top-``k`` of their whole tile row instead.
    """
    rows, padded = pre.shape
    dev = pre.device
    tau = _threshold_lb(pre, levels, k) if state is None else unpack_keys(state[:, -1])[0]
    if pre.dtype == torch.float64:  # keys rank fp32 roundings: keep all that round up to tau
        tau = tau.float()
        tau = torch.nextafter(tau, torch.full_like(tau, float("-inf"))).double()
    tau = tau.to(pre.dtype)
    stride = padded // GROUP
    gmax = pre.view(rows, GROUP, stride).amax(dim=1)
    r, c = (~(gmax < tau[:, None])).nonzero(as_tuple=True)
    cols = (c[:, None] + torch.arange(0, padded, stride, device=dev)).reshape(-1)
    r = r.repeat_interleave(GROUP)
    vals = pre[r, cols]
    keep = ~(vals < tau[r]) & (cols < width)
    r, cols, vals = r[keep], cols[keep], vals[keep]
    counts = torch.bincount(r, minlength=rows)
    heavy = counts > max(4 * k, 256)
    if bool(heavy.any()):
        light = ~heavy[r]
        r, cols, vals = r[light], cols[light], vals[light]
        counts = counts.masked_fill(heavy, 0)
    starts = torch.cumsum(counts, 0) - counts
    width_c = max(int(counts.max()), 0 if state is not None else k)
    cand = torch.full((rows, width_c), KEY_MIN, dtype=torch.int64, device=dev)
    cand[r, torch.arange(r.numel(), device=dev) - starts[r]] = pack_keys(vals, cols + col0)
    out = topk_keys(cand if state is None else torch.cat([state, cand], dim=1), k)
    heavy = heavy.nonzero().flatten()
    if heavy.numel():
        ids = torch.arange(col0, col0 + width, device=dev).expand(heavy.numel(), width)
        exact = pack_keys(pre[heavy, :width], ids)
        out[heavy] = topk_keys(exact if state is None else torch.cat([state[heavy], exact], dim=1), k)
    return out


def topk_encode_torch(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    k: int,
    *,
    tile: int | None = None,
    rows: int | None = None,
    select: str = "auto",
    gemm: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``x @ W_enc + b_enc`` per row, without materialising ``N x M``.

    Returns ``(values [N, k], indices int64 [N, k])`` sorted by value descending, ties by index
    ascending. Values are fp32 (fp64 for fp64 inputs: ranked on their fp32 rounding, then
    recomputed exactly). ``tile`` is the number of latent columns per block, ``rows`` the rows per
    block. ``select``: ``compiled`` (:mod:`saes.kernels.cpu_select`, CPU only), ``torch`` (a
    running threshold over torch ops, any device) or ``auto`` (compiled on CPU when numba is
    installed). ``gemm`` (compiled selection only): ``openblas`` (numpy's OpenBLAS, one thread per
    part of the rows, see :func:`saes.kernels.cpu_select.encode_blocks`), ``torch`` (torch's BLAS on
    all threads, then the selection) or ``auto`` (``openblas`` where it can run: fp32/fp64 inputs
    of one dtype, numpy on OpenBLAS).
    """
    if select not in ("auto", "compiled", "torch") or gemm not in ("auto", "openblas", "torch"):
        raise ValueError(f"select must be auto/compiled/torch and gemm auto/openblas/torch, got {select!r}, {gemm!r}")
    n, _ = x.shape
    m = W_enc.shape[1]
    dtype = torch.float64 if torch.promote_types(x.dtype, W_enc.dtype) == torch.float64 else torch.float32
    can_compile = x.device.type == "cpu" and cpu_select.available()
    if select == "compiled" and not can_compile:
        raise RuntimeError("the compiled top-k selection needs numba and CPU tensors")
    compiled = select == "compiled" or (select == "auto" and can_compile)
    same = x.dtype == W_enc.dtype == dtype and (b_enc is None or b_enc.dtype == dtype)
    can_blas = compiled and same and cpu_select.blas_available()
    if gemm == "openblas" and not can_blas:
        raise RuntimeError("the OpenBLAS GEMM path needs the compiled selection, numpy on OpenBLAS and one float dtype")
    tile = max(min(tile or DEFAULT_TILE, m), min(m, 2 * (k + 1)))
    k = min(k, m)
    threads = torch.get_num_threads()
    if n == 0:
        return torch.empty(0, k, dtype=dtype, device=x.device), torch.empty(0, k, dtype=torch.int64, device=x.device)
    if can_blas and gemm != "torch":
        parts = max(1, min(threads, n // 64))
        rows = max(1, min(n, rows or BLOCK_ELEMS // tile // parts))
        bias = torch.zeros(m, dtype=dtype) if b_enc is None else b_enc.detach().contiguous()
        vals, ids = cpu_select.encode_blocks(
            x.detach().contiguous().numpy(), W_enc.detach().numpy(), bias.numpy(), k, tile, rows, threads
        )
        values, indices = torch.from_numpy(vals), torch.from_numpy(ids)
        return _exact_fp64(values, indices, x, W_enc, b_enc) if dtype == torch.float64 else (values, indices)
    rows = max(1, min(n, rows or BLOCK_ELEMS // tile))
    buf = torch.empty(rows * (tile + GROUP**MAX_LEVELS), dtype=dtype, device=x.device)
    xc = x if x.dtype == dtype else None
    if compiled:
        top_vals = torch.empty(n, k, dtype=torch.float32)
        top_ids = torch.empty(n, k, dtype=torch.int64)
        fill = torch.zeros(n, dtype=torch.int64)
    else:
        state = torch.empty(n, k, dtype=torch.int64, device=x.device)
    for c0 in range(0, m, tile):
        width = min(tile, m - c0)
        levels = _levels(width, k) if c0 == 0 and not compiled else []
        unit = 1 if compiled else max(math.prod(levels), GROUP)
        padded = -(-width // unit) * unit
        w_tile = W_enc[:, c0 : c0 + width].to(dtype)
        b_tile = None if b_enc is None else b_enc[c0 : c0 + width].to(dtype)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            xr = xc[r0:r1] if xc is not None else x[r0:r1].to(dtype)
            pre = buf[: (r1 - r0) * padded].view(r1 - r0, padded)
            if b_tile is None or compiled:  # the compiled selection adds the bias itself
                torch.mm(xr, w_tile, out=pre[:, :width])
            else:
                torch.addmm(b_tile, xr, w_tile, out=pre[:, :width])
            if compiled:
                cpu_select.merge_block(
                    pre.numpy(),
                    width,
                    c0,
                    top_vals[r0:r1].numpy(),
                    top_ids[r0:r1].numpy(),
                    fill[r0:r1].numpy(),
                    threads,
                    None if b_tile is None else b_tile.contiguous().numpy(),
                )
                continue
            if padded > width:
                pre[:, width:] = float("-inf")
            if c0 == 0 and width <= k:  # the whole row: an exact top-k of it
                cols = torch.arange(width, device=x.device).expand(r1 - r0, width)
                state[r0:r1] = topk_keys(pack_keys(pre[:, :width], cols), k)
            else:
                state[r0:r1] = _merge_block(pre, width, None if c0 == 0 else state[r0:r1], levels, k, c0)
    values, indices = (top_vals, top_ids) if compiled else unpack_keys(state)
    return _exact_fp64(values, indices, x, W_enc, b_enc) if dtype == torch.float64 else (values, indices)


def _exact_fp64(values: Tensor, indices: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor | None) -> tuple[Tensor, Tensor]:
    """fp64 inputs: the keys ranked fp32-rounded values; give back the exact fp64 values."""
    values = gather_dot(indices, latent_rows(W_enc).to(torch.float64), x.to(torch.float64))
    if b_enc is not None:
        values = values + b_enc.to(torch.float64)[indices]
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
