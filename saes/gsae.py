"""g-SAE: the gradient-aware TopK SAE of "Features that Make a Difference" (Olmo et al. 2024, arXiv 2411.10397).

A TopK SAE picks the k largest activations z = ReLU(P), P = (x - b_dec) W_enc + b_enc. A g-SAE also
weighs how much each latent moves the language model's loss. With g = dL/dx [d_in], the gradient of
the downstream LM loss with respect to the input activation x, W_dec,i . g is the first-order change
of L per unit of latent i (its decoder row is the direction it writes), and the paper augments the
TopK selection with that term:

    score = z + beta * z * |W_dec g|               (|W_dec g|_i = |W_dec,i . g|, [d_sae])
    S     = TopK_k(score)                          (the k selected latents)
    codes = z on S, 0 elsewhere                    (values are still the ReLU pre-activations)

so a latent with a small activation but a large effect on the loss can win a slot. The selection is
not differentiated (it is discrete); gradients reach the weights through z and the reconstruction,
as in TopK, and the AuxK loss of ``saes.topk`` revives dead latents.

Without a gradient (``grad=None``: inference on stored activations, steering, the feature store),
``encode`` falls back to plain TopK, i.e. beta = 0; ``training_loss`` refuses to, because a g-SAE
trained without gradients is a TopK SAE under another name. Gradients come from the live model:
``collect_with_grads(model, tokens, site)`` returns activations and the gradient of the summed
next-token cross-entropy with respect to them, per token. Folding an input scale s needs no
extra care: on raw inputs the gradient is s times that on scaled inputs, and W_dec is divided by s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from probe.errors import SteerscopeError
from probe.hooks import hooks
from probe.sites import resolve_one
from saes.base import DictOutput, LinearDictionary, register
from saes.topk import TopKConfig, auxk_loss, topk_codes


@dataclass
class GSAEConfig(TopKConfig):
    beta: float = 1.0  # weight of the gradient term: score = z * (1 + beta * |W_dec g|)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_out != self.d_in:
            raise SteerscopeError(f"a gsae reconstructs its input: d_out must equal d_in={self.d_in}, got {self.d_out}")
        if self.beta < 0:
            raise SteerscopeError(f"beta must be >= 0, got {self.beta}")


def gsae_codes(pre: Tensor, W_dec: Tensor, grad: Tensor | None, k: int, beta: float) -> Tensor:
    """Dense codes: z = ReLU(pre) kept at the top k of z * (1 + beta |grad W_dec^T|); plain TopK if grad is None."""
    if grad is None or beta == 0:
        return topk_codes(pre, k)
    z = torch.relu(pre)
    with torch.no_grad():
        score = z * (1 + beta * (grad @ W_dec.T).abs())
        idx = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))


@register("gsae")
class GradientSAE(LinearDictionary):
    Config = GSAEConfig
    capabilities = LinearDictionary.capabilities | {"needs_grad"}

    def max_active(self) -> int:
        return self.cfg.k

    def _check_grad(self, x: Tensor, grad: Tensor | None) -> None:
        if grad is not None and grad.shape != x.shape:
            raise SteerscopeError(f"grad must have the input's shape {tuple(x.shape)} (dL/dx per token), got {tuple(grad.shape)}")

    def activation(self, pre: Tensor) -> Tensor:
        return topk_codes(pre, self.cfg.k)

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        """g-SAE codes of x; with ``grad=None`` plain TopK (the gradient-free inference path)."""
        self._check_grad(x, grad)
        return gsae_codes(self.pre_acts(x), self.W_dec, grad, self.cfg.k, self.cfg.beta)

    def forward(self, x: Tensor, target: Tensor | None = None, grad: Tensor | None = None) -> DictOutput:
        codes = self.encode(x, grad)
        return DictOutput(self.decode(codes), codes, {})

    def training_loss(self, x: Tensor, target: Tensor | None = None, grad: Tensor | None = None,
                      dead: Tensor | None = None, **state) -> tuple[Tensor, DictOutput]:
        """MSE(decode(g-TopK codes), x) + aux_coeff * AuxK; ``grad`` [N, d_in] is required."""
        if grad is None:
            raise SteerscopeError("gsae training needs grad, the LM-loss gradient at the input site per token "
                                  "(saes.gsae.collect_with_grads(model, tokens, site)); train it from the model, not a store")
        self._check_grad(x, grad)
        pre = self.pre_acts(x)
        codes = gsae_codes(pre, self.W_dec, grad, self.cfg.k, self.cfg.beta)
        recon = self.decode(codes)
        mse = self.mse(recon, x, target)
        goal = x if target is None else target
        aux = auxk_loss(pre, goal - recon, self.W_dec, dead, self.cfg.aux_k or self.cfg.d_in // 2)
        loss = mse + self.cfg.aux_coeff * aux
        return loss, DictOutput(recon, codes, {"mse": mse.detach(), "auxk": aux.detach()})


def collect_with_grads(model, tokens: Tensor, site: str) -> tuple[Tensor, Tensor]:
    """Activations at ``site`` and dL/d(activation), from one forward and backward pass of the live model.

    L = sum over positions t < T-1 of CE(logits_t, tokens_{t+1}), the next-token loss summed (not
    averaged) so a token's gradient does not depend on the batch size. The activation at position t
    influences the losses at t and after (attention), and its gradient includes all of them. The
    first position (BOS) is excluded; the last position has no next token and, as nothing later
    reads it, its gradient is zero. Returns (acts, grads), both [B * (T - 1), d] (trailing site
    dims flattened), detached. Only the site's gradient is computed: no parameter ``.grad`` changes.
    """
    site = resolve_one(model, site)
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise SteerscopeError(f"tokens must be [batch, pos] with pos >= 2, got shape {tuple(tokens.shape)}")
    seen: dict[str, Tensor] = {}

    def grab(t: Tensor, hook) -> Tensor:
        leaf = t.detach().requires_grad_(True)
        seen["act"] = leaf
        return leaf

    with torch.enable_grad(), hooks(model, [(site, grab)]):
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, seen["act"])
    act = seen["act"].detach()
    B, T = tokens.shape
    return act[:, 1:].reshape(B * (T - 1), -1), grad[:, 1:].reshape(B * (T - 1), -1)
