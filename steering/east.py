"""EAST, entropic activation steering (Rahn, D'Oro & Bellemare 2024, "Controlling Large Language Model Agents
with Entropic Activation Steering").

An in-context agent acts over several steps of an episode. At each decision its prompt holds the history so
far; ``z_t`` is the residual stream at one layer at the prompt's last token (where the action is read) and
``H_t`` the entropy of its distribution over actions. The steering vector is the entropy-weighted
combination of the representations, each centred on its own episode's mean::

    u = sum_{k,t} H_t^k (z_t^k - mean_t' z_t'^k) / sum_{k,t} H_t^k

so directions along which the agent's states move when it is unsure get weight, and what distinguishes one
episode from another cancels. Adding ``beta * u`` at the decision position (``mode="last"`` of
``steering.apply``) raises the entropy of the agent's actions. ``bench/east.py`` builds the paper's kind of
setting, a two-armed bandit played by SmolLM2-Instruct, and measures it against temperature scaling and a
plain difference of means.

Here the action distribution is exact: the next-token probabilities of the action tokens, renormalised
(the paper samples completions and parses the action out of ReAct-style text; our agent answers with one
token).

>>> z, H, ep = ...                                  # [N, d], [N], [N] from logged decisions
>>> v = EAST.fit(z, H, ep, site="blocks.15.hook_resid_post")
>>> d = decision_states(model, prompts, [id_a, id_b], steer=[v.with_coeff(8.0)], chat=True)   # d.probs [B, 2]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from probe.sites import resolve_one
from probe.twin import twin_of
from steering.apply import last_token_logits, left_pad
from steering.apply import steer as steering
from steering.vectors import SteeringVector


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats along the last dimension (0 log 0 = 0)."""
    p = probs.double()
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


class EAST:
    """Entropy-weighted, episode-centred representations as a steering vector (see the module docstring)."""

    @staticmethod
    def fit(z: Tensor, entropies: Tensor, episodes: Tensor, site: str) -> SteeringVector:
        """``z`` [N, d] decision-position activations at ``site``, ``entropies`` [N] of the action distributions
        there, ``episodes`` [N] the episode each decision belongs to. Returns the vector ``u`` (coeff 1)."""
        z = torch.as_tensor(z).double()
        h = torch.as_tensor(entropies).double().flatten()
        ep = torch.as_tensor(episodes).long().flatten()
        if z.ndim != 2 or len(z) != len(h) or len(z) != len(ep):
            raise SteerscopeError(f"EAST needs z [N, d] with one entropy and one episode id per row, got z "
                                  f"{tuple(z.shape)}, {len(h)} entropies, {len(ep)} episode ids")
        if not (torch.isfinite(z).all() and torch.isfinite(h).all()):
            raise SteerscopeError("the activations or entropies hold NaN or inf values")
        if bool((h < 0).any()):
            raise SteerscopeError("entropies must be >= 0")
        if float(h.sum()) <= 0:
            raise SteerscopeError("every decision has zero entropy: an agent that is always sure gives EAST nothing "
                                  "to weight (log decisions with some uncertainty)")
        centred = torch.empty_like(z)
        sizes = []
        for e in ep.unique():
            rows = ep == e
            sizes.append(int(rows.sum()))
            centred[rows] = z[rows] - z[rows].mean(0)
        if max(sizes) < 2:
            raise SteerscopeError("every episode has one decision: centring on the episode mean leaves nothing; "
                                  "log several steps per episode")
        u = (h[:, None] * centred).sum(0) / h.sum()
        prov = {"method": "east", "n_decisions": len(z), "n_episodes": len(sizes), "mean_entropy": float(h.mean()),
                "norm": float(u.norm())}
        return SteeringVector(site, u.float(), 1.0, prov)


class Decisions(NamedTuple):
    probs: Tensor  # [B, A] the distribution over the action tokens, renormalised
    mass: Tensor  # [B] the next-token probability the action tokens hold together (before renormalising)
    z: Tensor | None  # [B, d] the activation at the site asked for, at the last prompt token


@torch.no_grad()
def decision_states(model, prompts: str | Sequence[str], actions: Sequence[int], site: str | None = None,
                    steer: Sequence[SteeringVector] = (), chat: bool = False) -> Decisions:
    """At each prompt's last token: the distribution over the ``actions`` token ids, the probability they hold
    together, and the activation at ``site`` when a site is given (:class:`Decisions`). ``steer`` vectors are added at that position
    only (``mode="last"``), so the probabilities are the steered agent's; ``site`` reads the unsteered stream
    when nothing is steered there. Runs on the model's twin when it has one (``probe.twin``)."""
    if len(actions) < 2:
        raise SteerscopeError(f"give at least two action token ids, got {list(actions)}")
    vocab = model.cfg.d_vocab
    if any(not 0 <= int(a) < vocab for a in actions):
        raise SteerscopeError(f"action token ids must be in [0, {vocab}), got {list(actions)}")
    tokens, mask, pad_left = left_pad(model, prompts, chat)
    P = tokens.shape[1]
    sites = [resolve_one(model, v.site) for v in steer] + ([resolve_one(model, site)] if site else [])
    twin = twin_of(model, sites)
    got: dict[str, Tensor] = {}

    def keep(t: Tensor, hook) -> None:
        got["z"] = t[:, -1].detach().float().cpu()

    pairs = [(resolve_one(model, site), keep)] if site else []
    with steering(model, list(steer), "last", prompt_len=P, pad_left=pad_left, twin=twin):
        logits = last_token_logits(model, tokens, mask, pairs, twin).float()
    if not bool(torch.isfinite(logits).all()):
        raise SteerscopeError("the steered activations overflowed (the logits are not finite); use a smaller coeff")
    idx = torch.as_tensor([int(a) for a in actions], device=logits.device)
    full = logits.log_softmax(-1)[:, idx]
    return Decisions(full.softmax(-1).cpu(), full.exp().sum(-1).cpu(), got.get("z"))
