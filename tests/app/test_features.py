"""saes.features: the streaming build against brute force, the interval sampler's invariants, every
dictionary family, stores vs tokens, reuse and bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import capture
from probe.store import ActivationStore
from saes.features import _Intervals, build_feature_store, dictionary_fingerprint
from saes.snmf import fit_snmf
from saes.topk import TopKConfig, TopKSAE
from saes.transcoder import Transcoder, TranscoderConfig
from tests.app.conftest import contexts

SITE = "blocks.1.hook_resid_post"


def table(path, name):
    return pq.read_table(path / f"{name}.parquet").to_pandas()


@pytest.fixture(scope="module")
def sae(tiny_dense):
    torch.manual_seed(0)
    return TopKSAE(TopKConfig(d_in=64, d_sae=96, k=6, site=SITE))


@pytest.fixture(scope="module")
def built(tiny_dense, sae, tmp_path_factory):
    out = tmp_path_factory.mktemp("fs") / "store"
    tokens = contexts(40, 24)
    meta = build_feature_store(sae, tiny_dense, tokens, out, n_examples=8, n_intervals=4, per_interval=3, n_bins=16,
                               window=(5, 2), batch_contexts=6, progress=False)
    with torch.no_grad(), capture(tiny_dense, [SITE]) as acts:
        tiny_dense(tokens, return_type=None)
        codes = sae.encode(acts[SITE].reshape(-1, 64)).reshape(40, 24, -1)
    codes[:, 0] = 0  # BOS is not a row
    return out, meta, tokens, codes


def test_statistics_and_top_examples_match_brute_force(built):
    out, meta, tokens, codes = built
    flat = codes.reshape(-1, codes.shape[-1])
    f, e = table(out, "features"), table(out, "examples")
    assert meta["n_tokens"] == 40 * 23 and len(f) == 96
    np.testing.assert_array_equal(f.n_fired, (flat > 0).sum(0).numpy())
    np.testing.assert_allclose(f.max_act, flat.max(0).values.numpy(), atol=1e-6)
    np.testing.assert_allclose(f.density, (flat > 0).float().mean(0).numpy() * 40 * 24 / (40 * 23), rtol=1e-6)
    assert all(sum(h) == n for h, n in zip(f.hist_counts, f.n_fired, strict=True))
    for feat in range(96):
        top = e[(e.feature == feat) & (e.kind == "top")]
        want = flat[:, feat][flat[:, feat] > 0].sort(descending=True).values[:8]
        np.testing.assert_allclose(top.act.values, want.numpy(), atol=1e-6)


def test_windows_hold_the_right_tokens_and_activations(built):
    out, _, tokens, codes = built
    for _, r in table(out, "examples").iterrows():
        lo = r.position - r.center
        assert list(r.token_ids) == tokens[r.context, lo : lo + len(r.token_ids)].tolist()
        np.testing.assert_allclose(r.acts, codes[r.context, lo : lo + len(r.acts), r.feature].numpy(), atol=2e-3)
        assert r.acts[r.center] == pytest.approx(r.act, abs=2e-3) and r.token == r.tokens[r.center]


def test_interval_samples_lie_in_their_interval_and_fill_it(built):
    out, _, _, _ = built
    e, f = table(out, "examples"), table(out, "features").set_index("feature")
    iv = e[e.kind != "top"]
    assert ((iv.act >= iv.interval_lo - 1e-6) & (iv.act < iv.interval_hi + 1e-6)).all()
    for (feat, _), g in iv.groupby(["feature", "kind"]):
        in_group = round(g.interval_frac.iloc[0] * f.n_fired[feat])
        assert len(g) == min(3, in_group) and g.context.astype(str).add(g.position.astype(str)).is_unique


def test_interval_sampler_keeps_the_smallest_keys_per_final_bin():
    """Through bin merges, each bin's sample is exactly its entries with the smallest random keys (uniform)."""
    torch.manual_seed(1)
    iv, bins, per = _Intervals(2, 8, 3, 1, seed=7), 8, 3
    keys_gen, seen = torch.Generator().manual_seed(7), []
    for scale in (0.3, 0.3, 1.0, 5.0, 2.0, 40.0, 3.0):  # the range doubles several times
        a = torch.rand(50) * scale
        f = torch.randint(0, 2, (50,))
        rows = torch.arange(len(seen), len(seen) + 50)
        iv.observe(f, a, rows, lambda i: torch.zeros(len(i), 1))
        keys = torch.rand(50, generator=keys_gen)
        seen += list(zip(f.tolist(), rows.tolist(), a.tolist(), keys.tolist(), strict=True))
    width = iv.width()
    for feat in range(2):
        mine = [(k, r, a) for f_, r, a, k in seen if f_ == feat]
        assert iv.counts[feat].sum() == len(mine)
        for b in range(bins):
            members = sorted((k, r) for k, r, a in mine if min(int(a / width[feat]), bins - 1) == b)
            assert iv.counts[feat, b] == len(members)
            slot = feat * bins + b
            got = iv.sample.pay["row"][slot][torch.isfinite(iv.sample.key[slot])]
            assert sorted(got.tolist()) == sorted(r for _, r in members[:per])


def test_store_rows_give_the_same_store_as_running_the_model(tiny_dense, sae, tmp_path):
    tokens = contexts(12, 16)
    acts = ActivationStore.build(tiny_dense, tokens, [SITE], 12 * 15 - 4, tmp_path / "acts", progress=False)
    a = build_feature_store(sae, tiny_dense, tokens, tmp_path / "a", n_tokens=12 * 15 - 4, progress=False)
    b = build_feature_store(sae, tiny_dense, acts, tmp_path / "b", progress=False)
    assert a["source"] == "tokens" and b["source"].startswith("store:") and a["n_tokens"] == b["n_tokens"]
    for name in ("features", "examples"):
        x, y = table(tmp_path / "a", name), table(tmp_path / "b", name)
        np.testing.assert_allclose(x.select_dtypes("number").to_numpy(float), y.select_dtypes("number").to_numpy(float),
                                   atol=1e-4)


