"""Transcoders (Dunefsky et al. 2024): a sparse, wider replacement of an MLP, from its input site to its output.

A transcoder reads x at an input site (e.g. ``blocks.L.ln2.hook_normalized``, width d_in) and predicts
y at a target site (e.g. ``blocks.L.hook_mlp_out``, width d_out, which may differ from d_in):

    codes = act(x W_enc + b_enc)                          (no b_dec subtracted from x: it lives in y's space)
    y_hat = codes W_dec + b_dec                      [+ x W_skip for ``skip_transcoder``]
    loss  = sum_d (y - y_hat)^2  (+ aux_coeff * AuxK for TopK | + l1_coeff * sum_i codes_i ||W_dec,i|| for ReLU)

``act`` is TopK by default (``saes.topk``'s functions, AuxK included) or ReLU with the decoder-norm
weighted L1 (the form SAELens' inference ``transcoder`` class reads). The skip variant (Paulo et al.
2025, "Transcoders Beat Sparse Autoencoders for Interpretability") adds a linear term x W_skip,
W_skip [d_in, d_out] initialised to zero. ``decode(codes)`` is the sparse part only; ``forward`` adds
the skip term. A transcoder always has a target: its config needs ``target_site`` and
``training_loss`` a ``target``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from probe.errors import SteerscopeError
from saes.base import DictionaryConfig, DictOutput, LinearDictionary, register
from saes.topk import auxk_loss, fused_topk_loss, topk_codes


@dataclass
class TranscoderConfig(DictionaryConfig):
    activation: Literal["topk", "relu"] = "topk"  # sparsity: exactly-k TopK, or ReLU + L1
    k: int = 32  # active latents per token (activation="topk")
    aux_k: int | None = None  # latents used by AuxK; None: d_out // 2 (activation="topk")
    aux_coeff: float = 1 / 32  # weight of the AuxK loss (activation="topk")
    fused: bool = True  # activation="topk": train through the fused top-k kernels (saes.kernels)
    l1_coeff: float = 5.0  # weight of sum_i codes_i * ||W_dec,i|| (activation="relu")
    apply_b_dec_to_input: bool = False  # must stay False: b_dec lives in the target's space

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.target_site:
            raise SteerscopeError(f"a {self.architecture or 'transcoder'} predicts a target site: give target_site "
                                  "(e.g. 'blocks.2.hook_mlp_out' for site 'blocks.2.ln2.hook_normalized')")
        if self.apply_b_dec_to_input:
            raise SteerscopeError("apply_b_dec_to_input must be False for transcoders (b_dec has the target's width)")
        if self.activation not in ("topk", "relu"):
            raise SteerscopeError(f"transcoder activation must be 'topk' or 'relu', got {self.activation!r}")
        if self.activation == "topk" and not 1 <= self.k <= self.d_sae:
            raise SteerscopeError(f"k must be between 1 and d_sae={self.d_sae}, got k={self.k}")


@dataclass
class SkipTranscoderConfig(TranscoderConfig):
    """Same fields; a separate class so each registered architecture owns its config."""


@register("transcoder")
class Transcoder(LinearDictionary):
    Config = TranscoderConfig
    capabilities = LinearDictionary.capabilities | {"needs_target"}

    def activation(self, pre: Tensor) -> Tensor:
        return topk_codes(pre, self.cfg.k) if self.cfg.activation == "topk" else torch.relu(pre)

    def max_active(self) -> int | None:
        return self.cfg.k if self.cfg.activation == "topk" else None

    def skip(self, x: Tensor) -> Tensor | None:
        """The linear skip term x W_skip (None for the plain transcoder)."""
        return None

    def predict(self, x: Tensor, codes: Tensor) -> Tensor:
        """y_hat = decode(codes) [+ skip(x)]."""
        y = self.decode(codes)
        s = self.skip(x)
        return y if s is None else y + s

    def forward(self, x: Tensor, target: Tensor | None = None) -> DictOutput:
        """Predict the target site's activation from x; ``target`` (optional here) is only shape-checked."""
        self.check_input(x, target)
        codes = self.encode(x)
        return DictOutput(self.predict(x, codes), codes, {})

    def training_loss(self, x: Tensor, target: Tensor | None = None, dead: Tensor | None = None, **state) -> tuple[Tensor, DictOutput]:
        if target is None:
            raise SteerscopeError(f"a {self.architecture} is trained to predict {self.cfg.target_site} from {self.cfg.site}: "
                                  "training_loss needs target (activations at the target site), got None")
        self.check_input(x, target)
        if self.cfg.activation == "topk" and self.cfg.fused:
            return fused_topk_loss(self, x, target, dead, skip=self.skip(x))
        pre = self.pre_acts(x)
        codes = self.activation(pre)
        recon = self.predict(x, codes)
        mse = self.mse(recon, x, target)
        if self.cfg.activation == "topk":
            aux = auxk_loss(pre, target - recon, self.W_dec, dead, self.cfg.aux_k or self.cfg.d_out // 2)
            loss, extra = mse + self.cfg.aux_coeff * aux, {"auxk": aux.detach()}
        else:
            l1 = (codes * self.W_dec.norm(dim=1)).sum(-1).mean()
            loss, extra = mse + self.cfg.l1_coeff * l1, {"l1": l1.detach()}
        return loss, DictOutput(recon, codes, {"mse": mse.detach(), **extra})


@register("skip_transcoder")
class SkipTranscoder(Transcoder):
    Config = SkipTranscoderConfig

    def __init__(self, cfg: SkipTranscoderConfig):
        super().__init__(cfg)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out))

    def skip(self, x: Tensor) -> Tensor:
        return x @ self.W_skip
