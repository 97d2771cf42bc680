"""load_model: local Hugging Face directories equal HF's own forward; zoo directories load strictly; bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

import probe.models
from probe.errors import SteerscopeError
from probe.models import build_model, load_model, load_zoo_weights, save_zoo_weights

VOCAB = 8192


def _save_tokenizer(path, tokenizer_file) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    ).save_pretrained(path)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # n_ctx: TL reads it; hub GPT-2 configs carry it, a fresh transformers-5 GPT2Config does not.
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, n_ctx=32, vocab_size=VOCAB,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=32, vocab_size=VOCAB,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "make, dirname, with_tokenizer",
    [(_tiny_gpt2, "tiny-gpt2", True), (_tiny_llama, "tiny-llama", True), (_tiny_gpt2, "no-tokenizer", False)],
)
def test_local_hf_dir_matches_hf_logits(tmp_path, tokens, tokenizer_file, make, dirname, with_tokenizer):
    # "tiny-llama" on purpose: TL guesses architectures from "llama" in a name before reading config.json.
    hf = make()
    path = tmp_path / dirname
    hf.save_pretrained(path)
    if with_tokenizer:
        _save_tokenizer(path, tokenizer_file)
    model = load_model(path, device="cpu")
    assert type(model).__name__ == "HookedTransformer" and not model.training
    assert model.cfg.n_layers == 2 and model.cfg.d_vocab == VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-4)
    if with_tokenizer:
        from transformers import AutoTokenizer

        toks = model.to_tokens("Mr. Darcy")  # the directory's tokenizer adds no BOS, so neither do prompts
        assert toks[0].tolist() == AutoTokenizer.from_pretrained(path)("Mr. Darcy")["input_ids"]
        assert toks[0, 0].item() != model.tokenizer.bos_token_id and not model.cfg.default_prepend_bos
        assert model.to_string(toks[0]) == "Mr. Darcy"
    else:
        assert model.tokenizer is None


def test_zoo_dir_round_trip(tmp_path, tokens, tiny_spec, tokenizer_file):
    spec = tiny_spec("austen-dense", seed=1)
    model = build_model(spec, tokenizer_file)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    (tmp_path / "card.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    save_zoo_weights(model, tmp_path / "model.safetensors")  # stored in fp16
    loaded = load_model(tmp_path, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_zoo_weights_are_loaded_strictly(tmp_path, tiny_spec, tokenizer_file):
    model = build_model(tiny_spec("austen-dense"), tokenizer_file)
    save_zoo_weights(model, tmp_path / "w.safetensors")
    wider = build_model(tiny_spec("austen-dense", d_mlp=256), tokenizer_file)
    with pytest.raises(SteerscopeError, match=r"blocks\.0\.mlp\.W_in has shape \(64, 128\), config expects \(64, 256\)"):
        load_zoo_weights(wider, tmp_path / "w.safetensors")
    deeper = build_model(tiny_spec("austen-dense", n_layers=3), tokenizer_file)
    with pytest.raises(SteerscopeError, match=r"weights do not match the config \(missing \['blocks\.2\."):
        load_zoo_weights(deeper, tmp_path / "w.safetensors")


def test_zoo_model_without_weights_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(probe.models, "zoo_path", lambda name: tmp_path)
    with pytest.raises(SteerscopeError, match="has no complete weights yet .*train it with: steerscope zoo train austen-moe"):
        load_model("austen-moe", device="cpu")


@pytest.mark.parametrize("name, close", [("austen-dens", "austen-dense"), ("gtp2", "gpt2"), ("pythia-70", "pythia-70m")])
def test_unknown_model_suggests_close_names(name, close):
    with pytest.raises(SteerscopeError, match=rf"unknown model '{name}'.*Did you mean: .*\b{close}\b") as err:
        load_model(name, device="cpu")
    assert "austen-dense, austen-moe" in str(err.value)


def test_official_name_offline_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    with pytest.raises(SteerscopeError) as err:
        load_model("gpt2", device="cpu")
    msg = str(err.value)
    assert msg.startswith("cannot load 'gpt2': HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache")
    assert "use a zoo model (austen-dense, austen-moe) or a local directory" in msg
    assert "\n" not in msg


def test_dtype_and_device_errors():
    with pytest.raises(SteerscopeError, match="float16 is not supported on CPU.*use float32 or bfloat16"):
        load_model("austen-dense", device="cpu", dtype="fp16")
    with pytest.raises(SteerscopeError, match="float16 is not supported on CPU"):
        load_model("austen-dense", device="cpu", dtype=torch.float16)
    with pytest.raises(SteerscopeError, match=r"unknown dtype 'fp8'; choose one of .*bfloat16.*float32"):
        load_model("austen-dense", device="cpu", dtype="fp8")
    with pytest.raises(SteerscopeError, match="not a floating-point type"):
        load_model("austen-dense", device="cpu", dtype=torch.int64)
    with pytest.raises(SteerscopeError, match=r"unknown device 'tpu9'; use 'cpu' or 'cuda'"):
        load_model("austen-dense", device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(SteerscopeError, match="torch sees no CUDA GPU here; use 'cpu'"):
            load_model("austen-dense", device="cuda")


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(SteerscopeError, match="is a directory but not a model \\(no config.json"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(SteerscopeError, match="cannot load .* as a causal LM: ValueError"):
        load_model(tmp_path, device="cpu")
