"""Distributed Alignment Search (DAS): learn the subspace that carries a causal variable.

Given (base, source, expected) triples, where ``expected`` is the token the model should predict
if the variable took its source value, DAS learns B [d, r] with orthonormal columns
(``torch.nn.utils.parametrizations.orthogonal``) so that the rank-r interchange intervention

    h' = h_b + B B^T (h_s - h_b)      at ``site``, sequence position ``position``

makes the model predict ``expected`` at ``read_position``. Loss: cross-entropy of the patched logits
toward ``expected`` (Geiger et al.; Makelov et al.'s ``patch_training``), model frozen, Adam.
Interchange-intervention accuracy (IIA) = the fraction of triples whose patched argmax is ``expected``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from probe.errors import SteerscopeError
from probe.sites import resolve_one
from steering.patching import Patch, cache_site, paired_tokens, patched_logits


@dataclass(frozen=True, repr=False)
class DASResult:
    """A learned basis [d, r] and its interchange-intervention accuracy on the training triples."""

    site: str
    position: int
    basis: torch.Tensor
    iia: float
    loss: float  # final training cross-entropy
    steps: int

    @property
    def patch(self) -> Patch:
        """The learned intervention as a ``Patch`` (run it with ``run_patch`` or save it)."""
        return Patch.subspace(self.site, self.basis, (self.position,))

    def __repr__(self) -> str:
        return (f"DASResult({self.site!r}, position={self.position}, rank={self.basis.shape[1]}, "
                f"iia={self.iia:.3f}, loss={self.loss:.4f}, steps={self.steps})")


def _expected(expected, n: int) -> torch.Tensor:
    e = torch.as_tensor(expected)
    if e.ndim != 1 or e.shape[0] != n or e.is_floating_point():
        raise SteerscopeError(f"expected_tokens must be {n} integer token ids (one per pair), got shape {tuple(e.shape)}")
    return e.long()


def interchange_accuracy(model, p: Patch, base_tokens, source_tokens, expected_tokens, read_position: int = -1) -> float:
    """IIA of a patch: the fraction of pairs whose patched prediction at ``read_position`` is ``expected``."""
    base, source = paired_tokens(model, base_tokens, source_tokens)
    expected = _expected(expected_tokens, base.shape[0]).to(base.device)
    site = resolve_one(model, p.site)
    h_s = cache_site(model, source, site)
    with torch.no_grad():
        logits = patched_logits(model, site, p.positions, base, h_s, p.mix)
    return float((logits[:, read_position].argmax(-1) == expected).float().mean())


def train_das(model, base_tokens, source_tokens, expected_tokens, site: str, position: int, rank: int = 1,
              steps: int = 200, lr: float = 1e-2, seed: int = 0, read_position: int = -1) -> DASResult:
    """Learn a rank-``rank`` orthonormal basis at ``site``/``position`` maximising IIA (full-batch Adam)."""
    base, source = paired_tokens(model, base_tokens, source_tokens)
    expected = _expected(expected_tokens, base.shape[0]).to(base.device)
    site = resolve_one(model, site)
    if not isinstance(position, int) or not -base.shape[1] <= position < base.shape[1]:
        raise SteerscopeError(f"position {position!r} out of range for sequences of length {base.shape[1]}")
    if not isinstance(steps, int) or steps < 1 or not lr > 0:
        raise SteerscopeError(f"steps must be a positive int and lr > 0 (got steps={steps!r}, lr={lr!r})")
    h_s = cache_site(model, source, site)
    d = h_s.shape[-1]
    if not isinstance(rank, int) or not 1 <= rank <= d:
        raise SteerscopeError(f"rank must be an int from 1 to {d} (the dimension of {site}), got {rank!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rot = orthogonal(nn.Linear(rank, d, bias=False)).to(h_s.device)  # weight [d, rank], orthonormal columns
    opt = torch.optim.Adam(rot.parameters(), lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        for _ in range(steps):
            b = rot.weight.to(h_s.dtype)
            logits = patched_logits(model, site, (position,), base, h_s,
                                    lambda h_b, h_src, b=b: h_b + ((h_src - h_b) @ b) @ b.T)
            loss = nn.functional.cross_entropy(logits[:, read_position].float(), expected)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    with torch.no_grad():
        basis = rot.weight.detach().float().cpu().clone()
    result = DASResult(site, position, basis, 0.0, float(loss.detach()), steps)
    iia = interchange_accuracy(model, result.patch, base, source, expected, read_position)
    return DASResult(site, position, basis, iia, result.loss, steps)
