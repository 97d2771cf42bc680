"""Autograd Functions whose backward passes touch only the active (row, latent) pairs.

Shapes: ``N`` rows, ``d`` = d_in, ``M`` = d_sae, ``k`` active latents per row, ``d_out`` decoder width.

``TopKEncodeFn``: ``values [N, k]`` = top-k of ``x @ W_enc + b_enc`` (indices non-differentiable).
Given ``g = dL/dvalues``:

- ``dL/dx[n] = sum_j g[n, j] W_enc[:, idx[n, j]]``    one ``embedding_bag`` over latent rows, N*k*d;
- ``dL/dW_enc[:, m] = sum_{(n, j): idx = m} g[n, j] x[n]``  sorted ``embedding_bag``, N*k*d;
- ``dL/db_enc[m] = sum_{(n, j): idx = m} g[n, j]``     the same, over a column of ones.

``SparseDecodeFn``: ``out = sum_j values[n, j] W_dec[idx[n, j]] + b_dec``. Given ``h = dL/dout``:

- ``dL/dvalues[n, j] = <W_dec[idx[n, j]], h[n]>``       chunked gather + bmm, N*k*d_out;
- ``dL/dW_dec[m] = sum_{(n, j): idx = m} values[n, j] h[n]``  sorted ``embedding_bag``;
- ``dL/db_dec = sum_n h[n]``.

On CPU (fp32/fp64, numba installed) the pairs of each latent are walked once by the compiled
kernels of :mod:`saes.kernels.cpu_sparse` instead: ``dL/dvalues`` and ``dL/dW_dec`` in one pass,
``dL/dW_enc`` and the per-latent sums in another (the torch ops above remain for other devices
and dtypes, and are tested to give the same gradients).

Any loss built on the values (the TopK reconstruction, AuxK over dead latents, Multi-TopK) sends
its gradient through these formulas, so the encoder always receives it. Gradients are computed in
fp32 for fp16/bf16 inputs (on CUDA by the kernels' fp32 accumulators, without upcast copies of
the weights) and returned in each input's dtype. The weight gradients are dense
``[M, d]`` tensors (what optimizers expect); only the work to fill them is sparse.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from saes.kernels import cpu_select, cpu_sparse
from saes.kernels.cpu import LatentCSR, gather_dot, latent_csr, latent_rows, scatter_rows


def _work_dtype(t: Tensor) -> torch.dtype:
    """fp32 for half inputs on CPU; on CUDA the gathers and segment sums accumulate in fp32 already."""
    half = t.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and t.device.type == "cpu" else t.dtype


def _compiled(work: torch.dtype, device: torch.device) -> bool:
    """Whether the compiled CPU kernels (:mod:`saes.kernels.cpu_sparse`) run for this work dtype."""
    return cpu_select.available() and device.type == "cpu" and work in (torch.float32, torch.float64)


def _csr_arrays(csr: LatentCSR, pairs: int):
    """``(offsets [M + 1], order)`` as numpy arrays for the compiled kernels."""
    offsets = torch.cat([csr.offsets, csr.offsets.new_tensor([pairs])])
    return offsets.numpy(), csr.order.numpy()


def encoder_backward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor | None, indices: Tensor, g: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``x``, ``W_enc`` (``[d, M]``), ``b_enc`` from ``g = dL/dvalues`` (see module doc).

    ``needs[2]`` asks for the per-latent sums of ``g`` (the ``b_enc`` gradient, in ``b_enc``'s dtype,
    or ``W_enc``'s when there is no bias) whether or not ``b_enc`` exists: a pre-bias needs them too.
    """
    m = W_enc.shape[1]
    wd = _work_dtype(W_enc)
    g = g.to(wd)
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = torch.nn.functional.embedding_bag(
            indices, latent_rows(W_enc).to(wd), per_sample_weights=g, mode="sum"
        ).to(x.dtype)
    csr = latent_csr(indices, m) if needs[1] or needs[2] else None
    if needs[1] and csr is not None and _compiled(wd, g.device):
        offsets, order = _csr_arrays(csr, indices.numel())
        rows, sums = cpu_sparse.encoder_backward(
            offsets,
            order,
            indices.shape[1],
            g.contiguous().reshape(-1).numpy(),
            x.to(wd).contiguous().numpy(),
            torch.get_num_threads(),
        )
        grad_w = torch.from_numpy(rows).to(W_enc.dtype).t()
        if needs[2]:
            grad_b = torch.from_numpy(sums).to((W_enc if b_enc is None else b_enc).dtype)
        return grad_x, grad_w, grad_b
    if needs[1]:
        grad_w = scatter_rows(csr, x.to(wd), g).to(W_enc.dtype).t()
    if needs[2]:  # a segment sum, deterministic on GPUs too (no atomics)
        ones = torch.ones(x.shape[0], 1, dtype=wd, device=g.device)
        grad_b = scatter_rows(csr, ones, g)[:, 0].to((W_enc if b_enc is None else b_enc).dtype)
    return grad_x, grad_w, grad_b


