"""Per-layer transcoders and attribution graphs: the graph's arithmetic, its scores, its JSON, training and resume."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from probe.errors import SteerscopeError
from probe.models import build_model
from saes.base import get_architecture
from saes.circuits import Transcoders, load_transcoders, train_transcoders
from saes.circuits.attribution import attribute, node_inputs
from saes.circuits.layers import INPUT, OUTPUT

PROMPT = "Mr. Darcy bowed to Elizabeth and"
TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
         "must be in want of a wife. " * 3, "Elizabeth walked to Netherfield through the mud, and arrived "
         "with her petticoat six inches deep. " * 3] * 40


def random_transcoders(model, skip: bool, d_sae: int = 96, k: int = 6, seed: int = 0) -> Transcoders:
    """Untrained (random) transcoders: the graph's arithmetic must hold for any weights."""
    torch.manual_seed(seed)
    arch = "skip_transcoder" if skip else "transcoder"
    cls = get_architecture(arch)
    d = model.cfg.d_model
    by_layer = {}
    for L in range(model.cfg.n_layers):
        tc = cls(cls.Config(d_in=d, d_sae=d_sae, d_out=d, k=k, site=INPUT.format(L=L), target_site=OUTPUT.format(L=L)))
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.5)
            tc.b_dec.normal_(0, 0.1)
            if skip:
                tc.W_skip.normal_(0, 0.05)
        by_layer[L] = tc.eval()
    return Transcoders(by_layer, {"model": model.cfg.model_name, "skip": skip})


@pytest.fixture(scope="module")
def model64(tiny_spec, tokenizer_file):
    return build_model(tiny_spec("austen-dense"), tokenizer_file).eval().to(torch.float64)


@pytest.fixture(scope="module", params=[False, True], ids=["transcoder", "skip"])
def graph64(request, model64):
    tcs = random_transcoders(model64, request.param).to(torch.float64)
    return tcs, attribute(model64, tcs, PROMPT, batch_size=16)


def test_each_node_input_is_its_incoming_edges_plus_a_bias(model64, graph64):
    tcs, g = graph64
    nodes = g.rows.tolist()
    full, bias = node_inputs(model64, tcs, g, nodes)
    assert torch.allclose(full, bias + g.adjacency.sum(1).double(), atol=1e-4, rtol=0)
    assert (full - bias - g.adjacency.sum(1)).abs().max() < 1e-9  # fp64: the map is exactly affine
    assert g.adjacency.abs().sum() > 0 and (bias.abs() > 1e-6).any()  # neither side is trivially zero


def test_the_frozen_forward_reproduces_the_real_one(model64, graph64):
    """At the prompt itself the frozen replacement model gives the real pre-activations and logits."""
    tcs, g = graph64
    full, _ = node_inputs(model64, tcs, g, g.rows.tolist())
    with torch.no_grad():
        _, cache = model64.run_with_cache(torch.tensor(g.tokens)[None])
        logits = model64(torch.tensor(g.tokens)[None])[0, -1]
    for i, n in enumerate(g.rows.tolist()):
        if n < g.n_features:
            L, p, f = (int(v) for v in g.features[n])
            tc = tcs[L]
            pre = cache[f"blocks.{L}.ln2.hook_normalized"][0, p] @ tc.W_enc[:, f]
            assert abs(float(full[i] - pre.detach())) < 1e-8
            assert abs(float(g.activations[n]) - float((pre + tc.b_enc[f]).detach())) < 1e-8  # TopK passes the pre-activation
        else:
            v = int(g.logit_ids[n - g.logit_index(0)])
            centred = logits[v] - logits.mean() - (model64.b_U[v] - model64.b_U.mean())
            assert abs(float(full[i] - centred.detach())) < 1e-8


def test_bos_has_no_feature_or_error_nodes_and_errors_are_the_transcoder_residual(model64, graph64):
    tcs, g = graph64
    assert g.first_pos == 1 and int(g.features[:, 1].min()) >= 1
    assert int((g.features[:, 0] == 0).sum()) == (g.n_pos - 1) * tcs[0].cfg.k  # TopK: exactly k per token


def test_logits_are_the_top_ones_up_to_the_probability_mass(model64, graph64):
    tcs, g = graph64
    with torch.no_grad():
        probs = model64(torch.tensor(g.tokens)[None])[0, -1].softmax(-1)
    top = probs.topk(10)
    assert g.logit_ids.tolist() == top.indices[: len(g.logit_ids)].tolist()
    assert len(g.logit_ids) == 10 or float(top.values[: len(g.logit_ids)].sum()) >= 0.95


