"""The trainer: schedules, init, data streams, NaN handling, dead latents, checkpoints and resume, DDP, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from probe.errors import SteerscopeError
from saes import checkpoint as ckpt
from saes.base import load_dictionary
from saes.metrics import fvu
from saes.topk import TopKSAE
from saes.train import TrainConfig, geometric_median, lr_at, train

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(d_sae=32, k=4, batch_size=128, lr=3e-3, warmup_steps=2, progress=False)


def sparse_data(n: int = 2048, d: int = 16, n_feat: int = 24, seed: int = 0, offset: float = 3.0) -> torch.Tensor:
    """Rows that are sparse nonnegative combinations of ``n_feat`` random directions, plus a mean offset."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, d, generator=g)
    mags = torch.rand(n, n_feat, generator=g) * (torch.rand(n, n_feat, generator=g) < 0.1)
    return mags @ feats + offset


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def one_thread():
    """Identical float results in this process and in subprocesses run with OMP_NUM_THREADS=1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}


# ---------------------------------------------------------------- config, schedule, init
def test_train_config_round_trips_and_validates():
    cfg = TrainConfig("topk", d_sae=64, k=8, decay="cosine", betas=(0.8, 0.99), arch_kwargs={"aux_coeff": 0.1})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(SteerscopeError, match="unknown training config fields: lrr"):
        TrainConfig.from_dict({**d, "lrr": 1.0})
    with pytest.raises(SteerscopeError, match="Did you mean: cosine"):
        TrainConfig("topk", d_sae=64, decay="cosin")
    with pytest.raises(SteerscopeError, match="d_sae must be a positive integer"):
        TrainConfig("topk", d_sae=0)
    with pytest.raises(SteerscopeError, match="not trained by gradient descent.*fit_snmf"):
        train("snmf", sparse_data(), d_sae=8, progress=False)
    with pytest.raises(SteerscopeError, match="unknown architecture 'topkk'"):
        train("topkk", sparse_data(), d_sae=8, progress=False)


def test_lr_schedule_warmup_then_linear_or_cosine_decay():
    cfg = TrainConfig("topk", d_sae=8, lr=1.0, warmup_steps=4, decay="linear", decay_frac=0.5, min_lr_frac=0.1)
    assert [lr_at(cfg, s, 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(cfg, 100, 0.5) == 1.0
    assert lr_at(cfg, 100, 0.75) == pytest.approx(0.55)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    cos = TrainConfig("topk", d_sae=8, lr=2.0, warmup_steps=0, decay="cosine")
    assert [lr_at(cos, 9, f) for f in (0.0, 0.5, 1.0)] == pytest.approx([2.0, 1.0, 0.0])
    assert lr_at(TrainConfig("topk", d_sae=8, lr=2.0, warmup_steps=0, decay="none"), 9, 0.99) == 2.0


def test_geometric_median_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 4, generator=g) * 0.1 + 1.0, torch.full((20, 4), 100.0)])
    torch.testing.assert_close(geometric_median(x), torch.ones(4), atol=0.05, rtol=0)
    assert (x.mean(0) - 1.0).abs().min() > 5  # the mean is dragged away


@pytest.mark.parametrize("how", ["mean", "geometric_median", "zeros"])
def test_b_dec_initialised_from_first_batch(how):
    X = sparse_data(n=256)
    sae = train("topk", X, n_tokens=256, **{**FAST, "batch_size": 256, "lr": 1e-12}, b_dec_init=how)
    expected = {"mean": X.mean(0), "geometric_median": geometric_median(X), "zeros": torch.zeros(16)}[how]
    torch.testing.assert_close(sae.b_dec.detach(), expected, atol=1e-4, rtol=1e-4)


def test_input_scale_is_estimated_and_folded_in():
    """Training on 10*X gives the same dictionary up to the scale: sae10(10 x) == 10 sae(x)."""
    X = sparse_data()
    kw = dict(FAST, n_tokens=2048, batch_size=256)
    sae, sae10 = train("topk", X, **kw), train("topk", 10 * X, **kw)
    s, s10 = sae.cfg.training["input_scale"], sae10.cfg.training["input_scale"]
    assert s == pytest.approx(4.0 / float(X.norm(dim=1).mean()), rel=1e-5)  # sqrt(d_in)=4 over mean ||x||
    assert s10 == pytest.approx(s / 10, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sae10(10 * X).recon, 10 * sae(X).recon, atol=2e-3, rtol=2e-3)
        assert float(fvu(X, sae(X).recon)) < 0.5


# ---------------------------------------------------------------- training, saving, data streams
def test_trains_saves_and_summarises(tmp_path):
    X = sparse_data()
    sae = train("topk", X, n_tokens=8192, out=tmp_path / "sae", **FAST)
    with torch.no_grad():
        assert float(fvu(X, sae(X).recon)) < 0.3
    t = sae.cfg.training
    assert t["n_steps"] == 64 and t["n_tokens_trained"] == 8192 and t["n_skipped_nonfinite"] == 0
    assert t["config"]["architecture"] == "topk" and t["config"]["dead_tokens"] == 2048  # n_tokens // 4
    assert {"l0", "fvu", "dead_frac", "loss"} <= set(t) and t["l0"] <= 4
    assert weights_equal(load_dictionary(tmp_path / "sae"), sae)
    assert load_dictionary(tmp_path / "sae").cfg.training == json.loads(json.dumps(t))
    assert not (tmp_path / "sae" / ckpt.DIRNAME).exists()  # removed once the dictionary is saved


def test_tensor_stream_is_positional_and_covers_each_epoch():
    X = torch.arange(10.0)[:, None]
    src = ckpt.TensorSource(X, None, batch_size=4, seed=3)
    first = [b["x"] for b in src.peek(6)]  # 24 rows: epochs 0, 1 and part of 2
    rows = torch.cat(first)[:, 0]
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:20].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:20])  # reshuffled per epoch
    again = ckpt.TensorSource(X, None, batch_size=4, seed=3)
    for i in range(6):
        assert torch.equal(next(again.batches(i))["x"], first[i])


class FakeStore:
    """The ActivationStore API the trainer uses: batches(site, batch_size, shuffle, seed), d(site), n_tokens."""

    def __init__(self, acts: dict[str, torch.Tensor]):
        self.acts, self.sites = acts, list(acts)
        self.n_tokens = len(next(iter(acts.values())))
        self.manifest = {"model": {"model_name": "fake"}}

    def d(self, site: str) -> int:
        return self.acts[site].shape[1]

    def batches(self, site, batch_size=4096, shuffle=True, seed=0):
        perm = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed))
        for i in range(0, self.n_tokens, batch_size):
            yield self.acts[site][perm[i: i + batch_size]]


def test_store_stream_aligns_sites_and_resumes_at_a_position():
    x = sparse_data(n=300)
    M = torch.randn(16, 8)
    store = FakeStore({"in": x, "out": x @ M})
    src = ckpt.make_source(store, "in", "out", batch_size=64, seed=0)
    batches = list(zip(range(12), src.batches(0), strict=False))  # 5 batches per epoch, into epoch 2
    for _, b in batches:
        torch.testing.assert_close(b["target"], b["x"] @ M)
    for start in (3, 7):
        torch.testing.assert_close(next(src.batches(start))["x"], batches[start][1]["x"])
    assert not torch.equal(batches[0][1]["x"], batches[5][1]["x"])  # epoch 1 reshuffled
    sae = train("relu", store, site="in", target_site="out", d_sae=32, n_tokens=600, batch_size=64, lr=1e-3,
                warmup_steps=0, progress=False)
    assert sae.cfg.site == "in" and sae.cfg.target_site == "out" and sae.cfg.model == "fake" and sae.cfg.d_out == 8


def test_transcoder_pairs_and_one_shot_iterators():
    X = sparse_data(offset=0.0)
    Y = X @ torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) / 4
    tc = train("relu", (X, Y), d_sae=64, n_tokens=8192, batch_size=128, lr=1e-2, warmup_steps=2, progress=False,
               l1_coeff=1e-3)
    with torch.no_grad():
        assert float(fvu(Y, tc(X).recon)) < 0.25
    X = sparse_data()
    gen = (X[i: i + 128] for i in range(0, 2048, 128))  # a one-shot generator: peeked batches are not lost
    sae = train("topk", gen, n_tokens=10**9, **FAST)
    assert sae.cfg.training["n_tokens_trained"] == 2048
    with pytest.raises(SteerscopeError, match="n_tokens is needed"):
        train("topk", iter([X]), **FAST)
    with pytest.raises(SteerscopeError, match="has no option 'l1_coef'"):
        train("relu", X, d_sae=8, l1_coef=1.0, progress=False)


def test_progress_bar_and_wandb_logging(monkeypatch, capsys):
    import types

    logged = []
    fake = types.SimpleNamespace(init=lambda project, config: types.SimpleNamespace(
        log=lambda m, step: logged.append((step, m)), finish=lambda: logged.append("finish")))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train("topk", sparse_data(), n_tokens=2048, **{**FAST, "progress": True}, wandb=True, log_every=4)
    assert [s for s, _ in logged[:-1]] == [4, 8, 12, 16, 16] and logged[-1] == "finish"
    assert {"loss", "l0", "fvu", "dead_frac", "lr"} == set(logged[0][1])
    err = capsys.readouterr().err
    assert "train topk" in err and "l0=" in err and "fvu=" in err


# ---------------------------------------------------------------- NaN/inf, dead latents, extras
def test_nonfinite_batches_are_skipped_counted_and_never_trained_on():
    X = sparse_data(n=128 * 25)
    clean = list(X.split(128))
    bad = clean[:3] + [clean[3].clone().index_fill_(0, torch.tensor([5]), float("nan"))] + clean[3:]
    bad.insert(10, torch.full((128, 16), float("inf")))
    kw = dict(FAST, scale_batches=2, max_nonfinite_frac=0.1, n_tokens=128 * 25)
    ref, got = train("topk", clean, **kw), train("topk", bad, **kw)
    assert got.cfg.training["n_skipped_nonfinite"] == 2 and ref.cfg.training["n_skipped_nonfinite"] == 0
    assert got.cfg.training["n_steps"] == ref.cfg.training["n_steps"] == 25
    assert weights_equal(ref, got)  # exactly as if the bad batches were not there


def test_too_many_nonfinite_batches_raise():
    X = sparse_data(n=128 * 30)
    batches = [b if i % 3 else torch.full_like(b, float("nan")) for i, b in enumerate(X.split(128))]
    with pytest.raises(SteerscopeError, match=r"\d+ of \d+ batches contained NaN/inf"):
        train("topk", batches, **FAST)


def test_dead_tracker_counts_tokens():
    t = ckpt.DeadTracker(3, dead_tokens=100)
    t.update(torch.tensor([True, True, False]), 60)
    assert t.mask().tolist() == [False, False, False]
    t.update(torch.tensor([True, False, False]), 60)
    assert t.mask().tolist() == [False, False, True] and t.since.tolist() == [0, 60, 120]


def test_dead_mask_and_extra_keys_reach_training_loss(monkeypatch):
    seen = []
    orig = TopKSAE.training_loss

    def spy(self, x, target=None, dead=None, **state):
        seen.append((int(dead.sum()), state))
        return orig(self, x, target, dead=dead)

    monkeypatch.setattr(TopKSAE, "training_loss", spy)
    X = sparse_data(n=1024, n_feat=2)  # two directions: most of 64 latents never fire
    grads = torch.randn(1024, 16)
    batches = [{"x": X[i: i + 128], "grad": grads[i: i + 128]} for i in range(0, 1024, 128)]
    sae = train("topk", batches, d_sae=64, k=1, batch_size=128, lr=1e-3, warmup_steps=0, dead_tokens=256, progress=False)
    assert [d for d, _ in seen[:2]] == [0, 0] and seen[2][0] > 32  # dead once 256 tokens passed unfired
    assert sae.cfg.training["dead_frac"] > 0.5
    s = sae.cfg.training["input_scale"]
    torch.testing.assert_close(seen[1][1]["grad"], grads[128:256] / s)  # a gradient w.r.t. x*s


# ---------------------------------------------------------------- checkpoints and resume
RESUME_KW = dict(d_sae=32, k=4, batch_size=64, lr=3e-3, warmup_steps=3, n_tokens=64 * 60, seed=1, progress=False,
                 b_dec_init="geometric_median")


def test_resume_after_sigkill_is_bit_identical(tmp_path, one_thread):
    X = sparse_data(n=1000)  # 60 steps of 64 rows: ~4 shuffled epochs
    save_file({"x": X}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "run"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        from safetensors.torch import load_file
        from saes.topk import TopKSAE
        from saes.train import train
        torch.set_num_threads(1)
        orig = TopKSAE.training_loss
        def slow(self, *a, **k):
            time.sleep(0.03)
            return orig(self, *a, **k)
        TopKSAE.training_loss = slow
        train("topk", load_file(sys.argv[1])["x"], out=sys.argv[2], checkpoint_every=4, **{RESUME_KW!r})
    """))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "x.safetensors"), str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / ckpt.DIRNAME).glob("step-*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert not (out / "weights.safetensors").exists()  # killed mid-run
    step = ckpt.latest(out / ckpt.DIRNAME)[1]["step"]
    assert 0 < step < 60
    resumed = train("topk", X, out=out, checkpoint_every=4, resume=True, **RESUME_KW)
    uninterrupted = train("topk", X, **RESUME_KW)
    assert weights_equal(resumed, uninterrupted)
    assert weights_equal(load_dictionary(out), uninterrupted)
    assert resumed.cfg.training["n_steps"] == 60


class Crash(Exception):
    pass


def test_resume_in_process_and_changed_config(tmp_path, monkeypatch):
    X = sparse_data(n=1000)
    real_write = ckpt.write

    def write_then_crash(directory, step, tensors, meta):
        real_write(directory, step, tensors, meta)
        if step == 12:
            raise Crash

    monkeypatch.setattr(ckpt, "write", write_then_crash)
    with pytest.raises(Crash):
        train("topk", X, out=tmp_path, checkpoint_every=4, **RESUME_KW)
    monkeypatch.setattr(ckpt, "write", real_write)
    with pytest.raises(SteerscopeError, match="unfinished run: pass resume=True"):
        train("topk", X, out=tmp_path, **RESUME_KW)
    with pytest.raises(SteerscopeError, match=r"config changed \(batch_size: 64 -> 32; lr: 0.003 -> 0.001\)"):
        train("topk", X, out=tmp_path, resume=True, **{**RESUME_KW, "lr": 1e-3, "batch_size": 32})
    resumed = train("topk", X, out=tmp_path, resume=True, **RESUME_KW)
    reference = train("topk", X, **RESUME_KW)
    assert weights_equal(resumed, reference)

    def crash_at_the_end(directory, step, tensors, meta):  # the last step's checkpoint, then no final save
        real_write(directory, step, tensors, meta)
        if step == 60:
            raise Crash

    monkeypatch.setattr(ckpt, "write", crash_at_the_end)
    with pytest.raises(Crash):
        train("topk", X, out=tmp_path / "end", checkpoint_every=4, **RESUME_KW)
    monkeypatch.setattr(ckpt, "write", real_write)
    assert weights_equal(train("topk", X, out=tmp_path / "end", resume=True, **RESUME_KW), reference)


# ---------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_matches_single_process(tmp_path, one_thread):
    X = sparse_data(n=1024)
    kw = dict(d_sae=32, k=4, batch_size=128, lr=3e-3, warmup_steps=2, n_tokens=128 * 6, progress=False)
    save_file({"x": X}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file
        from saes.train import train
        torch.set_num_threads(1)
        sae = train("topk", load_file(sys.argv[1])["x"], out=sys.argv[2], **{kw!r})
        assert sae.cfg.training["world_size"] == 2
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "x.safetensors"), str(tmp_path / "ddp")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp, single = load_dictionary(tmp_path / "ddp"), train("topk", X, **kw)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[k], v, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from probe.models import build_model
    from probe.store import ActivationStore
    from probe.zoo.specs import MODEL_SPECS

    cfg = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}
    model = build_model(cfg, ROOT / "probe" / "zoo" / "tokenizer.json")
    tokens = torch.randint(3, cfg["d_vocab"], (16, 33), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    path = tmp_path_factory.mktemp("store")
    return ActivationStore.build(model, tokens, ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"], 512,
                                 path, progress=False)


def test_cli_train_and_snmf(tiny_store, tmp_path):
    import typer
    from typer.testing import CliRunner

    from app.commands_saes import register

    app, runner = typer.Typer(), CliRunner()
    register(app)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"architecture: topk\nstore: {tiny_store.path}\nsite: blocks.0.hook_resid_post\n"
                   "d_sae: 32\nk: 4\nn_tokens: 1024\nbatch_size: 128\nlr: 0.003\nwarmup_steps: 2\n")
    res = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "sae"), "--seed", "3",
                              "--set", "aux_coeff=0.5", "--no-progress"])
    assert res.exit_code == 0, res.output
    sae = load_dictionary(tmp_path / "sae")
    assert sae.cfg.d_in == 64 and sae.cfg.k == 4 and sae.cfg.aux_coeff == 0.5
    assert sae.cfg.training["config"]["seed"] == 3 and sae.cfg.training["n_tokens_trained"] == 1024
    assert json.loads(res.output)["n_steps"] == 8
    bad = runner.invoke(app, ["train", "--config", str(cfg), "--decay", "cosin", "--no-progress"])
    assert bad.exit_code != 0 and isinstance(bad.exception, SteerscopeError)
    res = runner.invoke(app, ["snmf", str(tiny_store.path), "--site", "blocks.0.mlp.hook_post", "--rank", "8",
                              "--max-iter", "5", "--out", str(tmp_path / "snmf"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert load_dictionary(tmp_path / "snmf").cfg.d_sae == 8


def test_training_curve_is_recorded_every_log_step():
    from saes.train import train

    torch.manual_seed(0)
    X = torch.randn(2048, 16)
    sae = train("topk", X, d_sae=32, k=4, n_tokens=2048 * 2, batch_size=256, log_every=2, progress=False)
    hist = sae.cfg.training["history"]
    assert [h["step"] for h in hist] == list(range(2, 17, 2))
    assert all({"loss", "l0", "fvu", "dead_frac", "lr"} <= set(h) for h in hist)
    assert hist[-1]["fvu"] == sae.cfg.training["fvu"]
