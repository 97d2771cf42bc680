"""Fused top-k encoder, sparse decoder and sparse backward for TopK dictionaries.

A TopK step needs one dense operation, the encoder GEMM (``2 * d * M`` FLOPs per row); everything
after it scales with ``k``:

- :func:`topk_encode` computes ``x @ W_enc + b_enc`` tile by tile and keeps a running top-k per row,
  so the ``N x M`` pre-activation matrix is never written (Triton on CUDA, tiled torch on CPU);
- :func:`sparse_decode` sums ``k`` decoder rows per row (Triton on CUDA, ``embedding_bag`` on CPU);
- their backward passes touch only the ``N * k`` selected (row, latent) pairs
  (:mod:`saes.kernels.autograd`), for ``x``, ``W_enc``, ``b_enc``, ``W_dec`` and ``b_dec``;
- :func:`topk_sae_forward` composes them into a TopK SAE / transcoder forward and
  :func:`auxk_forward` gives the AuxK reconstruction from dead latents with encoder gradients.

Layouts: ``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` is ``[d_sae, d_out]``. Storing the encoder as a
``[d_sae, d_in]`` parameter and passing its ``.T`` saves a transpose per backward on CPU.
Ties are broken by the lowest latent id on every backend (see :mod:`saes.kernels.keys`).
"""

from saes.kernels.api import (
    TopK,
    TopKSAEOutput,
    auxk_forward,
    resolve_backend,
    sparse_decode,
    topk_encode,
    topk_sae_forward,
    triton_available,
)

__all__ = [
    "TopK",
    "TopKSAEOutput",
    "auxk_forward",
    "resolve_backend",
    "sparse_decode",
    "topk_encode",
    "topk_sae_forward",
    "triton_available",
]