def test_influence_conserves_mass_and_scores_are_fractions(graph64):
    _, g = graph64
    infl, kinds = g.influence(), g.kinds()
    # every path from the logits ends at a token or an error when every feature row is computed
    assert abs(float(infl[kinds == 2].sum() + infl[kinds == 1].sum()) - 1.0) < 1e-9
    s = g.scores
    assert 0 < s["replacement"] < 1 and 0 < s["completeness"] <= 1


def test_the_feature_cap_computes_rows_in_order_of_influence(model64, graph64):
    tcs, full = graph64
    capped = attribute(model64, tcs, PROMPT, batch_size=4, max_feature_nodes=8)
    feat_rows = [n for n in capped.rows.tolist() if n < capped.n_features]
    assert len(feat_rows) == 8 and len(capped.rows) == 8 + len(capped.logit_ids)
    # the first batch is the top of the influence computed from the logit rows alone
    assert torch.equal(capped.adjacency[: len(capped.logit_ids)], full.adjacency[: len(full.logit_ids)])
    infl = full.influence()
    top_by_logits = capped.__class__(**{**capped.__dict__, "rows": capped.rows[: len(capped.logit_ids)],
                                        "adjacency": capped.adjacency[: len(capped.logit_ids)]}).influence()
    assert set(feat_rows[:4]) == set(top_by_logits[: capped.n_features].argsort(descending=True)[:4].tolist())
    assert infl.shape == top_by_logits.shape


def test_first_rows_is_the_graph_of_a_smaller_cap(model64, graph64):
    tcs, g = graph64  # built with batch_size=16 and no cap
    capped = attribute(model64, tcs, PROMPT, batch_size=16, max_feature_nodes=32)
    cut = g.first_rows(32)
    assert torch.equal(cut.rows, capped.rows) and torch.allclose(cut.adjacency, capped.adjacency, rtol=0, atol=1e-12)
    assert cut.scores == pytest.approx(capped.scores, abs=1e-12) and cut.info["max_feature_nodes"] == 32


def test_pruning_keeps_tokens_and_logits_and_thresholds_one_keep_every_edge(graph64):
    _, g = graph64
    keep, edges, _ = g.prune(1.0, 1.0)
    kinds = g.kinds()
    assert keep[kinds >= 2].all()
    assert int(edges.sum()) <= int((g.adjacency != 0).sum())
    keep8, edges8, _ = g.prune(0.8, 0.98)
    assert int(keep8.sum()) < int(keep.sum()) and int(edges8.sum()) < int(edges.sum())
    assert keep8[kinds >= 2].all()
    with pytest.raises(SteerscopeError, match="fractions"):
        g.prune(0.0, 0.5)


class _Node(BaseModel):  # circuit-tracer's frontend schema (frontend/graph_models.py), strictly
    model_config = ConfigDict(extra="forbid", strict=True)
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float
    is_target_logit: bool
    run_idx: int
    reverse_ctx_idx: int
    jsNodeId: str
    clerp: str
    influence: float | None
    activation: float | None


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow")
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None


