"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents.

codes = ReLU(TopK_k(pre)) keeps the k largest pre-activations per row. AuxK: decode the top
``k_aux`` pre-activations among *dead* latents and fit the residual x - x_hat (detached), scaled by
``aux_coeff`` and by min(1, n_dead / k_aux), which gives dead latents a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from saes.base import DictionaryConfig, DictOutput, LinearDictionary, register


@dataclass
class TopKConfig(DictionaryConfig):
    k: int = 32  # active latents per token
    aux_k: int | None = None  # latents used by AuxK; None: d_in // 2
    aux_coeff: float = 1 / 32  # weight of the AuxK loss
    fused: bool = True  # train with the fused top-k encoder + sparse decode/backward (saes.kernels; topk only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= self.d_sae:
            raise SteerscopeError(f"k must be between 1 and d_sae={self.d_sae}, got k={self.k}")


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Dense [N, d_sae] codes: ReLU of the k largest pre-activations per row, zeros elsewhere."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


def auxk_loss(pre: Tensor, residual: Tensor, W_dec: Tensor, dead: Tensor | None, aux_k: int) -> Tensor:
    """AuxK term: decode the top-aux_k dead pre-activations and fit the (detached) residual."""
    if dead is None or not bool(dead.any()):
        return pre.new_zeros(())
    n_dead = int(dead.sum())
    k = min(aux_k, n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(k, dim=-1, sorted=False)
    aux_recon = torch.relu(vals).unsqueeze(-1).mul(W_dec[idx]).sum(-2)
    scale = min(1.0, n_dead / aux_k)
    return scale * (aux_recon - residual.detach()).pow(2).sum(-1).mean()


@register("topk")
class TopKSAE(LinearDictionary):
    Config = TopKConfig

    def activation(self, pre: Tensor) -> Tensor:
        return topk_codes(pre, self.cfg.k)

    def max_active(self) -> int:
        return self.cfg.k

    def training_loss(self, x: Tensor, target: Tensor | None = None, dead: Tensor | None = None, **state) -> tuple[Tensor, DictOutput]:
        if self.cfg.fused:
            return fused_topk_loss(self, x, target, dead)
        pre = self.pre_acts(x)
        codes = topk_codes(pre, self.cfg.k)
        recon = self.decode(codes)
        mse = self.mse(recon, x, target)
        goal = x if target is None else target
        aux = auxk_loss(pre, goal - recon, self.W_dec, dead, self.cfg.aux_k or self.cfg.d_in // 2)
        loss = mse + self.cfg.aux_coeff * aux
        return loss, DictOutput(recon, codes, {"mse": mse.detach(), "auxk": aux.detach()})


def fused_topk_loss(sae: LinearDictionary, x: Tensor, target: Tensor | None, dead: Tensor | None,
                    skip: Tensor | None = None) -> tuple[Tensor, DictOutput]:
    """The TopK loss through saes.kernels: the N x d_sae pre-activations are never materialised and the
    backward touches only the selected (row, latent) pairs. Equal to the dense path (tested).

    ``codes`` in the output are a sparse COO tensor [N, d_sae] (N * k stored entries, no gradient) for the
    trainer's L0/firing statistics, so no N x d_sae tensor is made anywhere in the step.
    """
    from saes.kernels import auxk_forward, topk_sae_forward

    sae.check_input(x)
    shift = sae.b_dec if sae.cfg.apply_b_dec_to_input and sae.cfg.d_in == sae.cfg.d_out else None
    out = topk_sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.cfg.k, pre_bias=shift)
    recon = out.x_hat if skip is None else out.x_hat + skip
    goal = x if target is None else target
    mse = (recon - goal).pow(2).sum(-1).mean()
    aux = mse.new_zeros(())
    if dead is not None and bool(dead.any()):
        aux_k = sae.cfg.aux_k or sae.cfg.d_out // 2
        e_hat = auxk_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, aux_k, dead, pre_bias=shift).x_hat
        aux = min(1.0, int(dead.sum()) / aux_k) * (e_hat - (goal - recon).detach()).pow(2).sum(-1).mean()
    with torch.no_grad():
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(out.indices.shape[1])
        codes = torch.sparse_coo_tensor(torch.stack([rows, out.indices.reshape(-1)]), out.acts.detach().reshape(-1),
                                        (x.shape[0], sae.cfg.d_sae), check_invariants=False)  # valid by construction
    loss = mse + sae.cfg.aux_coeff * aux
    return loss, DictOutput(recon, codes, {"mse": mse.detach(), "auxk": aux.detach()})