def test_transcoders_and_snmf_map_features_to_the_residual_stream(tiny_dense, tmp_path):
    tokens = contexts(10, 16)
    tc = Transcoder(TranscoderConfig(d_in=64, d_sae=32, d_out=64, k=4, site="blocks.0.ln2.hook_normalized",
                                     target_site="blocks.0.hook_mlp_out"))
    meta = build_feature_store(tc, tiny_dense, tokens, tmp_path / "tc", progress=False)
    assert meta["site"] == "blocks.0.ln2.hook_normalized" and meta["write_site"] == "blocks.0.hook_mlp_out"
    acts = ActivationStore.build(tiny_dense, tokens, ["blocks.0.mlp.hook_post"], 150, tmp_path / "acts", progress=False)
    snmf = fit_snmf(acts, 12, sparsity=0.1, site="blocks.0.mlp.hook_post", max_iter=10, progress=False)
    meta = build_feature_store(snmf, tiny_dense, acts, tmp_path / "snmf", progress=False)
    assert "W_out" in meta["logits_note"]
    logits = table(tmp_path / "snmf", "logits")
    assert len(logits) == 12 * 2 * 10 and set(logits.kind) == {"top", "bottom"}
    W_U = tiny_dense.W_U.detach()
    d = snmf.W_dec[0].detach() @ tiny_dense.blocks[0].mlp.W_out.detach()
    eff = ((d - d.mean()) * tiny_dense.ln_final.w.detach()) @ W_U
    assert logits[(logits.feature == 0) & (logits.kind == "top")].token_id.tolist() == eff.topk(10).indices.tolist()
    assert (table(tmp_path / "snmf", "features").n_fired > 0).any()


def test_neighbours_are_nearest_decoder_rows(built, sae):
    out = built[0]
    nb = table(out, "neighbours")
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    sim = W @ W.T
    sim.fill_diagonal_(-math.inf)
    assert nb[nb.feature == 7].neighbour.tolist() == sim[7].topk(10).indices.tolist()


def test_reuse_overwrite_and_refusals(tiny_dense, sae, tmp_path):
    tokens, out = contexts(6, 12), tmp_path / "fs"
    meta = build_feature_store(sae, tiny_dense, tokens, out, progress=False)
    assert build_feature_store(sae, tiny_dense, tokens, out, progress=False) == meta  # reused as is
    other = TopKSAE(TopKConfig(d_in=64, d_sae=96, k=6, site=SITE))
    assert dictionary_fingerprint(other) != dictionary_fingerprint(sae)
    with pytest.raises(SteerscopeError, match="holds another feature store"):
        build_feature_store(other, tiny_dense, tokens, out, progress=False)
    with pytest.raises(SteerscopeError, match="holds another feature store"):
        build_feature_store(sae, tiny_dense, contexts(6, 12, seed=1), out, progress=False)  # other data
    assert build_feature_store(other, tiny_dense, tokens, out, overwrite=True, progress=False)["fingerprint"] != meta["fingerprint"]


def test_bad_arguments(tiny_dense, sae, tmp_path):
    with pytest.raises(SteerscopeError, match="n_bins"):
        build_feature_store(sae, tiny_dense, contexts(2, 8), tmp_path / "x", n_bins=10, n_intervals=10, progress=False)
    with pytest.raises(SteerscopeError, match="integer tensor"):
        build_feature_store(sae, tiny_dense, torch.rand(2, 8), tmp_path / "x", progress=False)
    wrong = TopKSAE(TopKConfig(d_in=64, d_sae=8, k=2, site="blocks.9.hook_resid_post"))
    with pytest.raises(SteerscopeError, match="layers"):
        build_feature_store(wrong, tiny_dense, contexts(2, 8), tmp_path / "x", progress=False)


# ------------------------------------------------------------------ the build's directory
@pytest.mark.parametrize("marker, kind", [("manifest.json", "an activation store"), ("cfg.json", "a dictionary")])
def test_a_build_never_writes_into_another_artifact(tiny_dense, sae, tmp_path, marker, kind):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / marker).write_text("{}")
    with pytest.raises(SteerscopeError, match=f"holds {kind}"):
        build_feature_store(sae, tiny_dense, contexts(4, 16), tmp_path / "d", progress=False)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [marker]


def test_zero_tokens_is_an_error_not_the_whole_corpus(tiny_dense, sae, tmp_path):
    with pytest.raises(SteerscopeError, match="n_tokens must be a positive"):
        build_feature_store(sae, tiny_dense, contexts(4, 16), tmp_path / "f", n_tokens=0, progress=False)


def test_a_killed_builds_temp_files_go_and_a_running_build_is_refused(tiny_dense, sae, tmp_path):
    from probe.locks import dir_lock

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / ".examples.parquet.tmp12345").write_bytes(b"half")
    with dir_lock(tmp_path / "f", "feature-store build"), pytest.raises(SteerscopeError, match="in use by"):
        build_feature_store(sae, tiny_dense, contexts(4, 16), tmp_path / "f", progress=False)
    build_feature_store(sae, tiny_dense, contexts(4, 16), tmp_path / "f", progress=False)
    assert not list((tmp_path / "f").glob(".*tmp*")) and not (tmp_path / "f" / ".lock").exists()
