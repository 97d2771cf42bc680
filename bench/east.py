"""EAST on an in-context bandit agent: SmolLM2-Instruct plays a two-armed bandit; entropic activation steering
(``steering.east``) against temperature scaling, a plain difference of means and a random direction.

**The game.** Two machines, A and B; each pull pays an integer reward in [0, 10], Gaussian around the
machine's mean (one machine ``--gap`` better than the other, which one is drawn per episode; sd ``--sd``).
The prompt (a user message through the chat template) states the rules, lists every pull so far with its
reward and asks for one letter; the assistant's answer starts "I pull machine" and the action is the next token,
" A" or " B": the agent's policy is the next-token distribution over those two, renormalised (its mass on
them is reported; without the prefix SmolLM2 puts most of its mass elsewhere). Actions are
sampled from it with common random numbers: episode e uses the same reward table and the same uniforms in
every arm of the comparison, so arms differ only through their policies.

**Fitting.** ``--fit-episodes`` unsteered episodes of ``--steps`` pulls; at every decision the residual at
``--layer`` (``blocks.L.hook_resid_post``) at the prompt's last token and the entropy of the policy.
EAST's vector is the entropy-weighted, episode-centred mean (``EAST.fit``); the difference of means is
mean(z | entropy above the median) - mean(z | below). Both, and a seeded random direction, are scaled to unit
norm and applied at the decision position (``mode="last"``) with ``coeff = beta x`` the mean residual norm
there, for each beta in ``--betas``. Temperature scaling divides the two action logits by tau (``--taus``).

**Evaluation.** ``--eval-episodes`` fresh episodes per arm: the mean entropy of the policy (nats; ln 2 =
0.693 is a coin flip), the share of exploratory choices (from the second pull on: a machine never pulled
yet, or the one with the lower mean reward so far), the mean reward, and the KL divergence from the
unsteered policy on the same states (KL(steered || unsteered), nats). Each method's entropy and exploration
are then read at matched KL (linear interpolation along its sweep; None outside it).

    python -m bench.east                                   # SmolLM2-135M-Instruct, layer 15
    python -m bench.east --fit-episodes 8 --eval-episodes 8 --steps 6     # a quick look

Prints one JSON object (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import emit
from probe.errors import SteerscopeError

RULES = ("You are playing a game with two slot machines, A and B. Each pull of a machine pays a reward from 0 "
         "to 10. Each machine has its own average reward, which you do not know. Your goal is to win as much "
         "reward as possible over {steps} pulls.")
ASK = "Which machine do you pull next? Answer with one letter, A or B."
# --framing: a sentence after the rules. "exploit" tells the agent to stick with the better machine so far, which
# makes it overconfident in the paper's sense (low action entropy, little exploration), the setting EAST targets.
FRAMINGS = {"neutral": "", "exploit": " Always pull the machine that has paid the most so far."}
PREFIX = "I pull machine"  # the assistant's answer starts so; the next token is " A" or " B"


def prompt_of(history: list[tuple[int, int]], steps: int, framing: str = "neutral") -> str:
    if framing not in FRAMINGS:
        raise SteerscopeError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
    lines = [RULES.format(steps=steps) + FRAMINGS[framing], ""]
    if history:
        lines.append("Your pulls so far:")
        lines += [f"Pull {i + 1}: machine {'AB'[a]}, reward {r}" for i, (a, r) in enumerate(history)]
    else:
        lines.append("You have not pulled any machine yet.")
    return "\n".join([*lines, "", ASK])


def agent_text(model, history: list[tuple[int, int]], steps: int, framing: str = "neutral") -> str:
    """The agent's prompt: the rules and history as a user message (through the chat template when the model
    has one), then the start of the assistant's answer, ``PREFIX``, so the next token is the machine's letter."""
    from probe.tokens import chat_text

    user = prompt_of(history, steps, framing)
    if getattr(model.tokenizer, "chat_template", None) is not None:
        return chat_text(model, user) + PREFIX
    return user + "\n" + PREFIX


def action_ids(model) -> list[int]:
    """The token ids of " A" and " B" (the token after ``PREFIX``)."""
    ids = [model.tokenizer.encode(x, add_special_tokens=False) for x in (" A", " B")]
    if any(len(i) != 1 for i in ids):
        raise SteerscopeError(f"' A' and ' B' are not single tokens for this tokenizer: {ids}")
    return [i[0] for i in ids]


def exploratory(history: list[tuple[int, int]], action: int) -> bool | None:
    """Was ``action`` exploratory given ``history``? None before the first pull (nothing is known yet)."""
    if not history:
        return None
    seen = {a: [r for b, r in history if b == a] for a in (0, 1)}
    if not seen[action]:
        return True
    if not seen[1 - action]:
        return False
    return float(np.mean(seen[action])) < float(np.mean(seen[1 - action]))


class Episodes:
    """``n`` episodes with seeded reward tables and uniforms (the same for every arm)."""

    def __init__(self, n: int, steps: int, gap: float, sd: float, seed: int):
        rng = np.random.default_rng(seed)
        self.good = rng.integers(0, 2, n)  # the better machine of each episode
        base = 5.0 - gap / 2
        means = np.where(np.arange(2)[None, :] == self.good[:, None], base + gap, base)  # [n, 2]
        self.rewards = np.clip(np.rint(means[:, None, :] + sd * rng.standard_normal((n, steps, 2))), 0, 10).astype(int)
        self.uniforms = rng.random((n, steps))
        self.n, self.steps = n, steps


def play(model, eps: Episodes, actions: list[int], policy, site: str | None = None, framing: str = "neutral") -> dict:
    """Run every episode with ``policy(prompts) -> (probs [B, 2], reference probs [B, 2] or None, mass, z)``."""
    from steering.east import entropy

    hist: list[list[tuple[int, int]]] = [[] for _ in range(eps.n)]
    ent, kl, mass, expl, reward, zs, hs, ep_ids = [], [], [], [], [], [], [], []
    for t in range(eps.steps):
        probs, ref, m, z = policy([agent_text(model, h, eps.steps, framing) for h in hist])
        h = entropy(probs)
        ent += h.tolist()
        mass += m.tolist()
        if ref is not None:
            p, q = probs.double().clamp_min(1e-12), ref.double().clamp_min(1e-12)
            kl += (p * (p / q).log()).sum(-1).tolist()
        if z is not None:
            zs.append(z)
            hs.append(h)
            ep_ids += list(range(eps.n))
        for e in range(eps.n):
            a = 0 if eps.uniforms[e, t] < float(probs[e, 0]) else 1
            x = exploratory(hist[e], a)
            if x is not None:
                expl.append(x)
            r = int(eps.rewards[e, t, a])
            reward.append(r)
            hist[e].append((a, r))
    out = {"entropy": float(np.mean(ent)), "exploratory": float(np.mean(expl)), "reward": float(np.mean(reward)),
           "action_mass": float(np.mean(mass)), "kl": float(np.mean(kl)) if kl else 0.0,
           "good_arm_share": float(np.mean([a == eps.good[e] for e, h in enumerate(hist) for a, _ in h]))}
    if zs:
        out["fit"] = (torch.cat(zs), torch.cat(hs), torch.tensor(ep_ids))
    return out


def at_kl(rows: list[dict], target: float, key: str) -> float | None:
    """``key`` at KL = ``target`` by linear interpolation along a sweep (rows sorted by KL; None outside it)."""
    pts = sorted(((r["kl"], r[key]) for r in rows), key=lambda x: x[0])
    for (k0, v0), (k1, v1) in zip(pts, pts[1:], strict=False):
        if k0 <= target <= k1:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (target - k0) / (k1 - k0)
    return None


def run(model_name="smollm2-135m-instruct", layer: int = 15, fit_episodes: int = 16, eval_episodes: int = 16,
        steps: int = 10, betas=(0.25, 0.5, 1.0, 2.0), taus=(1.5, 2.0, 4.0, 8.0), gap: float = 2.0, sd: float = 2.0,
        kl_targets=(0.02, 0.05, 0.1), seed: int = 0, framing: str = "neutral") -> dict:
    from probe.models import load_model
    from steering.east import EAST, decision_states
    from steering.vectors import SteeringVector

    prompt_of([], steps, framing)  # a bad framing fails before the model loads
    t0 = time.perf_counter()
    model = load_model(model_name, device="cpu") if isinstance(model_name, str) else model_name
    name = model_name if isinstance(model_name, str) else model.cfg.model_name
    site = f"blocks.{layer}.hook_resid_post"
    acts = action_ids(model)
    chat = False  # agent_text applies the chat template itself (the answer's start follows it)

    def plain(prompts):
        d = decision_states(model, prompts, acts, site=site, chat=chat)
        return d.probs, None, d.mass, d.z

    times = {}
    fit = play(model, Episodes(fit_episodes, steps, gap, sd, seed), acts, plain, site, framing)
    z, h, ep = fit.pop("fit")
    times["fit_s"] = time.perf_counter() - t0
    scale = float(z.norm(dim=1).mean())
    east = EAST.fit(z, h, ep, site)
    hi = h > h.median()
    dim = z[hi].mean(0) - z[~hi].mean(0) if bool(hi.any()) and bool((~hi).any()) else torch.zeros_like(z[0])
    rand = torch.randn(z.shape[1], generator=torch.Generator().manual_seed(seed + 1))
    dirs = {"east": east.tensor, "diff_in_means": dim, "random": rand}
    cos = float(torch.nn.functional.cosine_similarity(east.tensor, dim, dim=0)) if dim.norm() > 0 else None

    def steered(v):
        def policy(prompts):
            d = decision_states(model, prompts, acts, steer=[v], chat=chat)
            ref = decision_states(model, prompts, acts, chat=chat)
            return d.probs, ref.probs, d.mass, None
        return policy

    def tempered(tau):
        def policy(prompts):
            d = decision_states(model, prompts, acts, chat=chat)
            return (d.probs.log() / tau).softmax(-1), d.probs, d.mass, None
        return policy

    ev = Episodes(eval_episodes, steps, gap, sd, seed + 1000)
    t1 = time.perf_counter()
    base = play(model, ev, acts, plain, framing=framing)
    base.pop("fit", None)  # the unsteered policy reads z too; only the fitting episodes keep it
    arms = {"none": [{"coeff": 0.0, **base}]}
    for kind, vec in dirs.items():
        if float(vec.norm()) == 0:
            continue
        unit = vec / vec.norm()
        arms[kind] = [{"beta": b, "coeff": b * scale, **play(model, ev, acts, steered(SteeringVector(site, unit, b * scale)),
                                                                      framing=framing)}
                      for b in betas]
    arms["temperature"] = [{"tau": tau, **play(model, ev, acts, tempered(tau), framing=framing)} for tau in taus]
    times["eval_s"] = time.perf_counter() - t1
    matched = {kind: {str(k): {"entropy": at_kl(rows, k, "entropy"), "exploratory": at_kl(rows, k, "exploratory")}
                      for k in kl_targets}
               for kind, rows in arms.items() if kind != "none"}
    return {"model": name, "site": site, "steps": steps, "fit_episodes": fit_episodes, "eval_episodes": eval_episodes,
            "gap": gap, "sd": sd, "framing": framing, "example_prompt": agent_text(model, [(0, 4), (1, 6)], steps, framing),
            "fit": {**fit, "decisions": len(z), "east_norm": float(east.tensor.norm()),
                    "resid_norm_at_decision": scale, "cos_east_diff_in_means": cos,
                    "max_entropy": math.log(2)},
            "arms": arms, "matched_kl": matched, "times_s": {**times, "total": time.perf_counter() - t0}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--fit-episodes", type=int, default=16)
    p.add_argument("--eval-episodes", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--betas", default="0.25,0.5,1,2", help="steering strengths, in units of the residual norm")
    p.add_argument("--taus", default="1.5,2,4,8", help="temperatures of the temperature-scaling baseline")
    p.add_argument("--gap", type=float, default=2.0, help="how much better the good machine pays on average")
    p.add_argument("--sd", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--framing", default="neutral", choices=list(FRAMINGS),
                   help="neutral, or exploit: the rules also tell the agent to pull the machine that has paid the most "
                        "so far (an overconfident agent, the setting EAST is for)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    res = run(a.model, a.layer, a.fit_episodes, a.eval_episodes, a.steps,
              tuple(float(x) for x in a.betas.split(",")), tuple(float(x) for x in a.taus.split(",")), a.gap, a.sd,
              seed=a.seed, framing=a.framing)
    emit(res, a.out)


if __name__ == "__main__":
    main()
