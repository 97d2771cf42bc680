"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic's "April update" form)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saes.base import DictionaryConfig, DictOutput, LinearDictionary, register


@dataclass
class ReLUConfig(DictionaryConfig):
    l1_coeff: float = 5.0  # weight of sum_i f_i * ||W_dec,i|| in the loss
    normalize_decoder: bool = False  # the norm-weighted L1 makes unit rows unnecessary


@register("relu")
class ReLUSAE(LinearDictionary):
    Config = ReLUConfig

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, x: Tensor, target: Tensor | None = None, **state) -> tuple[Tensor, DictOutput]:
        codes = self.encode(x)
        recon = self.decode(codes)
        mse = self.mse(recon, x, target)
        l1 = (codes * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + self.cfg.l1_coeff * l1
        return loss, DictOutput(recon, codes, {"mse": mse.detach(), "l1": l1.detach()})
