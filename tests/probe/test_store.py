"""ActivationStore: rows equal a manual forward, shuffling covers every row once, checksums, refusal of a
different store, resume after SIGKILL (byte-identical), and a two-rank gloo build equal to one process.

The worker processes are forked, so they share the test's tiny model without re-importing TransformerLens."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import probe
import probe.store as store_mod
from probe.errors import SteerscopeError
from probe.hooks import count_hooks
from probe.locks import dir_lock
from probe.models import build_model
from probe.store import ActivationStore
from probe.zoo.specs import MODEL_SPECS

CFG = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}
TOKENIZER = str(Path(probe.__file__).parent / "zoo" / "tokenizer.json")
SITES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
N_TOKENS = 900  # 60 contexts of 16 (15 rows each without BOS)
KW = dict(n_ctx=16, batch_size=4, shard_tokens=150, progress=False)  # 10 contexts per shard -> 6 shards
WORDS = "the a lady gentleman Elizabeth Darcy said walked house letter morning evening dear sister , . ;".split()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CFG, TOKENIZER).eval()


@pytest.fixture(scope="module")
def texts():
    return [" ".join(random.Random(i).choices(WORDS, k=120)) for i in range(12)]


@pytest.fixture(scope="module")
def store(model, texts, tmp_path_factory):
    return ActivationStore.build(model, texts, SITES, N_TOKENS, tmp_path_factory.mktemp("store") / "acts", **KW)


def all_rows(store, site):
    return torch.cat([store.read_shard(i, site) for i in range(store.n_shards)])


def files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


# ---------------------------------------------------------------------- contents
def test_rows_equal_a_manual_forward(model, store):
    tokens = store.tokens
    assert tokens.shape == (60, 16) and bool((tokens[:, 0] == model.tokenizer.bos_token_id).all())
    _, cache = model.run_with_cache(tokens)
    ctx, pos = store.locate(torch.arange(len(store)))
    assert len(store) == N_TOKENS and store.n_shards == 6 and int(pos.min()) == 1  # BOS excluded
    for site in SITES:
        ref = cache[site][ctx, pos].reshape(N_TOKENS, -1)
        torch.testing.assert_close(all_rows(store, site), ref, rtol=0, atol=0)
    m = store.manifest
    assert m["d"] == {SITES[0]: 64, SITES[1]: 64} and m["dtype"] == "float32" and m["include_bos"] is False
    assert [s["rows"] for s in m["shards"]] == [150] * 6 and m["model"]["n_layers"] == 2
    assert count_hooks(model) == 0


def test_include_bos_bfloat16_and_progress_bar(model, texts, tmp_path, capsys):
    kw = {**KW, "progress": True}
    s = ActivationStore.build(model, texts, "blocks.1.hook_resid_pre", 100, tmp_path, include_bos=True, dtype="bfloat16", **kw)
    assert "caching 1 site(s)" in capsys.readouterr().err
    ctx, pos = s.locate(torch.arange(100))
    assert int(pos.min()) == 0 and s.dtype == torch.bfloat16
    _, cache = model.run_with_cache(s.tokens)
    ref = cache["blocks.1.hook_resid_pre"][ctx, pos].to(torch.bfloat16)
    torch.testing.assert_close(all_rows(s, "blocks.1.hook_resid_pre"), ref, rtol=0, atol=0)


def test_stops_after_the_last_needed_layer(model, texts, tmp_path):
    calls = []
    handle = model.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        ActivationStore.build(model, texts, "blocks.0.hook_resid_post", 60, tmp_path, **KW)
    finally:
        handle.remove()
    assert calls == [] and count_hooks(model) == 0


def test_corpus_spec_and_token_ids_give_the_same_rows(model, texts, store, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    from_spec = ActivationStore.build(model, str(corpus), SITES, N_TOKENS, tmp_path / "a", **KW)
    from_ids = ActivationStore.build(model, store.tokens, SITES, N_TOKENS, tmp_path / "b", **KW)
    assert from_spec.manifest["corpus"] == str(corpus) and from_ids.manifest["corpus"] is None
    for s in (from_spec, from_ids):
        torch.testing.assert_close(all_rows(s, SITES[1]), all_rows(store, SITES[1]), rtol=0, atol=0)


# ---------------------------------------------------------------------- batches
def test_batches_cover_every_row_exactly_once(model, tmp_path):
    tokens = torch.randint(3, 8192, (60, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0], tokens[:, 1] = model.tokenizer.bos_token_id, torch.arange(3, 63)  # a distinct token per context
    site = SITES[0]
    store = ActivationStore.build(model, tokens, site, N_TOKENS, tmp_path, **KW)
    rows = all_rows(store, site)
    index = {r.numpy().tobytes(): i for i, r in enumerate(rows)}
    assert len(index) == len(rows)  # rows are distinct, so their bytes identify them

    def order(**kw):
        return [index[r.numpy().tobytes()] for b in store.batches(site, 64, **kw) for r in b]

    shuffled = order(shuffle=True, seed=0, buffer_shards=2)
    assert sorted(shuffled) == list(range(N_TOKENS)) and shuffled != list(range(N_TOKENS))
    assert order(shuffle=True, seed=0, buffer_shards=2) == shuffled
    assert order(shuffle=True, seed=1, buffer_shards=2) != shuffled
    assert len({i // 150 for i in shuffled[:64]}) == 2  # one buffer mixes two shards
    assert order(shuffle=False) == list(range(N_TOKENS))
    sizes = [len(b) for b in store.batches(site, 64, seed=3)]
    assert sizes == [64] * 14 + [4]


# ---------------------------------------------------------------------- integrity
def test_verify_detects_corrupted_and_truncated_shards(model, texts, tmp_path):
    s = ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    s.verify()
    data = bytearray((tmp_path / "shard-00000.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "shard-00000.safetensors").write_bytes(bytes(data))
    with (tmp_path / "shard-00001.safetensors").open("r+b") as f:
        f.truncate(100)
    with pytest.raises(SteerscopeError, match="shard-00000.safetensors, shard-00001.safetensors"):
        s.verify()
    with pytest.raises(SteerscopeError, match=r"shard-00001\.safetensors is truncated"):
        s.read_shard(1)
    with pytest.raises(SteerscopeError, match=r"shard-00000\.safetensors is corrupted"):
        list(s.batches(SITES[0], 32, shuffle=False))


def test_existing_store_is_reused_refused_or_overwritten(model, texts, tmp_path):
    s = ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    before = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    again = ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    assert again.manifest == s.manifest and {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()} == before
    with pytest.raises(SteerscopeError, match="holds a different activation store .n_tokens"):
        ActivationStore.build(model, texts, SITES[0], 150, tmp_path, **KW)
    new = ActivationStore.build(model, texts, SITES[0], 150, tmp_path, overwrite=True, **KW)
    assert len(new) == 150 and sorted(f.name for f in tmp_path.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "tokens.safetensors"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SteerscopeError, match="not an activation store"):
        ActivationStore.build(model, texts, SITES[0], 150, tmp_path / "other", overwrite=True, **KW)


@pytest.mark.parametrize("corpus, sites, n_tokens, match", [
    ("texts", "blocks.0.hook_resid_pots", 100, r"unknown site .*Did you mean: blocks\.0\.hook_resid_post"),
    ("texts", "blocks.5.hook_resid_post", 100, "the model has 2 layers"),
    ("texts", "blocks.0.attn.hook_pattern", 100, "not one row per token"),
    ("texts", SITES[0], 10**6, "more than the corpus provides"),
    ([], SITES[0], 100, "corpus is empty"),
    (["", "  \n"], SITES[0], 100, "corpus is empty"),
    (torch.zeros(0, 16, dtype=torch.long), SITES[0], 100, "corpus is empty"),
    (torch.ones(4, 16, dtype=torch.long), SITES[0], 30, "must start with the same first token"),
])
def test_bad_inputs_raise_one_line_errors(model, texts, tmp_path, corpus, sites, n_tokens, match):
    corpus = texts if corpus == "texts" else corpus
    with pytest.raises(SteerscopeError, match=match) as err:
        ActivationStore.build(model, corpus, sites, n_tokens, tmp_path / "s", **KW)
    assert "\n" not in str(err.value) and not (tmp_path / "s").exists()


def test_open_refuses_a_non_store(tmp_path):
    with pytest.raises(SteerscopeError, match="not an activation store"):
        ActivationStore.open(tmp_path)


# ---------------------------------------------------------------------- resume and ranks
def build_worker(rank: int, world: int, model, corpus, out: Path, slow: bool) -> None:
    """Body of a forked worker process: one rank of a gloo group (world > 1), optionally slowed down."""
    if world > 1:
        init = f"file://{out.parent / 'rendezvous'}"
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    if slow:
        model.blocks[0].register_forward_hook(lambda *a: time.sleep(0.3))  # the fork's copy only
    ActivationStore.build(model, corpus, SITES, N_TOKENS, out, **KW)
    if world > 1:
        torch.distributed.destroy_process_group()


def test_resume_after_sigkill_is_byte_identical(model, texts, tmp_path):
    out = tmp_path / "out"
    proc = multiprocessing.get_context("fork").Process(target=build_worker, args=(0, 1, model, texts, out, True))
    proc.start()
    deadline = time.monotonic() + 60
    while not (out / "shard-00000.safetensors").exists():
        assert proc.is_alive() and time.monotonic() < deadline, "the worker died or wrote no shard in 60 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert not (out / "shard-00005.safetensors").exists()
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.raises(SteerscopeError, match="did not finish"):
        ActivationStore.open(out)
    resumed = ActivationStore.build(model, texts, SITES, N_TOKENS, out, **KW)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not recomputed
    whole = ActivationStore.build(model, texts, SITES, N_TOKENS, tmp_path / "whole", **KW).path
    assert files(out) == files(whole)
    resumed.verify()


def test_two_gloo_ranks_equal_one_process(model, texts, tmp_path):
    out = tmp_path / "out"
    torch.multiprocessing.start_processes(build_worker, args=(2, model, texts, out, False), nprocs=2,
                                          start_method="fork")
    merged = ActivationStore.open(out)
    single = ActivationStore.build(model, texts, SITES, N_TOKENS, tmp_path / "single", **KW)
    merged.verify()
    assert merged.n_shards == single.n_shards == 6 and torch.equal(merged.tokens, single.tokens)
    for site in SITES:
        (ka, a), (kb, b) = by_position(merged, site), by_position(single, site)
        assert torch.equal(ka, kb)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def by_position(store, site):
    """Rows of ``site`` sorted by (context, position), with those sorted keys."""
    ctx, pos = store.locate(torch.arange(len(store)))
    key = ctx * store.n_ctx + pos
    order = key.argsort()
    return key[order], all_rows(store, site)[order]


# ------------------------------------------------------------------ repair, overwrite, lock
def flip(file) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))


def shard_bytes(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("shard-*"))}


def test_rerunning_the_build_remakes_only_the_damaged_shards(model, texts, tmp_path):
    s = ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    clean, good = shard_bytes(tmp_path), (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    flip(tmp_path / "shard-00001.safetensors")
    with pytest.raises(SteerscopeError, match="rerun the same `steerscope cache build`"):
        s.verify()
    again = ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    again.verify()
    assert shard_bytes(tmp_path) == clean and again.manifest == s.manifest
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == good  # the good shard was kept
    assert not list(tmp_path.glob("*.sha256")) and not (tmp_path / ".lock").exists()


def test_overwrite_rebuilds_even_the_same_store(model, texts, tmp_path):
    ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    stamp = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    ActivationStore.build(model, texts, SITES[0], 300, tmp_path, overwrite=True, **KW).verify()
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns != stamp


def test_a_shard_damaged_between_a_kill_and_the_resume_is_remade(model, texts, tmp_path, monkeypatch):
    clean_dir = tmp_path / "clean"
    clean = ActivationStore.build(model, texts, SITES[0], 300, clean_dir, **KW)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the manifest was finished")

    monkeypatch.setattr(store_mod, "_finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW)
    monkeypatch.undo()
    flip(tmp_path / "s" / "shard-00001.safetensors")  # damaged while nobody was looking
    resumed = ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW)
    resumed.verify()
    assert resumed.manifest["shards"] == clean.manifest["shards"]


def test_two_builds_into_one_directory_the_second_is_refused(model, texts, tmp_path):
    with dir_lock(tmp_path / "s", "cache build"), pytest.raises(SteerscopeError, match=r"in use by a cache build \(pid"):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW)
    ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW).verify()  # released: it works now


def test_a_store_path_under_a_file_is_one_clear_error(model, texts, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SteerscopeError, match="a file is in the way|is a file"):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "f" / "s", **KW)
    with pytest.raises(SteerscopeError, match="is a file, not a directory"):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "f", **KW)