class _QParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class _Link(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    source: str
    target: str
    weight: float


class _Graph(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: _Meta
    qParams: _QParams
    nodes: list[_Node]
    links: list[_Link]


def test_json_is_circuit_tracers_schema_and_round_trips(graph64, tmp_path):
    _, g = graph64
    path = g.save_json(tmp_path / "g.json")
    data = json.loads(path.read_text())
    parsed = _Graph.model_validate(data)
    assert json.loads(parsed.model_dump_json()) == {**data, "metadata": {**data["metadata"]}}
    ids = [n.node_id for n in parsed.nodes]
    assert len(ids) == len(set(ids))  # errors never collide with features
    assert {x.source for x in parsed.links} | {x.target for x in parsed.links} <= set(ids)
    types = {n.feature_type for n in parsed.nodes}
    assert {"embedding", "logit", "cross layer transcoder"} <= types
    assert types <= {"embedding", "logit", "cross layer transcoder", "mlp reconstruction error"}
    assert sum(n.is_target_logit for n in parsed.nodes) == 1
    assert [n.ctx_idx for n in parsed.nodes if n.feature_type == "embedding"] == list(range(g.n_pos))
    scores = data["metadata"]["scores"]
    assert set(scores) == {"replacement", "completeness"} and scores == pytest.approx(g.scores)
    assert data["metadata"]["prompt_tokens"] == g.token_strs and "".join(g.token_strs[1:]) == PROMPT


def test_bad_attribution_inputs_get_one_line(model64, graph64, tiny_spec, tokenizer_file):
    tcs, _ = graph64
    with pytest.raises(SteerscopeError, match="empty"):
        attribute(model64, tcs, "   ")
    partial = Transcoders({0: tcs[0]}, {"model": model64.cfg.model_name})
    with pytest.raises(SteerscopeError, match="every layer"):
        attribute(model64, partial, PROMPT)
    wide = build_model(tiny_spec("austen-dense", d_model=32, d_head=8), tokenizer_file).eval()
    with pytest.raises(SteerscopeError, match="does not fit"):
        attribute(wide, tcs, PROMPT)
    with pytest.raises(SteerscopeError, match="trained on"):
        attribute(model64, Transcoders(tcs.by_layer, {"model": "gpt2"}), PROMPT)
    with pytest.raises(SteerscopeError, match="max_feature_nodes"):
        attribute(model64, tcs, PROMPT, max_feature_nodes=-1)


# ---------------------------------------------------------------------- training every layer
def _train(model, out, **kw):
    args = dict(n_tokens=1024, d_sae=32, k=4, batch_size=128, n_ctx=16, buffer_tokens=300, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # short runs warn about their step count
        return train_transcoders(model, TEXTS, out, **{**args, **kw})


def test_every_layer_is_trained_and_indexed(tiny_dense, tmp_path):
    tcs = _train(tiny_dense, tmp_path / "tc", skip=True)
    again = load_transcoders(tmp_path / "tc")
    assert again.layers == [0, 1] and again.skip and again.model_name == tiny_dense.cfg.model_name
    for L in again.layers:
        assert again.site(L) == f"blocks.{L}.ln2.hook_normalized" and again.target_site(L) == f"blocks.{L}.hook_mlp_out"
        assert torch.equal(again[L].W_dec, tcs[L].W_dec) and again[L].architecture == "skip_transcoder"
        assert again[L].cfg.training["n_tokens_trained"] == 1024
    info = json.loads((tmp_path / "tc" / "transcoders.json").read_text())
    assert [e["layer"] for e in info["layers"]] == [0, 1] and all("fvu" in e for e in info["layers"])
    with pytest.raises(SteerscopeError, match="already holds"):
        _train(tiny_dense, tmp_path / "tc")


def test_the_layers_learn_their_own_mlp(tiny_dense, tmp_path):
    """Each layer's transcoder predicts its own MLP's output better than the other layer's transcoder does."""
    tcs = _train(tiny_dense, tmp_path / "tc", n_tokens=4096, batch_size=32, d_sae=64, k=8, lr=3e-3)
    stream_model = tiny_dense
    toks = torch.tensor([stream_model.to_tokens(TEXTS[1])[0, :16].tolist()])
    with torch.no_grad():
        _, cache = stream_model.run_with_cache(toks)
    for L in (0, 1):
        x, y = cache[f"blocks.{L}.ln2.hook_normalized"][0, 1:], cache[f"blocks.{L}.hook_mlp_out"][0, 1:]
        own = ((tcs[L](x).recon - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        other = ((tcs[1 - L](x).recon - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert own < other and own < 1.0


def test_a_killed_run_resumes_to_the_same_weights(tiny_dense, tmp_path, monkeypatch):
    whole = _train(tiny_dense, tmp_path / "whole")
    from saes.train import Trainer

    feed, calls = Trainer.feed, {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] > 9:  # layer 0 and 1 alternate: dies during batch 5
            raise KeyboardInterrupt
        return feed(self, batch)

    monkeypatch.setattr(Trainer, "feed", dying)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_dense, tmp_path / "resumed", checkpoint_minutes=0.0)
    monkeypatch.setattr(Trainer, "feed", feed)
    assert not (tmp_path / "resumed" / "transcoders.json").exists()
    with pytest.raises(SteerscopeError, match="resume"):
        _train(tiny_dense, tmp_path / "resumed")
    resumed = _train(tiny_dense, tmp_path / "resumed", resume=True)
    for L in (0, 1):
        for name, p in whole[L].state_dict().items():
            assert torch.equal(p, resumed[L].state_dict()[name]), (L, name)


def test_bad_training_inputs_get_one_line(tiny_dense, tmp_path):
    with pytest.raises(SteerscopeError, match="layers must be"):
        train_transcoders(tiny_dense, TEXTS, tmp_path / "a", n_tokens=1024, d_sae=8, layers=[5])
    with pytest.raises(SteerscopeError, match="more than the corpus"):
        train_transcoders(tiny_dense, TEXTS[:1], tmp_path / "b", n_tokens=10**7, d_sae=8, n_ctx=16)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SteerscopeError, match="is a file"):
        train_transcoders(tiny_dense, TEXTS, tmp_path / "file", n_tokens=1024, d_sae=8)
    with pytest.raises(SteerscopeError, match="not a transcoders directory"):
        load_transcoders(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "transcoders.json").write_text("{not json")
    with pytest.raises(SteerscopeError, match="damaged"):
        load_transcoders(tmp_path / "bad")


def test_n_tokens_need_not_be_a_whole_number_of_batches(tiny_dense, tmp_path):
    tcs = _train(tiny_dense, tmp_path / "tc", n_tokens=1000, batch_size=128, layers=[1])
    assert tcs.layers == [1] and tcs[1].cfg.training["n_tokens_trained"] == 1024  # 8 whole batches


def test_spearman_matches_a_hand_computed_rank_correlation():
    from saes.circuits.validate import spearman

    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x * 10 + 3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    # d = rank differences (0, 0, 1, -1, 0): rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman(x, torch.tensor([1.0, 2.0, 4.0, 3.0, 5.0])) == pytest.approx(0.9)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(1.0)  # ties


def test_ablation_predictions_are_exact_in_the_frozen_linear_regime(model64, graph64):
    """A last-layer feature at the last position reaches the logit only directly: the prediction is minus its
    edge, and the real model with attention and LayerNorm frozen measures exactly that."""
    from saes.circuits.validate import measured_ablations, predicted_ablations

    tcs, g = graph64
    last = ((g.features[:, 0] == g.n_layers - 1) & (g.features[:, 1] == g.n_pos - 1)).nonzero()[:, 0]
    pred = predicted_ablations(g, last)
    assert torch.allclose(pred, -g.adjacency[0, last].double())  # row 0 is the top logit: -(direct edge)
    assert torch.allclose(measured_ablations(model64, tcs, g, last, freeze=True), pred, rtol=0, atol=1e-9)
    live = measured_ablations(model64, tcs, g, last)  # ln_final live: close, not equal
    assert not torch.allclose(live, pred, rtol=0, atol=1e-9) and torch.allclose(live, pred, rtol=0.5, atol=0.1)


# ------------------------------------------------------------------ weights-based connections
def test_connections_are_the_strongest_virtual_weights_and_de_embeddings(model64):
    from saes.circuits.connections import de_embedding, downstream, upstream
    from saes.circuits.validate import virtual_weights

    tcs = random_transcoders(model64, skip=False, d_sae=40).to(torch.float64)
    n_layers, layer, feat = model64.cfg.n_layers, 1, 7
    # every (earlier layer, feature) pair's weight into feat, from the full virtual-weight matrices
    every = [(L, i, float(virtual_weights(tcs, L, layer)[i, feat])) for L in range(layer) for i in range(40)]
    want = sorted(every, key=lambda r: -abs(r[2]))[:8]
    got = upstream(tcs, layer, feat, k=8)
    assert [(r["layer"], r["feature"]) for r in got] == [(L, i) for L, i, _ in want]
    assert [r["weight"] for r in got] == pytest.approx([w for *_, w in want], abs=1e-12)
    every = [(L, i, float(virtual_weights(tcs, 0, L)[feat, i])) for L in range(1, n_layers) for i in range(40)]
    want = sorted(every, key=lambda r: -abs(r[2]))[:5]
    assert [(r["layer"], r["feature"]) for r in downstream(tcs, 0, feat, k=5)] == [(L, i) for L, i, _ in want]
    assert downstream(tcs, n_layers - 1, feat) == [] and upstream(tcs, 0, feat) == []
    scores = model64.W_E.double() @ tcs[layer].W_enc[:, feat].double()
    de = de_embedding(model64, tcs, layer, feat, k=6)
    assert [r["token_id"] for r in de] == scores.topk(6).indices.tolist()
    assert de[0]["token"] == model64.tokenizer.decode([de[0]["token_id"]])
    with pytest.raises(SteerscopeError, match="out of range"):
        upstream(tcs, layer, 40)
    with pytest.raises(SteerscopeError, match="no transcoder for layer 9"):
        downstream(tcs, 9, 0)


def test_attribution_leaves_the_callers_transcoders_as_they_are(model64):
    tcs = random_transcoders(model64, skip=True)  # float32, model float64
    before = {L: tc.W_enc.clone() for L, tc in tcs.by_layer.items()}
    attribute(model64, tcs, PROMPT, max_feature_nodes=16)
    for L, tc in tcs.by_layer.items():
        assert tc.W_enc.dtype == torch.float32 and torch.equal(tc.W_enc, before[L])
        assert all(p.requires_grad for p in tc.parameters())  # the weight-gradient switch is undone
