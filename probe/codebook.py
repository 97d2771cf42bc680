"""Codebook bottlenecks (Tamkin, Taufeeque & Goodman, "Codebook Features: Sparse and Discrete Interpretability
for Neural Networks"): a layer's output is replaced by the sum of the ``k`` codes of a learned codebook most
cosine-similar to it, so every forward pass through that layer is described by k discrete code ids.

    q(x) = sum_{i in topk_i cos(x, c_i)} c_i

Training is straight-through: the forward value is q(x); the gradient reaches x unchanged (as if q were the
identity) and reaches the selected codes through the sum. A model with codebooks is a HookedTransformer with a
permanent hook at each quantised site (``attach``), so caching, steering and the dashboard see the quantised
model with no code of their own; a directory written by ``saes.codebook`` (the zoo layout plus
``codebooks.json`` and ``codebooks.safetensors``) loads that way through ``probe.models.load_model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from probe.errors import SteerscopeError

FORMAT = "steerscope.codebooks"
VERSION = 1


class Codebook(nn.Module):
    """``n_codes`` codes of width ``d``; ``k`` of them are active per position."""

    def __init__(self, n_codes: int, d: int, k: int):
        super().__init__()
        for name, v in (("n_codes", n_codes), ("d", d), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SteerscopeError(f"{name} must be a positive integer, got {v!r}")
        if k > n_codes:
            raise SteerscopeError(f"k={k} codes active per position needs at least that many codes (n_codes={n_codes})")
        self.k = k
        self.codes = nn.Parameter(torch.randn(n_codes, d) / d**0.5)
        self.record: list[Tensor] | None = None  # a list: every forward appends its code ids [..., k] (cpu)
        self.last_input: Tensor | None = None  # in training mode: the latest input rows [N, d] (dead-code refresh)

    @property
    def n_codes(self) -> int:
        return self.codes.shape[0]

    def select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(ids [..., k], cosine similarities [..., k]) of the k codes nearest to x in angle, best first."""
        if x.shape[-1] != self.codes.shape[1]:
            raise SteerscopeError(f"a codebook of width {self.codes.shape[1]} got an activation of width {x.shape[-1]}")
        sims = nn.functional.normalize(x.detach(), dim=-1) @ nn.functional.normalize(self.codes.detach(), dim=-1).T
        top = sims.topk(self.k, dim=-1)
        return top.indices, top.values

    def quantize(self, ids: Tensor) -> Tensor:
        """The sum of the codes ``ids`` [..., k] (differentiable in the codes)."""
        return self.codes[ids].sum(-2)

    def forward(self, x: Tensor) -> Tensor:
        ids, _ = self.select(x)
        if self.record is not None:
            self.record.append(ids.detach().cpu())
        if self.training:
            self.last_input = x.detach().reshape(-1, x.shape[-1])
        q = self.quantize(ids).to(x.dtype)
        return q + (x - x.detach())  # value q(x); gradient to x straight through


def attach(model, codebooks: dict[str, Codebook]) -> None:
    """Quantise each site of ``codebooks`` (a TransformerLens hook name) with a permanent hook. The codebooks are
    kept on ``model.codebooks`` (a plain dict, so the model's own parameters and weight files are unchanged)."""
    from probe.sites import resolve_one

    if getattr(model, "codebooks", None):
        raise SteerscopeError("this model already has codebooks attached; load a fresh model")
    resolved = {resolve_one(model, s): cb for s, cb in codebooks.items()}
    for site, cb in resolved.items():
        cb.to(model.cfg.device)
        model.add_perma_hook(site, lambda act, hook, cb=cb: cb(act))
    object.__setattr__(model, "codebooks", resolved)


def save_codebooks(codebooks: dict[str, Codebook], path: Path) -> None:
    from safetensors.torch import save_file

    from probe.store_files import atomic_write

    meta = {"format": FORMAT, "version": VERSION,
            "sites": {s: {"n_codes": cb.n_codes, "d": cb.codes.shape[1], "k": cb.k} for s, cb in codebooks.items()}}
    tmp = path / ".codebooks.safetensors.tmp"
    save_file({s: cb.codes.detach().float().contiguous().cpu() for s, cb in codebooks.items()}, str(tmp))
    tmp.replace(path / "codebooks.safetensors")
    atomic_write(path / "codebooks.json", json.dumps(meta, indent=2).encode())


def load_codebooks(path: Path) -> dict[str, Codebook]:
    """The codebooks saved in directory ``path`` (strict: sites, shapes and finiteness checked)."""
    try:
        meta = json.loads((path / "codebooks.json").read_text())
        weights = load_file(str(path / "codebooks.safetensors"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise SteerscopeError(f"{path}: cannot read its codebooks ({str(e).splitlines()[0][:120]})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("sites"), dict):
        raise SteerscopeError(f"{path / 'codebooks.json'} is not a steerscope codebook file")
    if meta.get("version", VERSION) > VERSION:
        raise SteerscopeError(f"{path / 'codebooks.json'} has version {meta['version']}; upgrade steerscope")
    out = {}
    for site, m in meta["sites"].items():
        w = weights.get(site)
        if w is None or tuple(w.shape) != (m["n_codes"], m["d"]) or not torch.isfinite(w).all():
            raise SteerscopeError(f"{path / 'codebooks.safetensors'}: the codes of {site} are missing, misshapen or "
                                  "not finite")
        cb = Codebook(m["n_codes"], m["d"], m["k"])
        with torch.no_grad():
            cb.codes.copy_(w)
        out[site] = cb
    return out
