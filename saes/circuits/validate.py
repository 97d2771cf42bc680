"""Checks of an attribution graph that can fail: interventions in the real model, and prompt-free connections.

**Ablation.** The graph predicts what removing feature s (setting its activation to 0) does to the target
logit: its direct edge plus every path through downstream features, each responding linearly
(``Δa_t = Σ_s A[t, s] Δa_s / a_s``, the replacement model's linearisation). :func:`ablation_check`
measures the same thing in the *real* model (attention, LayerNorm and MLPs live): subtract
``a_s W_dec[s]`` from ``blocks.L.hook_mlp_out`` at the feature's position and read the change of the
de-meaned target logit. Spearman's rho between predicted and measured effects says whether the graph
ranks features by what they do.

**Weights-based connections** (Dunefsky et al.): ``W_dec^(l)[s] . W_enc^(l')[t]`` for l < l' is the
residual-stream-only, input-invariant part of an edge; ``a_s`` times it predicts the prompt edge
without attention or LayerNorm. :func:`virtual_weight_agreement` ranks a graph's strongest
feature-to-feature edges both ways.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probe.hooks import hooks
from saes.circuits.attribution import Graph
from saes.circuits.layers import Transcoders


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: Tensor) -> Tensor:
        v = v.double()
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in v.unique():  # ties get their mean rank
            m = v == u
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def predicted_ablations(g: Graph, features: Tensor) -> Tensor:
    """[n] the graph's predicted change of the target (first) logit's input when each feature is zeroed."""
    F = g.n_features
    A = g.dense().double()
    A_ff, a = A[:F, :F], g.activations.double()
    target = A[g.logit_index(0), :F]
    seed = torch.zeros(len(features), F, dtype=torch.float64)
    seed[torch.arange(len(features)), features] = -1.0  # relative change of the ablated feature: -100 %
    rel = seed.clone()
    for _ in range(g.n_layers + 1):  # a DAG by layer: this many rounds reach every path
        rel = (rel @ A_ff.T) / a.clamp_min(1e-12)[None]
        rel[seed != 0] = -1.0
    return rel @ target


def measured_ablations(model, tcs: Transcoders, g: Graph, features: Tensor, freeze: bool = False) -> Tensor:
    """[n] the real model's change of the de-meaned target logit when each feature's output is removed.

    ``freeze``: attention patterns and LayerNorm scales stay at their values on the clean prompt (the graph's
    assumption), the MLPs stay live; without it everything is live."""
    tokens = torch.tensor(g.tokens, dtype=torch.long)[None].to(model.cfg.device)
    v = int(g.logit_ids[0])
    frozen = [n for n in model.hook_dict if n.endswith(("hook_scale", "attn.hook_pattern"))] if freeze else []
    clean: dict[str, Tensor] = {}

    def keep(name):
        def fn(t, hook):
            clean[name] = t.detach()
        return fn

    def replay(name):
        def fn(t, hook):
            return clean[name].expand_as(t)
        return fn

    def centred(logits: Tensor) -> Tensor:
        last = logits[:, -1].double()
        return last[:, v] - last.mean(-1)

    with torch.no_grad(), hooks(model, [(n, keep(n)) for n in frozen]):
        base = centred(model(tokens))
    with torch.no_grad(), hooks(model, [(n, replay(n)) for n in frozen]):
        out = torch.empty(len(features), dtype=torch.float64)
        for L in sorted(set(int(g.features[f, 0]) for f in features)):
            rows = [i for i, f in enumerate(features.tolist()) if int(g.features[f, 0]) == L]
            W = tcs[L].W_dec.detach()
            sub = torch.zeros(len(rows), len(g.tokens), model.cfg.d_model, dtype=W.dtype, device=W.device)
            for j, i in enumerate(rows):
                f = int(features[i])
                sub[j, int(g.features[f, 1])] = g.activations[f].to(W) * W[int(g.features[f, 2])]

            def fn(t, hook, sub=sub):
                return t - sub.to(t)
            with hooks(model, [(f"blocks.{L}.hook_mlp_out", fn)]):
                out[rows] = (centred(model(tokens.expand(len(rows), -1))) - base).cpu()
    return out


def ablation_check(model, tcs: Transcoders, g: Graph, n_top: int = 10) -> dict:
    """Predicted vs measured ablation effects of the ``n_top`` most influential features of ``g``: measured in
    the live model and with attention and LayerNorm frozen (MLPs live)."""
    infl = g.influence()[: g.n_features]
    top = infl.argsort(descending=True)[: min(n_top, g.n_features)]
    pred = predicted_ablations(g, top)
    live, frozen = measured_ablations(model, tcs, g, top), measured_ablations(model, tcs, g, top, freeze=True)

    def rho(m: Tensor) -> float:
        return spearman(pred, m) if len(top) > 2 else float("nan")

    return {"features": top.tolist(), "predicted": pred.tolist(), "measured": live.tolist(),
            "measured_frozen": frozen.tolist(), "spearman": rho(live), "spearman_frozen": rho(frozen)}


def virtual_weights(tcs: Transcoders, source_layer: int, target_layer: int) -> Tensor:
    """[d_sae_source, d_sae_target] W_dec^(source) W_enc^(target): residual-stream connections of two layers."""
    return tcs[source_layer].W_dec.detach() @ tcs[target_layer].W_enc.detach()


def virtual_weight_agreement(tcs: Transcoders, g: Graph, n_edges: int = 100) -> float:
    """Spearman between a graph's strongest feature->feature edges and ``a_s`` x their virtual weights."""
    F = g.n_features
    rows = (g.rows < F).nonzero()[:, 0]
    A = g.adjacency[rows][:, :F]
    targets = g.rows[rows]
    flat = A.abs().flatten()
    top = flat.argsort(descending=True)[: min(n_edges, int((flat > 0).sum()))]
    r, s = top // F, top % F
    t = targets[r]
    prompt = A[r, s].double()
    vw = torch.empty(len(top), dtype=torch.float64)
    for i, (ti, si) in enumerate(zip(t.tolist(), s.tolist(), strict=True)):
        Ls, _, fs = (int(x) for x in g.features[si])
        Lt, _, ft = (int(x) for x in g.features[ti])
        vw[i] = float(g.activations[si]) * float(tcs[Ls].W_dec[fs].detach().double() @ tcs[Lt].W_enc[:, ft].detach().double())
    return spearman(prompt, vw)
