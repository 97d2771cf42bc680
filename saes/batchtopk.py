"""BatchTopK SAE (Bussmann et al. 2024): top k*N over the whole batch in training, a threshold at inference.

Training, for a batch of N rows with pre-activations P = (x - b_dec) W_enc + b_enc [N, d_sae]:

    codes = ReLU(P) masked to the k*N largest entries of ReLU(P) over the flattened batch,

so rows share a budget of k*N latents (k on average, not exactly k per row). The AuxK term of
``saes.topk`` revives dead latents.

Inference must not depend on the other rows of a batch, so each training step also updates a
scalar threshold theta by an exponential moving average of the smallest selected activation,

    theta <- (1 - lr) * theta + lr * min{codes > 0}        (theta starts at the first such minimum),

and ``encode`` outside training mode is a JumpReLU with that threshold: codes = P * [P > theta].
theta is a buffer, saved with the weights (``threshold``); before any training step it is -1,
which makes inference a plain ReLU. SAELens exports it as a ``jumprelu`` SAE with theta per latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from saes.base import DictOutput, LinearDictionary, register
from saes.topk import TopKConfig, auxk_loss


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_lr: float = 0.01  # EMA rate of the inference threshold (SAELens' topk_threshold_lr)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.threshold_lr <= 1.0:
            raise SteerscopeError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")


def batch_topk_codes(pre: Tensor, k: int) -> Tensor:
    """ReLU(pre) kept at the k * N largest entries of the flattened [N, d_sae] batch, zeros elsewhere."""
    acts = torch.relu(pre)
    flat = acts.flatten()
    n_keep = min(k * acts.shape[0], flat.numel())
    vals, idx = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(acts)


@register("batchtopk")
class BatchTopKSAE(LinearDictionary):
    Config = BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float64))

    def activation(self, pre: Tensor) -> Tensor:
        if self.training:
            return batch_topk_codes(pre, self.cfg.k)
        return self.threshold_codes(pre)

    def threshold_codes(self, pre: Tensor) -> Tensor:
        """The inference path: P * [P > theta] (with theta < 0 before training: ReLU)."""
        theta = self.threshold.to(pre.dtype)
        return torch.relu(pre) * (pre > theta)

    @torch.no_grad()
    def update_threshold(self, codes: Tensor) -> None:
        """EMA of the smallest positive selected activation (the first step sets it directly)."""
        positive = codes[codes > 0]
        if positive.numel() == 0:
            return
        m = positive.min().to(torch.float64)
        if self.threshold < 0:
            self.threshold.copy_(m)
        else:
            lr = self.cfg.threshold_lr
            self.threshold.mul_(1 - lr).add_(lr * m)

    def training_loss(self, x: Tensor, target: Tensor | None = None, dead: Tensor | None = None, **state) -> tuple[Tensor, DictOutput]:
        """MSE(decode(batch_topk(P)), x) + aux_coeff * AuxK; updates theta when in training mode."""
        pre = self.pre_acts(x)
        codes = batch_topk_codes(pre, self.cfg.k)
        if self.training:
            self.update_threshold(codes)
        recon = self.decode(codes)
        mse = self.mse(recon, x, target)
        goal = x if target is None else target
        aux = auxk_loss(pre, goal - recon, self.W_dec, dead, self.cfg.aux_k or self.cfg.d_in // 2)
        loss = mse + self.cfg.aux_coeff * aux
        return loss, DictOutput(recon, codes, {"mse": mse.detach(), "auxk": aux.detach()})