def decoder_backward(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, h: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``values``, ``W_dec`` (``[M, d_out]``), ``b_dec`` from ``h = dL/dout``."""
    wd = _work_dtype(W_dec)
    h = h.to(wd)
    grad_v = grad_w = grad_b = None
    if needs[0] and needs[1] and _compiled(wd, h.device):
        csr = latent_csr(indices, W_dec.shape[0])
        offsets, order = _csr_arrays(csr, indices.numel())
        gv, gw = cpu_sparse.decoder_backward(
            offsets,
            order,
            indices.shape[1],
            values.to(wd).contiguous().reshape(-1).numpy(),
            W_dec.to(wd).contiguous().numpy(),
            h.contiguous().numpy(),
            torch.get_num_threads(),
        )
        grad_v = torch.from_numpy(gv).view(indices.shape).to(values.dtype)
        grad_w = torch.from_numpy(gw).to(W_dec.dtype)
        needs = (False, False, needs[2])
    if needs[0]:
        grad_v = gather_dot(indices, W_dec.to(wd), h).to(values.dtype)
    if needs[1]:
        grad_w = scatter_rows(latent_csr(indices, W_dec.shape[0]), h, values.to(wd)).to(W_dec.dtype)
    if needs[2] and b_dec is not None:
        grad_b = h.sum(0).to(b_dec.dtype)
    return grad_v, grad_w, grad_b


class TopKEncodeFn(Function):
    """``(values, indices) = topk((x - shift) @ W_enc + b_enc)`` with a sparse backward.

    ``encode`` is a callable ``(x, W_enc, b_enc) -> (values, indices)`` (a backend) whose indices
    are global latent ids; it runs under no_grad in forward. ``shift`` (``[d]`` or None) is a
    pre-bias such as a TopK SAE's ``b_dec``: its gradient is ``-W_enc @ s`` with ``s`` the per-latent
    sums of ``g`` (``d * M`` work), where subtracting it outside would make autograd build the
    ``[N, d]`` gradient of ``x - shift`` (an ``N * k * d`` gather) only to sum its rows.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, shift, encode):  # type: ignore[override]
        xs = x if shift is None else x - shift
        values, indices = encode(xs, W_enc, b_enc)
        ctx.save_for_backward(xs, W_enc, b_enc, shift, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, g_values, _g_indices):  # type: ignore[override]
        xs, W_enc, b_enc, shift, indices = ctx.saved_tensors
        need_x, need_w, need_b, need_shift = ctx.needs_input_grad[:4]
        needs = (need_x, need_w, (need_b and b_enc is not None) or need_shift)
        grad_x, grad_w, sums = encoder_backward(xs, W_enc, b_enc, indices, g_values, needs)  # type: ignore[arg-type]
        grad_shift = None
        if need_shift:
            grad_shift = -(W_enc.to(sums.dtype) @ sums).to(shift.dtype)
        return grad_x, grad_w, sums if need_b and b_enc is not None else None, grad_shift, None


class SparseDecodeFn(Function):
    """``out = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` with a sparse backward.

    ``decode`` is a callable ``(values, indices, W_dec, b_dec) -> out`` (a backend).
    """

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec, decode):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec, b_dec)
        return decode(values, indices, W_dec, b_dec)

    @staticmethod
    def backward(ctx, h):  # type: ignore[override]
        values, indices, W_dec, b_dec = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        grad_v, grad_w, grad_b = decoder_backward(values, indices, W_dec, b_dec, h, needs)
        return grad_v, None, grad_w, grad_b, None
