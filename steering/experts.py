"""MoE expert scoring and switching, after "Mixture of Tunable Experts" (MoTE, fTRI scoring).

Routing in TransformerLens' ``MoE`` (per layer L, per token t, E experts, top-k)::

    p_t   = softmax(W_gate x_t)                 # blocks.L.mlp.hook_expert_weights, [batch*pos, E]
    w, I  = topk(p_t, k)                        # blocks.L.mlp.hook_expert_indices, [batch*pos, k]
    w     = w / sum(w)   if cfg.norm_topk_prob  # renormalised over the selected experts
    out_t = sum_{j in I} w_j expert_j(x_t)

**Scoring** (fTRI, token-pooled as in SteerMoE's Delta = A1/N1 - A2/N2): for each (layer, expert),
``weight_diff = mean_t p_t[e] (behaviour) - mean_t p_t[e] (control)`` and
``selection_diff = rate(e in I_t | behaviour) - rate(e in I_t | control)``; means run over all
non-padding tokens of each prompt set (long prompts weigh more, as in fTRI's summed activation maps).

**Switching** edits p_t at ``hook_expert_weights`` *before* the top-k, so TL's own top-k and
renormalisation then run as usual:

* ``off`` -- as if the expert's router logit were -inf: the expert is never selected and the next-best
  expert takes its slot. p_off is set to -1 (below every probability, so it cannot tie with an
  underflowed 0). Without ``norm_topk_prob`` the remaining probabilities are also rescaled to
  p_j / sum_{i not off} p_i (the softmax without the expert); with it, that rescaling cancels in the
  top-k renormalisation and is skipped, so switching off an expert the router never picks is bit-exact.
* ``force`` -- the expert is put into every token's top-k and given the router's largest probability
  for that token: p_f = max(max_j p_j, nextafter(max_{j unforced} p_j)). It displaces the
  lowest-ranked selected expert; the other k - |force| slots go to the best unforced experts and the
  top-k is renormalised as usual. Its final weight (norm_topk_prob) is max_j p_j / sum of the new
  top-k. Forcing the router's own unique top choice therefore changes nothing.
"""

from __future__ import annotations

import json
import operator
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from probe.errors import SteerscopeError
from probe.hooks import capture, hooks

Expert = tuple[int, int]  # (layer, expert)
ScoreBy = Literal["weight", "selection"]


class LayerRouting(NamedTuple):
    """Routing of one layer over all non-padding tokens of a prompt set."""

    probs: torch.Tensor  # [tokens, E] softmax over all experts, before top-k
    indices: torch.Tensor  # [tokens, k] selected experts, best first


def moe_shape(model) -> tuple[int, int, int]:
    """(n_layers, n_experts, experts_per_token) of an MoE model; SteerscopeError on a dense one."""
    cfg = model.cfg
    n_experts = getattr(cfg, "num_experts", None)
    if not n_experts:
        name = getattr(cfg, "model_name", "this model")
        raise SteerscopeError(f"{name} is a dense model (no experts); expert scoring/switching needs an MoE "
                              "model such as austen-moe")
    return cfg.n_layers, n_experts, cfg.experts_per_token


