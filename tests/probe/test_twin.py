"""The transformers twin that runs caching and generation (probe.twin) computes what the HookedTransformer
computes: every mapped site, the stores it writes, and generated tokens steered and unsteered in every mode,
left-padded, with and without the KV cache."""

from __future__ import annotations

import pytest
import torch

from probe.hooks import capture
from probe.models import load_model
from probe.twin import twin_of
from steering import SteeringVector
from steering.apply import generate_tokens
from tests.probe.tiny_gguf import write_tiny_llama

SITES = [f"blocks.{L}.{s}" for L in (0, 1) for s in
         ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out",
          "hook_resid_post")]
PROMPTS = ["Mr. Darcy said nothing; Elizabeth laughed and", "She walked into the room", "It is a truth universally"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin") / "tiny.gguf"
    write_tiny_llama(path, n_layers=2)
    return load_model(path, device="cpu")


def test_every_mapped_site_equals_the_hooked_transformers(llama):
    twin = twin_of(llama, SITES)
    assert twin is not None
    ids = torch.randint(3, llama.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(llama, SITES) as ref:
        ref_logits = llama(ids)
    with torch.no_grad(), twin.capture(SITES) as got:
        logits = twin.forward(ids)
    for s in SITES:
        torch.testing.assert_close(got[s], ref[s], atol=1e-4, rtol=0, msg=s)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    with torch.no_grad(), twin.capture(["blocks.0.hook_mlp_out"]) as early:
        assert twin.forward(ids, stop_after="blocks.0.hook_mlp_out") is None  # stopped early
    torch.testing.assert_close(early["blocks.0.hook_mlp_out"], ref["blocks.0.hook_mlp_out"], atol=1e-4, rtol=0)
    assert twin.last(["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"]) == "blocks.1.hook_resid_pre"


def test_unmapped_sites_and_the_switch_fall_back_to_the_hooked_transformer(llama, monkeypatch):
    assert twin_of(llama, ["blocks.0.ln1.hook_normalized"]) is None
    assert twin_of(llama, ["blocks.7.hook_resid_post"]) is None  # no such layer
    monkeypatch.setenv("STEERSCOPE_TWIN", "0")
    assert twin_of(llama, SITES[:1]) is None


def test_a_store_cached_on_the_twin_equals_the_hooked_transformers(llama, tmp_path, monkeypatch):
    from probe.store import ActivationStore

    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 6] * 4
    sites = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"]
    fast = ActivationStore.build(llama, texts, sites, 90, tmp_path / "fast", n_ctx=16, progress=False)
    monkeypatch.setenv("STEERSCOPE_TWIN", "0")
    slow = ActivationStore.build(llama, texts, sites, 90, tmp_path / "slow", n_ctx=16, progress=False)
    for s in sites:
        torch.testing.assert_close(fast.read_shard(0, s), slow.read_shard(0, s), atol=1e-4, rtol=0)


def _vectors(llama):
    d = llama.cfg.d_model
    flat = SteeringVector.from_direction(torch.randn(d, generator=torch.Generator().manual_seed(1)),
                                         "blocks.1.hook_resid_pre", coeff=6.0)
    return {"none": (None, "prompt"), "prompt": ([flat], "prompt"), "generated": ([flat], "generated"),
            "all": ([flat], "all"),
            "actadd": ([SteeringVector.actadd(llama, " weddings", " ", layer=1, coeff=4.0)], "prompt")}


@pytest.mark.parametrize("arm", ["none", "prompt", "generated", "all", "actadd"])
@pytest.mark.parametrize("kv", [True, False])
def test_generation_on_the_twin_equals_the_hooked_transformers(llama, monkeypatch, arm, kv):
    vecs, mode = _vectors(llama)[arm]
    kw = dict(steer=vecs, mode=mode, max_new_tokens=8, stop_at_eos=False, use_kv_cache=kv)
    assert twin_of(llama, [v.site for v in vecs or []]) is not None
    fast = generate_tokens(llama, PROMPTS, **kw)
    monkeypatch.setenv("STEERSCOPE_TWIN", "0")
    slow = generate_tokens(llama, PROMPTS, **kw)
    assert fast.tokens.tolist() == slow.tokens.tolist()
    torch.testing.assert_close(fast.logits, slow.logits, atol=2e-4, rtol=0)
    assert fast.texts == slow.texts


def test_the_real_model_bench_runs_at_a_tiny_size(llama, tmp_path, monkeypatch, capsys):
    import sys

    from bench import real_model

    path = tmp_path / "bench.gguf"
    write_tiny_llama(path, n_layers=2)
    monkeypatch.setattr(sys, "argv", ["real_model", "--model", str(path), "--batch", "2", "--ctx", "16", "--new", "3",
                                      "--repeat", "1", "--threads", "1"])
    real_model.main()
    out = capsys.readouterr().out
    assert out.count("x transformers' forward") == 4 and out.count("x transformers' generate") == 6


def test_a_users_own_hook_on_the_hooked_transformer_keeps_generation_on_it(llama):
    from probe.hooks import hooks

    calls = []

    def spy(t, hook):
        calls.append(t.shape)

    assert twin_of(llama) is not None
    with hooks(llama, [("blocks.0.hook_resid_post", spy)]):
        assert twin_of(llama) is None
        generate_tokens(llama, PROMPTS[:1], max_new_tokens=2)
    assert len(calls) == 2  # the user's hook ran on both forwards
    assert twin_of(llama) is not None  # and the twin is back once it is removed


def test_steering_the_normalized_mlp_input_on_the_twin_equals_the_hooked_transformers(llama):
    """A replacement at ln2.hook_normalized (gain applied after it, as TL's RMSNorm does) changes the output alike."""
    site = "blocks.1.ln2.hook_normalized"
    twin = twin_of(llama, [site])
    ids = llama.to_tokens(PROMPTS[0])
    bump = torch.randn(llama.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hooks_on(llama, site, lambda t, hook: t + bump):
        ref = llama(ids)
    with torch.no_grad(), twin.hooks([(site, lambda t, hook: t + bump)]):
        got = twin.forward(ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_transcoders_streamed_on_the_twin_equal_those_streamed_on_the_hooked_transformer(llama, tmp_path, monkeypatch):
    import warnings

    from saes.circuits import train_transcoders

    texts = [" ".join(PROMPTS) * 4] * 30
    kw = dict(n_tokens=512, d_sae=16, k=4, batch_size=128, n_ctx=16, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fast = train_transcoders(llama, texts, tmp_path / "twin", **kw)
        monkeypatch.setenv("STEERSCOPE_TWIN", "0")
        slow = train_transcoders(llama, texts, tmp_path / "tl", **kw)
    for L in (0, 1):
        for name, p in slow[L].state_dict().items():
            torch.testing.assert_close(fast[L].state_dict()[name], p, atol=2e-4, rtol=1e-3)


def hooks_on(model, site, fn):
    from probe.hooks import hooks

    return hooks(model, [(site, fn)])
