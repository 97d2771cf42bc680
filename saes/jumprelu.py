"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead") with straight-through threshold gradients.

With pre-activations P = (x - b_dec) W_enc + b_enc and a per-latent threshold theta = exp(log_threshold) > 0,

    codes_i = JumpReLU(P_i) = P_i * H(P_i - theta_i),          H the Heaviside step,
    loss    = sum_d (x - x_hat)^2 + l0_coeff * sum_i H(P_i - theta_i)     (both averaged over rows).

H has zero gradient almost everywhere, so theta learns through a straight-through estimator with the
rectangle kernel K(u) = [|u| < 1/2] and bandwidth eps:

    d JumpReLU(P)/d theta ~ -(theta / eps) K((P - theta) / eps),     d H(P - theta)/d theta ~ -(1/eps) K((P - theta) / eps).

P gets the exact gradient H(P - theta) through JumpReLU and none through the L0 step (the GDM
recipe; SAELens' default). Storing log theta keeps theta positive, so ``codes`` equal SAELens'
ReLU(P) * [P > theta] exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from probe.errors import SteerscopeError
from saes.base import DictionaryConfig, DictOutput, LinearDictionary, register


@dataclass
class JumpReLUConfig(DictionaryConfig):
    init_threshold: float = 0.001  # theta at initialisation (for every latent)
    bandwidth: float = 0.05  # eps, the width of the rectangle kernel of the straight-through estimator
    l0_coeff: float = 1.0  # weight of the L0 penalty sum_i H(P_i - theta_i)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_threshold <= 0 or self.bandwidth <= 0 or self.l0_coeff < 0:
            raise SteerscopeError("jumprelu needs init_threshold > 0, bandwidth > 0 and l0_coeff >= 0, got "
                                  f"{self.init_threshold}, {self.bandwidth}, {self.l0_coeff}")


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 where |u| < 1/2, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient [..., d_sae] back to the threshold's shape [d_sae]."""
    return grad.reshape(-1, like.shape[-1]).sum(0)


class Step(torch.autograd.Function):
    """H(P - theta); gradient to theta by the rectangle STE, none to P."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = -(1.0 / eps) * rectangle((pre - theta) / eps) * grad
        return None, _sum_to(g_theta, theta), None


class JumpReLUFn(torch.autograd.Function):
    """P * H(P - theta); exact gradient to P, rectangle STE to theta."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = (pre > theta).to(grad.dtype) * grad
        g_theta = -(theta / eps) * rectangle((pre - theta) / eps) * grad
        return g_pre, _sum_to(g_theta, theta), None


@register("jumprelu")
class JumpReLUSAE(LinearDictionary):
    Config = JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))

    @property
    def threshold(self) -> Tensor:
        """theta = exp(log_threshold) [d_sae], always > 0."""
        return self.log_threshold.exp()

    def activation(self, pre: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre, self.threshold, self.cfg.bandwidth)

    def training_loss(self, x: Tensor, target: Tensor | None = None, **state) -> tuple[Tensor, DictOutput]:
        """MSE + l0_coeff * mean_rows sum_i H(P_i - theta_i), both with STE gradients to theta."""
        pre = self.pre_acts(x)
        theta = self.threshold
        codes = JumpReLUFn.apply(pre, theta, self.cfg.bandwidth)
        recon = self.decode(codes)
        mse = self.mse(recon, x, target)
        l0 = Step.apply(pre, theta, self.cfg.bandwidth).sum(-1).mean()
        loss = mse + self.cfg.l0_coeff * l0
        return loss, DictOutput(recon, codes, {"mse": mse.detach(), "l0": l0.detach()})