def _prompt_batches(model, prompts: Sequence[str], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded token batches and their [batch, pos] masks of real (non-padding) tokens."""
    from probe.tokens import encode_all, pad, real_mask

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise SteerscopeError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise SteerscopeError("empty prompt list: give at least one prompt")
    for i in range(0, len(prompts), batch_size):
        tokens, lengths = pad(model, encode_all(model, list(prompts[i:i + batch_size])), "right")
        yield tokens, real_mask(lengths, tokens.shape[1]).bool().to(tokens.device)


@torch.no_grad()
def capture_routing(model, prompts: Sequence[str], batch_size: int = 32) -> dict[int, LayerRouting]:
    """Per layer: routing probabilities [tokens, E] and selected experts [tokens, k], padding excluded.

    Tokens are concatenated prompt by prompt, in order. Runs under any active ``ExpertSwitch``
    (its probabilities are then the switched ones, with -1 for switched-off experts).
    """
    n_layers, n_experts, k = moe_shape(model)
    sites = [f"blocks.{layer}.mlp.hook_expert_{kind}" for layer in range(n_layers) for kind in ("weights", "indices")]
    probs: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(n_layers)}
    idx: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(n_layers)}
    for tokens, mask in _prompt_batches(model, prompts, batch_size):
        with capture(model, sites) as acts:
            model(tokens)
        b, t = tokens.shape
        for layer in range(n_layers):
            probs[layer].append(acts[f"blocks.{layer}.mlp.hook_expert_weights"].reshape(b, t, n_experts)[mask].float())
            idx[layer].append(acts[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(b, t, k)[mask])
    return {layer: LayerRouting(torch.cat(probs[layer]).cpu(), torch.cat(idx[layer]).cpu()) for layer in range(n_layers)}


def _routing_stats(routing: dict[int, LayerRouting], n_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean probability and selection rate per (layer, expert), both [L, E]; and the token count."""
    mean_p = torch.stack([r.probs.mean(0) for r in routing.values()])
    rate = torch.stack([
        torch.zeros(n_experts).index_add_(0, r.indices.reshape(-1), torch.ones(r.indices.numel())) / r.indices.shape[0]
        for r in routing.values()
    ])
    return mean_p, rate, routing[0].probs.shape[0]


@dataclass(frozen=True, repr=False)
class ExpertScores:
    """fTRI-style expert scores of a behaviour prompt set against a control set, each [n_layers, n_experts]."""

    weight_behaviour: torch.Tensor  # mean routing probability on behaviour tokens
    weight_control: torch.Tensor
    select_behaviour: torch.Tensor  # fraction of behaviour tokens that select the expert (rows sum to k)
    select_control: torch.Tensor
    experts_per_token: int
    n_tokens: tuple[int, int]  # (behaviour, control) non-padding tokens

    @classmethod
    def score(cls, model, behaviour_prompts: Sequence[str], control_prompts: Sequence[str],
              batch_size: int = 32) -> ExpertScores:
        """Score every (layer, expert) of ``model`` on behaviour vs control prompts."""
        _, n_experts, k = moe_shape(model)
        wb, sb, nb = _routing_stats(capture_routing(model, behaviour_prompts, batch_size), n_experts)
        wc, sc, nc = _routing_stats(capture_routing(model, control_prompts, batch_size), n_experts)
        return cls(wb, wc, sb, sc, k, (nb, nc))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight_behaviour.shape)

    @property
    def weight_diff(self) -> torch.Tensor:
        """Mean routing probability, behaviour minus control: [n_layers, n_experts]."""
        return self.weight_behaviour - self.weight_control

    @property
    def selection_diff(self) -> torch.Tensor:
        """Top-k selection rate, behaviour minus control: [n_layers, n_experts]."""
        return self.select_behaviour - self.select_control

    def diff(self, by: ScoreBy = "weight") -> torch.Tensor:
        if by not in ("weight", "selection"):
            raise SteerscopeError(f"score by {by!r}: choose 'weight' or 'selection'")
        return self.weight_diff if by == "weight" else self.selection_diff

    def top(self, n: int, by: ScoreBy = "weight") -> list[Expert]:
        """The n (layer, expert) pairs most used on the behaviour set relative to control, best first."""
        d = self.diff(by)
        if not isinstance(n, int) or not 1 <= n <= d.numel():
            raise SteerscopeError(f"top(n={n!r}): n must be an integer from 1 to {d.numel()} (layers x experts)")
        order = torch.sort(d.reshape(-1), descending=True, stable=True).indices[:n]
        return [(int(i) // d.shape[1], int(i) % d.shape[1]) for i in order]

    def switch(self, n: int, by: ScoreBy = "weight", action: Literal["off", "force"] = "off") -> ExpertSwitch:
        """An ``ExpertSwitch`` acting on ``top(n, by)``: ``scores.switch(4)`` switches the top 4 off."""
        if action not in ("off", "force"):
            raise SteerscopeError(f"switch action {action!r}: choose 'off' or 'force'")
        return ExpertSwitch(**{action: self.top(n, by)})

    def heatmap(self, by: ScoreBy = "weight"):
        """A plotly layer x expert heatmap of the behaviour-minus-control difference."""
        import plotly.graph_objects as go

        d = self.diff(by)
        lim = float(d.abs().max()) or 1.0
        fig = go.Figure(go.Heatmap(
            z=d.numpy(), x=[f"E{e}" for e in range(d.shape[1])], y=[f"L{layer}" for layer in range(d.shape[0])],
            colorscale="RdBu", reversescale=True, zmin=-lim, zmax=lim, colorbar=dict(title="Δ"),
        ))
        label = "mean routing probability" if by == "weight" else "selection rate"
        fig.update_layout(title=f"Expert {label}: behaviour − control", xaxis_title="expert", yaxis_title="layer",
                          yaxis_autorange="reversed")
        return fig

    def __repr__(self) -> str:
        best = ", ".join(f"L{layer}E{e} {float(self.weight_diff[layer, e]):+.3f}" for layer, e in self.top(3))
        return (f"ExpertScores({self.shape[0]} layers x {self.shape[1]} experts, top-{self.experts_per_token}; "
                f"tokens behaviour={self.n_tokens[0]} control={self.n_tokens[1]}; top by weight: {best})")


def _as_experts(items, what: str) -> tuple[Expert, ...]:
    """Validate a list of (layer, expert) integer pairs (no bools, no floats, no negatives, no repeats)."""
    try:
        pairs = [tuple(p) for p in items]
        if any(len(p) != 2 or any(isinstance(x, bool) for x in p) for p in pairs):
            raise TypeError
        out = tuple((operator.index(a), operator.index(b)) for a, b in pairs)
    except TypeError as err:
        raise SteerscopeError(f"{what} must be a list of (layer, expert) integer pairs, got {items!r}") from err
    if any(min(p) < 0 for p in out):
        raise SteerscopeError(f"{what}: layer and expert indices must be >= 0, got {[p for p in out if min(p) < 0]}")
    if len(set(out)) != len(out):
        raise SteerscopeError(f"{what} lists an expert twice")
    return out


@dataclass(frozen=True, repr=False)
class ExpertSwitch:
    """Switch experts off (never routed to) or force them on (always routed to); semantics in the module doc."""

    off: tuple[Expert, ...] = field(default=())
    force: tuple[Expert, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "off", _as_experts(self.off, "off"))
        object.__setattr__(self, "force", _as_experts(self.force, "force"))
        both = set(self.off) & set(self.force)
        if both:
            raise SteerscopeError(f"experts {sorted(both)} are both switched off and forced")

    def __repr__(self) -> str:
        def fmt(xs):
            return "[" + ", ".join(f"L{layer}E{e}" for layer, e in xs) + "]"
        return f"ExpertSwitch(off={fmt(self.off)}, force={fmt(self.force)})"

    def __bool__(self) -> bool:
        return bool(self.off or self.force)

    def validate(self, model) -> None:
        """Check the switch fits the model: MoE, layers and experts in range, top-k still fillable."""
        n_layers, n_experts, k = moe_shape(model)
        for layer, e in (*self.off, *self.force):
            if layer >= n_layers:
                raise SteerscopeError(f"expert L{layer}E{e}: the model has {n_layers} layers (0 to {n_layers - 1})")
            if e >= n_experts:
                raise SteerscopeError(f"expert L{layer}E{e}: the model has {n_experts} experts per layer "
                                      f"(0 to {n_experts - 1})")
        for layer in range(n_layers):
            n_off = sum(x == layer for x, _ in self.off)
            n_force = sum(x == layer for x, _ in self.force)
            if n_force > k:
                raise SteerscopeError(f"layer {layer}: {n_force} experts forced but only {k} are selected per token")
            if n_experts - n_off < k:
                raise SteerscopeError(f"layer {layer}: {n_off} of {n_experts} experts off leaves fewer than the {k} "
                                      "each token needs")

    def hook_fns(self, model) -> list[tuple[str, object]]:
        """(site, hook fn) pairs on ``blocks.L.mlp.hook_expert_weights``, one per layer the switch touches."""
        self.validate(model)
        renorm = bool(getattr(model.cfg, "norm_topk_prob", False))
        layers = sorted({layer for layer, _ in (*self.off, *self.force)})
        return [(f"blocks.{layer}.mlp.hook_expert_weights",
                 _switch_fn([e for x, e in self.off if x == layer], [e for x, e in self.force if x == layer], renorm))
                for layer in layers]

    @contextmanager
    def apply(self, model) -> Iterator[None]:
        """Context manager: the switch is active for forward passes in the body; hooks always removed."""
        with hooks(model, self.hook_fns(model)):
            yield

    def to_dict(self) -> dict:
        return {"kind": "expert_switch", "off": [list(p) for p in self.off], "force": [list(p) for p in self.force]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpertSwitch:
        """Strict load: the exact keys written by ``save``."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SteerscopeError(f"cannot read expert switch {path}: {err}") from err
        if not isinstance(d, dict) or set(d) != {"kind", "off", "force"} or d["kind"] != "expert_switch":
            raise SteerscopeError(f"{path} is not an expert switch file (want keys kind='expert_switch', off, force)")
        return cls(off=d["off"], force=d["force"])


def _switch_fn(off: list[int], force: list[int], renorm: bool):
    def fn(p: torch.Tensor, hook) -> torch.Tensor:
        q = p.clone()
        if off:
            if not renorm:  # softmax without the switched-off experts
                keep = torch.ones(p.shape[-1], dtype=torch.bool, device=p.device)
                keep[off] = False
                q = q / q[:, keep].sum(-1, keepdim=True)
            q[:, off] = -1.0
        if force:
            unforced = q.clone()
            unforced[:, force] = -torch.inf
            u = unforced.max(-1).values
            top = torch.maximum(q.max(-1).values, torch.nextafter(u, torch.full_like(u, torch.inf)))
            q[:, force] = top[:, None].expand(-1, len(force))
        return q
    return fn


def random_control(scores: ExpertScores, n: int, seed: int = 0, by: ScoreBy = "weight",
                   mode: Literal["matched", "uniform"] = "matched") -> ExpertSwitch:
    """A control ``ExpertSwitch`` switching off n random experts, none of them in ``scores.top(n, by)``.

    ``matched``: as many random experts in each layer as the top-n has there (so a per-layer effect
    of depth cannot explain a top-n vs random difference). ``uniform``: n experts drawn uniformly from
    all (layer, expert) pairs outside the top-n. Same seed, same switch.
    """
    top = scores.top(n, by)
    n_layers, n_experts = scores.shape
    rng = random.Random(seed)
    if mode == "uniform":
        pool = [(layer, e) for layer in range(n_layers) for e in range(n_experts) if (layer, e) not in top]
        return ExpertSwitch(off=sorted(rng.sample(pool, n)))
    if mode != "matched":
        raise SteerscopeError(f"random_control mode {mode!r}: choose 'matched' or 'uniform'")
    chosen: list[Expert] = []
    for layer in range(n_layers):
        count = sum(x == layer for x, _ in top)
        pool = [e for e in range(n_experts) if (layer, e) not in top]
        if count > len(pool):
            raise SteerscopeError(f"layer {layer} holds {count} of the top-{n} experts, leaving only {len(pool)} "
                                  "others to draw from; use mode='uniform' or a smaller n")
        chosen += [(layer, e) for e in sorted(rng.sample(pool, count))]
    return ExpertSwitch(off=chosen)
