"""The one tokenise/pad path: prompts follow the model's own convention (BOS on the Austen models, none on
a GGUF Llama whose tokenizer adds none), padding on either side, and the fixed first token of packed
corpus contexts."""

from __future__ import annotations

import pytest
import torch

from probe.errors import SteerscopeError
from probe.models import load_model
from probe.tokens import context_start_id, encode, encode_all, first_real, has_bos, pack_texts, pad, pad_id, real_mask
from tests.probe.tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_llama(path, n_layers=1)
    return load_model(path, device="cpu")


def test_prompts_follow_each_models_convention(tiny_dense, llama):
    from transformers import AutoTokenizer

    assert has_bos(tiny_dense) and first_real(tiny_dense) == 1
    ids = encode(tiny_dense, "Mr. Darcy")
    assert ids[0].item() == tiny_dense.tokenizer.bos_token_id
    assert ids[1:].tolist() == tiny_dense.tokenizer("Mr. Darcy", add_special_tokens=False)["input_ids"]
    assert not has_bos(llama) and first_real(llama) == 0
    own = AutoTokenizer.from_pretrained(llama.tokenizer.name_or_path)
    for text in ("Mr. Darcy", " leading space", "a\nb"):
        assert encode(llama, text).tolist() == own(text)["input_ids"]


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_blank_prompts_are_refused(tiny_dense, llama, bad):
    for m in (tiny_dense, llama):
        with pytest.raises(SteerscopeError, match="empty prompt"):
            encode(m, bad)
    with pytest.raises(SteerscopeError, match="prompt list is empty"):
        encode_all(llama, [])
    with pytest.raises(SteerscopeError, match="must be a string"):
        encode(llama, 3)


def test_padding_on_both_sides_keeps_every_real_token(llama):
    seqs = encode_all(llama, ["a", "Mr. Darcy said nothing", "She walked"])
    for side in ("right", "left"):
        tokens, lengths = pad(llama, seqs, side)
        mask = real_mask(lengths, tokens.shape[1], side).bool()
        assert tokens.shape == (3, max(len(s) for s in seqs))
        for r, s in enumerate(seqs):
            assert tokens[r][mask[r]].tolist() == s.tolist()
            assert (tokens[r][~mask[r]] == pad_id(llama)).all()
        if side == "left":
            assert mask[:, -1].all()
        else:
            assert mask[:, 0].all()


def test_padded_rows_compute_what_the_prompt_alone_computes(llama):
    seqs = encode_all(llama, ["Mr. Darcy said nothing", "She"])
    tokens, lengths = pad(llama, seqs, "right")
    with torch.no_grad():
        batch = llama(tokens)
        alone = llama(seqs[1][None])
    torch.testing.assert_close(batch[1, : lengths[1]], alone[0], atol=1e-5, rtol=0)


def test_packed_contexts_start_with_bos_or_the_document_separator(tiny_dense, llama):
    assert context_start_id(tiny_dense.tokenizer, True) == tiny_dense.tokenizer.bos_token_id
    eos = llama.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # the pretraining separator, not <|im_end|>
    assert llama.tokenizer.eos_token == "<|im_end|>" and llama.tokenizer.eos_token_id != eos
    assert context_start_id(llama.tokenizer, False) == eos != llama.tokenizer.bos_token_id
    texts = ["It is a truth universally acknowledged, that a single man. " * 6] * 3
    rows = pack_texts(llama, texts, 16)
    assert (rows[:, 0] == eos).all() and rows.shape[1] == 16
    rows = pack_texts(tiny_dense, texts, 16)
    assert (rows[:, 0] == tiny_dense.tokenizer.bos_token_id).all()


def test_a_store_on_a_bos_less_model_excludes_its_fixed_first_token(llama, tmp_path):
    from probe.store import ActivationStore

    texts = ["It is a truth universally acknowledged, that a single man in possession. " * 8] * 4
    st = ActivationStore.build(llama, texts, "blocks.0.hook_resid_post", 60, tmp_path / "acts", n_ctx=16,
                               progress=False)
    assert (st.tokens[:, 0] == llama.tokenizer.convert_tokens_to_ids("<|endoftext|>")).all()
    assert not (st.tokens == llama.tokenizer.eos_token_id).any()  # no chat-turn end inside plain text
    _, pos = st.locate(torch.arange(len(st)))
    assert len(st) == 60 and int(pos.min()) >= 1  # the fixed first token is never a training row


def test_actadd_takes_the_papers_space_prompt_on_either_convention(tiny_dense, llama):
    from steering import SteeringVector

    with pytest.raises(SteerscopeError, match="empty prompt"):
        encode(llama, " ")
    assert encode(llama, " ", allow_whitespace=True).tolist() == llama.tokenizer(" ")["input_ids"]
    with pytest.raises(SteerscopeError, match="empty prompt"):
        encode(llama, "", allow_whitespace=True)
    v = SteeringVector.actadd(llama, " weddings", " ", layer=0)
    assert v.tensor.shape[0] == len(encode(llama, " weddings")) and v.tensor[0].norm() > 0  # no BOS row
    w = SteeringVector.actadd(tiny_dense, " weddings", " ", layer=0)
    assert w.tensor.shape[0] == len(encode(tiny_dense, " weddings")) and w.tensor[0].abs().max() == 0  # BOS row


def test_the_models_tokenizer_object_is_its_own(llama):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(llama.tokenizer.name_or_path)
    for text in ("hi", " ", "Mr. Darcy"):
        assert llama.tokenizer(text)["input_ids"] == own(text)["input_ids"] == llama.to_tokens(text)[0].tolist()
