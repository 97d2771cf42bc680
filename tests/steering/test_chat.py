"""Chat prompts on a model with a chat template (a tiny GGUF Llama written in the test): the template's
tokens exactly, no BOS added on top, and steering modes counting positions over the templated prompt."""

from __future__ import annotations

import pytest
import torch

from probe.errors import SteerscopeError
from probe.models import load_model
from probe.tokens import chat_text, encode_chat, encode_prompts
from steering import SteeringVector, generate
from steering.apply import generate_tokens
from tests.probe.tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny.gguf"
    write_tiny_llama(path, n_layers=2)
    return load_model(path, device="cpu")


def test_chat_tokens_are_the_templates_own(llama):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Mr. Darcy?"}]
    ids = encode_chat(llama, msgs).tolist()
    ref = llama.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ids == list(ref)
    assert ids[0] == llama.tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3
    assert chat_text(llama, "hi").endswith("<|im_start|>assistant\n")
    assert encode_prompts(llama, "hi", chat=True)[0].tolist() == encode_chat(llama, [{"role": "user", "content": "hi"}]).tolist()


def test_chat_generation_and_modes_count_positions_over_the_templated_prompt(llama):
    v = SteeringVector.from_direction(torch.randn(64, generator=torch.Generator().manual_seed(0)),
                                      "blocks.0.hook_resid_post", coeff=20.0)
    kw = dict(max_new_tokens=6, chat=True, stop_at_eos=False)
    base = generate_tokens(llama, ["Who is Mr. Darcy?", "Hi"], **kw)
    gen = generate_tokens(llama, ["Who is Mr. Darcy?", "Hi"], steer=[v], mode="generated", **kw)
    prm = generate_tokens(llama, ["Who is Mr. Darcy?", "Hi"], steer=[v], mode="prompt", **kw)
    # "generated": the prompt (the whole template) is untouched, so the first step's logits are the baseline's
    torch.testing.assert_close(gen.logits[:, 0], base.logits[:, 0], atol=1e-5, rtol=0)
    assert not torch.allclose(gen.logits[:, 1], base.logits[:, 1], atol=1e-3)
    assert not torch.allclose(prm.logits[:, 0], base.logits[:, 0], atol=1e-3)  # "prompt": the template is steered
    assert gen.prompt_len == base.prompt_len == max(len(t) for t in encode_prompts(llama, ["Who is Mr. Darcy?", "Hi"], True))
    one = generate(llama, [{"role": "user", "content": "Hi"}], max_new_tokens=3, chat=True)
    assert isinstance(one, str)


def test_chat_errors_are_one_line(llama, tiny_dense):
    with pytest.raises(SteerscopeError, match="has no chat template"):
        encode_chat(tiny_dense, "hi")
    with pytest.raises(SteerscopeError, match="role"):
        encode_chat(llama, [{"content": "no role"}])
    with pytest.raises(SteerscopeError, match="empty prompt"):
        encode_chat(llama, "  ")
