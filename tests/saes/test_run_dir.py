"""A training run's out directory: refusal to replace a dictionary, --overwrite clean-up, the lock, shards
verified before the first step, checkpoints by wall time by default, damaged checkpoint metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from probe.errors import SteerscopeError
from probe.locks import dir_lock
from saes import checkpoint as ckpt
from saes.base import load_dictionary
from saes.topk import TopKSAE
from saes.train import RunOptions, train

ROOT = Path(__file__).resolve().parents[2]
KW = dict(d_sae=16, k=2, batch_size=64, lr=3e-3, warmup_steps=2, n_tokens=64 * 20, progress=False)


def data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(640, 8, generator=g).relu() + 1.0


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fake_feature_store(path: Path) -> None:
    path.mkdir()
    (path / "meta.json").write_text("{}")
    (path / "features.parquet").write_bytes(b"PAR1")


def test_a_finished_dictionary_is_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "sae"
    first = train("topk", data(), out=out, **KW)
    (out / "eval.json").write_text(json.dumps({"fvu": 0.1}))
    fake_feature_store(out / "features")
    (out / "notes.txt").write_text("mine")  # not the dictionary's: kept
    before = snapshot(out)
    with pytest.raises(SteerscopeError, match=r"already holds a dictionary \(topk d_sae=16.*--overwrite"):
        train("topk", data(1), out=out, seed=1, **KW)
    assert snapshot(out) == before  # nothing lost, nothing written
    second = train("topk", data(1), out=out, seed=1, overwrite=True, **KW)
    assert not torch.equal(first.W_enc, second.W_enc)
    assert torch.equal(load_dictionary(out).W_enc, second.W_enc)
    assert not (out / "eval.json").exists() and not (out / "features").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / ".lock").exists()  # the lock file goes with its holder


def test_out_that_is_another_kind_of_artifact_is_refused(tmp_path):
    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "manifest.json").write_text("{}")
    with pytest.raises(SteerscopeError, match="holds an activation store"):
        train("topk", data(), out=tmp_path / "acts", **KW)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SteerscopeError, match="is a file"):
        train("topk", data(), out=tmp_path / "file", **KW)


def test_a_second_run_into_a_locked_directory_gets_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "sae"
    with dir_lock(out, "train"):
        with pytest.raises(SteerscopeError, match=r"in use by a train \(pid \d+"):
            train("topk", data(), out=out, **KW)
    train("topk", data(), out=out, **KW)  # free again once released


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from probe.models import build_model
    from probe.store import ActivationStore
    from probe.zoo.specs import MODEL_SPECS

    cfg = {**MODEL_SPECS["austen-dense"], "n_layers": 1, "d_model": 32, "d_head": 8, "n_heads": 4, "d_mlp": 64}
    model = build_model(cfg, ROOT / "probe" / "zoo" / "tokenizer.json")
    tokens = torch.randint(3, cfg["d_vocab"], (32, 17), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    path = tmp_path_factory.mktemp("store")
    return ActivationStore.build(model, tokens, "blocks.0.hook_resid_post", 512, path, shard_tokens=64, progress=False)


def test_a_damaged_last_shard_stops_training_before_the_first_step(store, tmp_path, monkeypatch):
    from probe.store import ActivationStore

    copy = tmp_path / "acts"
    shutil.copytree(store.path, copy)
    last = copy / store.manifest["shards"][-1]["file"]
    blob = bytearray(last.read_bytes())
    blob[-3] ^= 0x10  # one bit of tensor data
    last.write_bytes(bytes(blob))
    steps = []
    real = TopKSAE.training_loss

    def counting(self, *a, **k):
        steps.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(TopKSAE, "training_loss", counting)
    st = ActivationStore.open(copy)
    kw = {**KW, "n_tokens": len(st), "batch_size": 32}
    with pytest.raises(SteerscopeError, match=rf"1 damaged file\(s\): {last.name}"):
        train("topk", st, site="blocks.0.hook_resid_post", out=tmp_path / "sae", **kw)
    assert steps == []  # found up front, not after most of the run
    assert not (tmp_path / "sae" / "cfg.json").exists()
    with pytest.raises(SteerscopeError, match="checksum|damaged") as late:  # unchecked: found when the shard is read
        train("topk", st, site="blocks.0.hook_resid_post", verify_data=False, **kw)
    assert "damaged file(s)" not in str(late.value)  # a read-time error, not the up-front verify


class Crash(Exception):
    pass


def test_checkpoints_by_wall_time_are_on_by_default_and_resume_exactly(tmp_path, monkeypatch):
    assert RunOptions().checkpoint_minutes == 10.0 and RunOptions().checkpoint_every is None
    real_write, written = ckpt.write, []

    def write_then_crash(directory, step, tensors, meta):
        real_write(directory, step, tensors, meta)
        written.append(step)
        if step == 7:
            raise Crash

    monkeypatch.setattr(ckpt, "write", write_then_crash)
    with pytest.raises(Crash):  # an interval of 0 minutes: a checkpoint after every step
        train("topk", data(), out=tmp_path, checkpoint_minutes=0, **KW)
    assert written == list(range(1, 8))
    monkeypatch.setattr(ckpt, "write", real_write)
    resumed = train("topk", data(), out=tmp_path, resume=True, **KW)
    reference = train("topk", data(), **KW)
    assert torch.equal(resumed.W_enc, reference.W_enc) and torch.equal(resumed.b_dec, reference.b_dec)
    monkeypatch.setattr(ckpt, "write", write_then_crash)
    written.clear()
    train("topk", data(), out=tmp_path / "default", **KW)  # a run far shorter than 10 minutes writes none
    assert written == []
    with pytest.raises(SteerscopeError, match=r"checkpoint_minutes must be >= 0 \(got -1"):
        train("topk", data(), out=tmp_path / "x", checkpoint_minutes=-1, **KW)


def test_a_truncated_checkpoint_json_is_one_clear_error(tmp_path, monkeypatch):
    def write_then_crash(directory, step, tensors, meta):
        real_write(directory, step, tensors, meta)
        raise Crash

    real_write = ckpt.write
    monkeypatch.setattr(ckpt, "write", write_then_crash)
    with pytest.raises(Crash):
        train("topk", data(), out=tmp_path, checkpoint_every=3, **KW)
    monkeypatch.setattr(ckpt, "write", real_write)
    meta = next((tmp_path / ckpt.DIRNAME).glob("step-*.json"))
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(SteerscopeError, match=r"checkpoint .*step-000000003.json is damaged \(JSONDecodeError\)"):
        train("topk", data(), out=tmp_path, resume=True, **KW)
