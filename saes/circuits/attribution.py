"""Attribution graphs through per-layer transcoders (the method of circuit-tracer, Ameisen et al. 2025).

**The replacement model.** Each MLP's output is written as its transcoder's active features plus an
error node (the MLP output minus the transcoder's prediction). Attention patterns and every LayerNorm
scale are frozen at their values on the prompt, so the residual stream becomes an affine function of the
sources: token embeddings, feature outputs ``a_s W_dec[s]`` and error vectors. A skip transcoder's
``x W_skip`` stays a live linear path. The first position's MLP outputs are constants when the model
prepends a BOS (it is the same on every prompt), as circuit-tracer zeroes BOS.

**Nodes** (circuit-tracer's order): active features ``(layer, pos, feature)`` | one error per
``(layer, pos)`` | one token embedding per position | the top logits of the last position, up to
``desired_logit_prob`` cumulative probability and at most ``max_n_logits``.

**Edges.** ``A[t, s]`` is the direct effect of source s on target t's input: for a feature target, its
encoder pre-activation ``x_in . W_enc[:, t]``; for a logit, the de-meaned logit ``x_final . (W_U[:, v] -
mean_v W_U)``. One backward pass from a batch of targets gives, at every source site, the gradient
that is contracted with the source's vector. Because the map is affine, each target's input equals the
sum of its incoming edges plus a bias (everything that is not a node: b_dec, b_enc, attention and LN
biases): :func:`node_inputs` computes both, and the tests check it to 1e-4 in fp64.

**Which rows.** Logit rows first; then feature rows in order of their current influence (recomputed
after each batch), at most ``max_feature_nodes`` of them (circuit-tracer's cap); uncomputed features
stay sources without incoming edges.

**Influence, pruning, scores** follow circuit-tracer's definitions: ``A_norm`` is ``|A|`` with rows
normalised to sum 1; a node's influence is the logit-probability-weighted sum over all paths
``w (A_norm + A_norm^2 + ...)``; pruning keeps the smallest set of feature/error nodes holding
``node_threshold`` of the influence and the edges holding ``edge_threshold`` of the edge scores;
replacement = influence reaching tokens / influence reaching tokens or errors; completeness = the
influence-weighted share of each node's input that does not come from error nodes.

>>> g = attribute(model, load_transcoders("runs/tc"), "Mr. Darcy bowed to")
>>> g.scores                     # {"replacement": ..., "completeness": ...}
>>> g.save_json("graph.json")    # opens in circuit-tracer's frontend
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from probe.tokens import encode
from saes.circuits.layers import Transcoders
from saes.circuits.replacement import Replacement, targets

SCHEMA_VERSION = 1
FEATURE_TYPE = "cross layer transcoder"  # the string circuit-tracer's frontend gives transcoder features


@dataclass
class Graph:
    """An attribution graph. Node indices: features | errors (layer-major) | tokens | logits."""

    prompt: str
    tokens: list[int]
    token_strs: list[str]
    n_layers: int
    features: Tensor  # [F, 3] (layer, pos, feature index)
    activations: Tensor  # [F]
    logit_ids: Tensor  # [K] token ids, most likely first
    logit_probs: Tensor  # [K]
    rows: Tensor  # [R] node indices whose incoming edges were computed (logits first)
    adjacency: Tensor  # [R, N]: adjacency[i, j] = direct effect of node j on node rows[i]
    first_pos: int  # positions before this have no feature/error nodes (BOS)
    info: dict[str, Any] = field(default_factory=dict)

    # ---- layout
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_layers * self.n_pos + self.n_pos + len(self.logit_ids)

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + pos

    def logit_index(self, k: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + self.n_pos + k

    def kinds(self) -> Tensor:
        """Per node: 0 feature, 1 error, 2 token, 3 logit."""
        F, E, T = self.n_features, self.n_layers * self.n_pos, self.n_pos
        return torch.cat([torch.zeros(F), torch.ones(E), torch.full((T,), 2.0), torch.full((len(self.logit_ids),), 3.0)]).long()

    def logit_weights(self) -> Tensor:
        """[R] the logits' probabilities (normalised to sum 1) on their rows, 0 elsewhere."""
        w = torch.zeros(len(self.rows), dtype=torch.float64)
        p = self.logit_probs.double() / self.logit_probs.double().sum()
        for k in range(len(self.logit_ids)):
            w[(self.rows == self.logit_index(k)).nonzero()[0, 0]] = p[k]
        return w

    def dense(self) -> Tensor:
        """The full [N, N] adjacency (rows that were not computed are zero)."""
        A = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.adjacency.dtype)
        A[self.rows] = self.adjacency
        return A

    def first_rows(self, n_feature_rows: int) -> Graph:
        """This graph with only its first ``n_feature_rows`` feature rows: rows are computed in batches, each chosen
        from the rows before it, so for a multiple of the batch size this is exactly the graph a run capped at
        ``n_feature_rows`` builds (how the scores change with the cap, at no extra cost)."""
        n = len(self.logit_ids) + n_feature_rows
        return replace(self, rows=self.rows[:n], adjacency=self.adjacency[:n],
                       info={**self.info, "max_feature_nodes": n_feature_rows})

    # ---- analysis
    def influence(self, adjacency: Tensor | None = None) -> Tensor:
        """[N] every node's influence on the logits (all paths, ``|A|`` row-normalised)."""
        return _influence(_normalise(self.adjacency if adjacency is None else adjacency), self.rows, self.logit_weights(),
                          self.n_layers + 2)

    @property
    def scores(self) -> dict[str, float]:
        An = _normalise(self.adjacency)
        infl = _influence(An, self.rows, self.logit_weights(), self.n_layers + 2)
        kinds = self.kinds()
        tok, err = float(infl[kinds == 2].sum()), float(infl[kinds == 1].sum())
        w = self.logit_weights()
        weight = infl[self.rows] + w
        err_share = An[:, kinds == 1].sum(1)
        return {"replacement": tok / max(tok + err, 1e-30),
                "completeness": float(((1 - err_share) * weight).sum() / weight.sum().clamp_min(1e-30))}

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> tuple[Tensor, Tensor, Tensor]:
        """(node_mask [N], edge_mask [R, N], influence [N]) of the pruned graph (tokens and logits always kept)."""
        if not (0 < node_threshold <= 1 and 0 < edge_threshold <= 1):
            raise SteerscopeError(f"thresholds are fractions in (0, 1], got node {node_threshold}, edge {edge_threshold}")
        kinds, w = self.kinds(), self.logit_weights()
        infl = self.influence()
        keep = kinds >= 2
        cand = (kinds <= 1).nonzero()[:, 0]
        keep[cand[_smallest_share(infl[cand], node_threshold)]] = True
        A = self.adjacency * keep[self.rows, None] * keep[None, :]
        An = _normalise(A)
        infl_p = _influence(An, self.rows, w, self.n_layers + 2)
        score = An * (infl_p[self.rows] + w)[:, None]
        flat = score.flatten()
        edges = torch.zeros_like(flat, dtype=torch.bool)
        nz = (flat > 0).nonzero()[:, 0]
        edges[nz[_smallest_share(flat[nz], edge_threshold)]] = True
        edges = edges.view_as(score)
        is_row = torch.zeros(self.n_nodes, dtype=torch.bool)
        is_row[self.rows] = True
        for _ in range(self.n_layers + 2):  # drop features left without an edge in or out, until none is
            has_out = edges.any(0)
            has_in = torch.zeros(self.n_nodes, dtype=torch.bool)
            has_in[self.rows] = edges.any(1)
            new = keep & ((kinds >= 2) | ((kinds == 1) & has_out) | ((kinds == 0) & has_out & has_in))
            edges = edges & new[self.rows, None] & new[None, :]
            if bool((new == keep).all()):
                break
            keep = new
        return keep, edges, infl

    # ---- circuit-tracer's JSON
    def to_json(self, node_threshold: float = 0.8, edge_threshold: float = 0.98, slug: str | None = None) -> dict:
        """The graph in circuit-tracer's frontend schema (pruned), with the scores under ``metadata.scores``."""
        keep, edges, infl = self.prune(node_threshold, edge_threshold)
        ids, nodes = {}, []
        L, T = self.n_layers, self.n_pos
        for n in keep.nonzero()[:, 0].tolist():
            node = self._node(n, float(infl[n]))
            ids[n] = node["node_id"]
            nodes.append(node)
        links = []
        r_idx, s_idx = edges.nonzero(as_tuple=True)
        for r, s in zip(r_idx.tolist(), s_idx.tolist(), strict=True):
            t = int(self.rows[r])
            if t in ids and s in ids:
                links.append({"source": ids[s], "target": ids[t], "weight": float(self.adjacency[r, s])})
        used = {x["source"] for x in links} | {x["target"] for x in links}
        nodes = [x for x in nodes if x["node_id"] in used or x["feature_type"] in ("embedding", "logit")]
        slug = slug or "steerscope-graph"
        meta = {"slug": slug, "scan": self.info.get("model") or "steerscope", "transcoder_list": [],
                "prompt_tokens": self.token_strs, "prompt": self.prompt, "node_threshold": node_threshold,
                "edge_threshold": edge_threshold, "schema_version": SCHEMA_VERSION, "scores": self.scores,
                "info": {**self.info, "n_layers": L, "n_pos": T, "n_features_active": self.n_features,
                         "n_feature_rows": int((self.rows < self.n_features).sum())}}
        return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                              "sg_pos": ""},
                "nodes": nodes, "links": links}

    def save_json(self, path: str | Path, **kw) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(**kw)))
        return path

    def _node(self, n: int, influence: float) -> dict:
        F, L, T = self.n_features, self.n_layers, self.n_pos
        base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
                "influence": influence, "activation": None}
        if n < F:
            layer, pos, f = (int(v) for v in self.features[n])
            nid = f"{layer}_{f}_{pos}"
            return {**base, "node_id": nid, "feature": f, "layer": str(layer), "ctx_idx": pos,
                    "feature_type": FEATURE_TYPE, "jsNodeId": f"{layer}_{f}-0", "activation": float(self.activations[n])}
        if n < F + L * T:
            layer, pos = divmod(n - F, T)
            return {**base, "node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                    "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{pos}"}
        if n < F + L * T + T:
            pos = n - F - L * T
            tok = self.tokens[pos]
            return {**base, "node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                    "feature_type": "embedding", "jsNodeId": f"E_{tok}-{pos}", "clerp": self.token_strs[pos]}
        k = n - F - L * T - T
        v, p = int(self.logit_ids[k]), float(self.logit_probs[k])
        word = self.info.get("logit_strs", [""] * len(self.logit_ids))[k]
        return {**base, "node_id": f"{L + 1}_{v}_{T - 1}", "feature": v, "layer": str(L + 1), "ctx_idx": T - 1,
                "feature_type": "logit", "token_prob": p, "is_target_logit": k == 0, "jsNodeId": f"L_{v}-{T - 1}",
                "clerp": f'Output "{word}" (p={p:.3f})', "influence": influence}


def _normalise(A: Tensor) -> Tensor:
    a = A.abs().double()
    return a / a.sum(1, keepdim=True).clamp_min(1e-30)


def _influence(An: Tensor, rows: Tensor, w: Tensor, depth: int) -> Tensor:
    total = torch.zeros(An.shape[1], dtype=torch.float64)
    v = w.double()
    for _ in range(depth):
        c = v @ An
        total += c
        v = c[rows]
        if float(v.abs().sum()) < 1e-12:
            break
    return total


def _smallest_share(x: Tensor, share: float) -> Tensor:
    """Indices of the largest entries of x (>= 0) that together hold ``share`` of its sum."""
    order = x.argsort(descending=True)
    cum = x[order].cumsum(0) / x.sum().clamp_min(1e-30)
    n = int((cum < share).sum()) + 1
    return order[: min(n, len(x))]


def attribute(model, transcoders: Transcoders, prompt: str, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              max_feature_nodes: int | None = None, batch_size: int = 64, progress: bool = False) -> Graph:
    """The attribution graph of ``prompt``'s next-token prediction (see the module docstring)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise SteerscopeError("the prompt is empty: give some text to attribute")
    if max_n_logits < 1 or not 0 < desired_logit_prob <= 1 or batch_size < 1:
        raise SteerscopeError("max_n_logits and batch_size must be >= 1 and desired_logit_prob in (0, 1]")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise SteerscopeError(f"max_feature_nodes must be >= 0 (or None: all), got {max_feature_nodes}")
    t0 = time.time()
    tokens = torch.as_tensor(encode(model, prompt), dtype=torch.long).flatten().cpu()
    if len(tokens) > model.cfg.n_ctx:
        raise SteerscopeError(f"the prompt has {len(tokens)} tokens; this model's context is {model.cfg.n_ctx}")
    rep = Replacement(model, transcoders, tokens)
    probs = rep.logits.double().softmax(-1)
    top = probs.topk(min(max_n_logits, len(probs)))
    k = min(len(top.values), int((top.values.cumsum(0) < desired_logit_prob).sum()) + 1)
    logit_ids, logit_probs = top.indices[:k].cpu(), top.values[:k].float().cpu()
    W_U = model.W_U.detach().to(rep.embed.dtype)
    W_Ud = W_U - W_U.mean(1, keepdim=True)
    F = len(rep.features)
    n_nodes = F + rep.L * rep.T + rep.T + k
    logit_nodes = [F + rep.L * rep.T + rep.T + i for i in range(k)]
    cap = F if max_feature_nodes is None else min(F, max_feature_nodes)
    rows: list[int] = []
    blocks: list[Tensor] = []

    def compute(nodes: list[int]) -> None:
        for i in range(0, len(nodes), batch_size):
            chunk = nodes[i: i + batch_size]
            stop = int(rep.features[chunk, 0].max()) + 1 if max(chunk) < F else None  # features only: stop early
            _, grads = rep.run(len(chunk), targets(rep, chunk, F, logit_ids, W_Ud), stop=stop)
            blocks.append(rep.edges(grads, n_nodes).detach().cpu())
            rows.extend(chunk)

    compute(logit_nodes)
    done = torch.zeros(F, dtype=torch.bool)
    while int(done.sum()) < cap:
        partial = Graph(prompt, tokens.tolist(), [], rep.L, rep.features, rep.activations, logit_ids, logit_probs,
                        torch.tensor(rows), torch.cat(blocks), rep.first)
        infl = partial.influence()[:F].clone()
        infl[done] = -1
        n = min(batch_size, cap - int(done.sum()))
        nxt = infl.argsort(descending=True)[:n]
        done[nxt] = True
        compute(nxt.tolist())
    tok = model.tokenizer
    strs = [tok.decode([t]) for t in tokens.tolist()] if tok is not None else [str(t) for t in tokens.tolist()]
    logit_strs = [tok.decode([int(v)]) for v in logit_ids] if tok is not None else [str(int(v)) for v in logit_ids]
    info = {"model": model.cfg.model_name, "transcoders": str(transcoders.path) if transcoders.path else None,
            "skip": transcoders.skip, "max_feature_nodes": max_feature_nodes, "batch_size": batch_size,
            "logit_strs": logit_strs, "wall_time_s": None}
    g = Graph(prompt, tokens.tolist(), strs, rep.L, rep.features.cpu(), rep.activations.detach().cpu(), logit_ids,
              logit_probs, torch.tensor(rows, dtype=torch.long), torch.cat(blocks), rep.first, info)
    g.info["wall_time_s"] = round(time.time() - t0, 3)
    return g


def node_inputs(model, transcoders: Transcoders, graph: Graph, nodes: list[int]) -> tuple[Tensor, Tensor]:
    """(input, bias) of each node in ``nodes`` under the frozen replacement model: the node's input (feature
    pre-activation without b_enc, or de-meaned logit without b_U) and the part of it no node accounts for.
    ``input == bias + sum of the node's incoming edges`` is the completeness check of the graph's arithmetic."""
    rep = Replacement(model, transcoders, torch.tensor(graph.tokens, dtype=torch.long))
    W_U = model.W_U.detach().to(rep.embed.dtype)
    W_Ud = W_U - W_U.mean(1, keepdim=True)
    obj = targets(rep, nodes, graph.n_features, graph.logit_ids, W_Ud)
    full, _ = rep.run(len(nodes), obj)
    bias, _ = rep.run(len(nodes), obj, zero_sources=True)
    return full.cpu(), bias.cpu()
