"""Distributed Alignment Search (DAS): learn the subspace that carries a causal variable.

Given (base, source, expected) triples, where ``expected`` is the token the model should predict
if the variable took its source value, DAS learns B [d, r] with orthonormal columns
(``torch.nn.utils.parametrizations.orthogonal``) so that the rank-r interchange intervention

    h' = h_b + B B^T (h_s - h_b)      at ``site``, sequence position ``position``

makes the model predict ``expected`` at ``read_position``. Loss: cross-entropy of the patched logits
toward ``expected`` (Geiger et al.; Makelov et al.'s ``patch_training``), model frozen, Adam.
Interchange-intervention accuracy (IIA) = the fraction of triples whose patched argmax is ``expected``.
A subspace fitted on the training triples can reach a high IIA there by overfitting, so pass held-out
triples (``test=``, e.g. from :func:`split_pairs`) and read ``test_iia``.

Prompts may differ in length (``steering.padding``): ``position`` counts from the start for p >= 0 and
from each prompt's last token for p < 0; ``read_position`` indexes the end-aligned logits (-1 = each
prompt's last token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from probe.errors import SteerscopeError
from probe.sites import resolve_one
from steering.patching import Patch, cache_site, pair_columns, paired_tokens, patched_logits


@dataclass(frozen=True, repr=False)
class DASResult:
    """A learned basis [d, r] and its interchange-intervention accuracy on the training and held-out triples."""

    site: str
    position: int
    basis: torch.Tensor
    iia: float  # on the training triples
    loss: float  # final training cross-entropy
    steps: int
    test_iia: float | None = None  # on the held-out triples (None: none given)
    n_train: int = 0
    n_test: int = 0

    @property
    def patch(self) -> Patch:
        """The learned intervention as a ``Patch`` (run it with ``run_patch`` or save it)."""
        return Patch.subspace(self.site, self.basis, (self.position,))

    def __repr__(self) -> str:
        test = "no held-out pairs" if self.test_iia is None else f"test_iia={self.test_iia:.3f} ({self.n_test} pairs)"
        return (f"DASResult({self.site!r}, position={self.position}, rank={self.basis.shape[1]}, "
                f"iia={self.iia:.3f} ({self.n_train} pairs), {test}, loss={self.loss:.4f}, steps={self.steps})")


def _expected(expected, n: int) -> torch.Tensor:
    e = torch.as_tensor(expected)
    if e.ndim != 1 or e.shape[0] != n or e.is_floating_point():
        raise SteerscopeError(f"expected_tokens must be {n} integer token ids (one per pair), got shape {tuple(e.shape)}")
    return e.long()


def split_pairs(n: int, test_frac: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, test) row indices of ``n`` pairs, shuffled by ``seed``; at least one of each when n >= 2
    (with one pair, everything trains and nothing is held out)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SteerscopeError(f"need at least one pair, got n={n!r}")
    if not 0 <= test_frac < 1:
        raise SteerscopeError(f"test_frac must be in [0, 1), got {test_frac!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = 0 if n < 2 or test_frac == 0 else min(n - 1, max(1, round(n * test_frac)))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def interchange_accuracy(model, p: Patch, base_tokens, source_tokens, expected_tokens, read_position: int = -1) -> float:
    """IIA of a patch: the fraction of pairs whose patched prediction at ``read_position`` is ``expected``."""
    base, source = paired_tokens(model, base_tokens, source_tokens)
    expected = _expected(expected_tokens, len(base)).to(base.tokens.device)
    site = resolve_one(model, p.site)
    h_s = cache_site(model, source, site)
    with torch.no_grad():
        logits = patched_logits(model, site, p.positions, base, source, h_s, p.mix)
    return float((logits[:, read_position].argmax(-1) == expected).float().mean())


def train_das(model, base_tokens, source_tokens, expected_tokens, site: str, position: int, rank: int = 1,
              steps: int = 200, lr: float = 1e-2, seed: int = 0, read_position: int = -1,
              test: tuple | None = None) -> DASResult:
    """Learn a rank-``rank`` orthonormal basis at ``site``/``position`` maximising IIA (full-batch Adam).

    ``test=(base, source, expected)``: held-out triples, never trained on, whose IIA is ``test_iia``.
    """
    base, source = paired_tokens(model, base_tokens, source_tokens)
    expected = _expected(expected_tokens, len(base)).to(base.tokens.device)
    site = resolve_one(model, site)
    if isinstance(position, bool) or not isinstance(position, int):
        raise SteerscopeError(f"position must be an int, got {position!r}")
    pair_columns(base, source, (position,))  # in range for every prompt
    if not isinstance(steps, int) or steps < 1 or not lr > 0:
        raise SteerscopeError(f"steps must be a positive int and lr > 0 (got steps={steps!r}, lr={lr!r})")
    if test is not None and (not isinstance(test, tuple | list) or len(test) != 3):
        raise SteerscopeError("test= takes a (base, source, expected) triple of held-out pairs")
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
            logits = patched_logits(model, site, (position,), base, source, h_s,
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
    p = Patch.subspace(site, basis, (position,))
    iia = interchange_accuracy(model, p, base, source, expected, read_position)
    test_iia, n_test = None, 0
    if test is not None:
        t_base, t_source = paired_tokens(model, test[0], test[1])
        n_test = len(t_base)
        test_iia = interchange_accuracy(model, p, t_base, t_source, test[2], read_position)
    return DASResult(site, position, basis, iia, float(loss.detach()), steps, test_iia, len(base), n_test)
