"""Triton kernels (GPU; CPU only under ``TRITON_INTERPRET=1``): fused GEMM + top-k encoder, sparse decode.

Importing this module needs ``triton`` (the optional ``gpu`` extra). :mod:`saes.kernels` imports it
lazily, only when the Triton backend is asked for.

Fused encoder. Each program owns ``BLOCK_N`` rows and a contiguous range of latent columns (one
"split"). It walks that range in ``BLOCK_M`` tiles; per tile it accumulates
``x[rows] @ W_enc[:, tile]`` in fp32 over ``BLOCK_D`` slices of ``d_in`` with ``tl.dot``, adds the
bias, and packs every pre-activation with its column into an int64 key (:mod:`saes.kernels.keys`:
value desc, index asc). It keeps a running top-k of keys per row in registers (``K_PAD`` slots,
unique sentinels at start). A tile element can only enter if it beats the row's current k-th key;
the kernel counts those candidates and inserts them one at a time (max of tile -> replaces min of
state), so after the first tiles most tiles cost one compare and one reduction. Each program writes
its ``k`` keys per row; the host merges the ``splits * k`` keys per row with one ``torch.topk``
(splits exist only to fill the GPU when ``N`` is small). No ``N x M`` tensor is ever written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from saes.kernels.keys import topk_keys, unpack_keys

KEY_MIN = tl.constexpr(-(2**63))
KEY_MAX = tl.constexpr(2**63 - 1)


@triton.jit
def _pack(acc, cols):
    bits = acc.to(tl.int32, bitcast=True)
    mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) + (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _topk_encode_kernel(
    X, W, B, OUT, N, D, M, m_per_split,
    sxn, sxd, swd, swm, son,
    HAS_BIAS: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    slot = tl.arange(0, K_PAD)
    init = tl.where(slot < K, KEY_MIN + slot.to(tl.int64), KEY_MAX - slot.to(tl.int64))
    state = tl.zeros([BLOCK_N, K_PAD], tl.int64) + init[None, :]
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < m_hi
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            xt = tl.load(X + rows64[:, None] * sxn + dd[None, :] * sxd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(W + dd[:, None] * swd + cols64[None, :] * swm, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's tl.dot mishandles bf16 (Triton 3.9); GPUs take the else branch
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        keys = _pack(acc + 0.0, cols)
        live = row_ok[:, None] & col_ok[None, :] & (keys > tl.min(state, axis=1)[:, None])
        keys = tl.where(live, keys, KEY_MIN)
        n_new = tl.minimum(tl.max(tl.sum(live.to(tl.int32), axis=1), axis=0), K)
        for _ in range(n_new):
            best = tl.max(keys, axis=1)
            low = tl.min(state, axis=1)
            take = best > low
            state = tl.where((state == low[:, None]) & take[:, None], best[:, None], state)
            keys = tl.where(keys == best[:, None], KEY_MIN, keys)
    out = OUT + rows64[:, None] * son + (pid_s * K + slot)[None, :]
    tl.store(out, state, mask=row_ok[:, None] & (slot < K)[None, :])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _splits(n_blocks: int, m: int, block_m: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_cdiv(target, n_blocks), _cdiv(m, 8 * block_m)))


def topk_encode_triton(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    k: int,
    *,
    block_n: int | None = None,
    block_m: int = 128,
    block_d: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused top-k encoder: ``(values fp32 [N, k], indices int64 [N, k])``, value desc, index asc."""
    dtype = torch.promote_types(x.dtype, W_enc.dtype)
    x, W_enc = x.to(dtype), W_enc.to(dtype)
    n, d = x.shape
    m = W_enc.shape[1]
    k_pad = max(2, _pow2(k))
    block_n = block_n or (64 if k_pad <= 32 else 32 if k_pad <= 64 else 16)
    block_d = block_d or (64 if dtype in (torch.float16, torch.bfloat16) else 32)
    n_blocks = _cdiv(n, block_n)
    splits = splits or _splits(n_blocks, m, block_m, x.device)
    m_per_split = _cdiv(_cdiv(m, splits), block_m) * block_m
    splits = _cdiv(m, m_per_split)
    keys = torch.empty(n, splits * k, dtype=torch.int64, device=x.device)
    precision = None  # bf16/fp16: tensor cores with fp32 accumulation
    if dtype == torch.float32:  # match torch's fp32 matmul: IEEE unless TF32 is allowed
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # registers: acc (fp32) + tile keys (int64) + state (int64) per row of the block
    num_warps = num_warps or (8 if block_n * (12 * block_m + 8 * k_pad) > 32768 else 4)
    bias = b_enc if b_enc is not None else keys
    _topk_encode_kernel[(n_blocks, splits)](
        x, W_enc, bias, keys, n, d, m, m_per_split,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0),
        HAS_BIAS=b_enc is not None, K=k, K_PAD=k_pad,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, INPUT_PRECISION=precision,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=3,
    )  # fmt: skip
    return unpack_keys(topk_keys(keys, k))


@triton.jit
def _sparse_decode_kernel(
    V, IDX, W, B, OUT, N, K, D,
    svn, svk, sin, sik, swm, swd, son,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dd < D
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(K):
        v = tl.load(V + rows64 * svn + j * svk, mask=row_ok, other=0.0).to(tl.float32)
        idx = tl.load(IDX + rows64 * sin + j * sik, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(W + idx[:, None] * swm + dd[None, :] * swd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(B + dd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    out = OUT + rows64[:, None] * son + dd[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def sparse_decode_triton(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, *, block_n: int = 16, block_d: int = 128
) -> Tensor:
    """``sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec)`` with fp32 accumulation: ``[N, d_out]``."""
    n, k = indices.shape
    d = W_dec.shape[1]
    block_d = min(block_d, max(16, _pow2(d)))
    out = torch.empty(n, d, dtype=W_dec.dtype, device=W_dec.device)
    bias = b_dec if b_dec is not None else out
    grid = (_cdiv(n, block_n), _cdiv(d, block_d))
    _sparse_decode_kernel[grid](
        values, indices, W_dec, bias, out, n, k, d,
        values.stride(0), values.stride(1), indices.stride(0), indices.stride(1),
        W_dec.stride(0), W_dec.stride(1), out.stride(0),
        HAS_BIAS=b_dec is not None, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out
