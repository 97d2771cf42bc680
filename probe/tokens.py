"""The one tokenise/pad path for text a user types: generation, steering, ActAdd, patching, search, the app.

A prompt is tokenized exactly as the model's own tokenizer does it: BOS first only when the model's
convention has one (``model.cfg.default_prepend_bos``, set at load time from the tokenizer; the bundled
Austen models were trained with BOS, SmolLM2's tokenizer adds none). ``first_real(model)`` is the index
of the first token of the user's text (1 after a BOS, else 0).

Packed corpus contexts (activation caching, evaluation, feature stores) always start with one fixed
token that is excluded from training rows and statistics: BOS where the model has that convention,
otherwise the document separator, so every context looks like the start of a new document and the model's
attention sink sits on a token that is never analysed. The separator is ``<|endoftext|>`` where the
vocabulary has it as a special token (GPT-2, Qwen and SmolLM families pretrain with it between documents;
an instruct model's EOS, SmolLM2's ``<|im_end|>``, ends a chat turn instead), else EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from probe.errors import SteerscopeError


def has_bos(model) -> bool:
    """Whether prompts get a BOS first on this model."""
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def first_real(model) -> int:
    """Index of the first token of the user's text in an encoded prompt."""
    return 1 if has_bos(model) else 0


def encode(model, prompt: str, *, truncate: bool = True, allow_whitespace: bool = False) -> Tensor:
    """One prompt as a 1-D LongTensor on the CPU, tokenized by the model's convention; blank prompts are errors
    (``allow_whitespace``: a prompt of only spaces is a real token, as ActAdd's " weddings" - " " needs)."""
    if model.tokenizer is None:
        raise SteerscopeError("this model has no tokenizer; working from text needs one")
    if not isinstance(prompt, str):
        raise SteerscopeError(f"a prompt must be a string, got {type(prompt).__name__}")
    if not prompt or (not prompt.strip() and not allow_whitespace):
        raise SteerscopeError(f"empty prompt {prompt!r}: a prompt needs at least one token, and not only whitespace")
    toks = model.to_tokens(prompt, prepend_bos=has_bos(model), truncate=truncate)[0].cpu()
    if len(toks) <= first_real(model):
        raise SteerscopeError(f"prompt {prompt!r} has no token of its own")
    return toks


def encode_all(model, prompts: str | Sequence[str]) -> list[Tensor]:
    """Each prompt encoded (a single string is one prompt); an empty list is an error."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SteerscopeError("the prompt list is empty: give at least one prompt")
    return [encode(model, p) for p in prompts]


def pad_id(model) -> int:
    """The id padding is filled with (the tokenizer's pad token, else EOS, else 0); never attended to."""
    tok = model.tokenizer
    return next(i for i in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), 0) if i is not None)


def pad(model, seqs: Sequence[Tensor], side: Literal["right", "left"] = "right") -> tuple[Tensor, Tensor]:
    """Stack 1-D token tensors into [B, T] padded on ``side``; returns (tokens, lengths) on the model's device."""
    if not seqs:
        raise SteerscopeError("nothing to pad: no prompts")
    lengths = torch.tensor([len(t) for t in seqs])
    T = int(lengths.max())
    tokens = torch.full((len(seqs), T), pad_id(model), dtype=torch.long)
    for r, t in enumerate(seqs):
        if side == "right":
            tokens[r, : len(t)] = t
        else:
            tokens[r, T - len(t):] = t
    return tokens.to(model.cfg.device), lengths


def real_mask(lengths: Tensor, width: int, side: Literal["right", "left"] = "right") -> Tensor:
    """[B, width] mask (long) of the real tokens of a padded batch."""
    cols = torch.arange(width)[None, :]
    return (cols < lengths[:, None] if side == "right" else cols >= width - lengths[:, None]).long()


def document_separator(tokenizer) -> int | None:
    """``<|endoftext|>`` when the vocabulary has it as a special token, else EOS."""
    special = getattr(tokenizer, "all_special_tokens", None) or []
    added = getattr(tokenizer, "get_added_vocab", lambda: {})()
    if "<|endoftext|>" in special or "<|endoftext|>" in added:
        return int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return getattr(tokenizer, "eos_token_id", None)


def context_start_id(tokenizer, prepend_bos: bool = True) -> int:
    """The fixed first token of packed corpus contexts: BOS when prompts get one, else the document separator;
    a tokenizer with only one of the two uses it."""
    bos, sep = getattr(tokenizer, "bos_token_id", None), document_separator(tokenizer)
    if bos is None and sep is None:
        raise SteerscopeError("the tokenizer has neither a BOS nor an EOS token; pass token ids as a LongTensor")
    if prepend_bos:
        return bos if bos is not None else sep
    return sep if sep is not None else bos


def pack_texts(model, texts: Sequence[str], n_ctx: int) -> Tensor:
    """Texts joined (EOS between documents) and cut into contexts [n, n_ctx] that start with ``context_start_id``."""
    from probe.corpus import pack

    tok = model.tokenizer
    if tok is None:
        raise SteerscopeError("this model has no tokenizer: pass token ids [n_contexts, n_ctx] instead of texts")
    start = context_start_id(tok, has_bos(model))
    sep = getattr(tok, "eos_token_id", None) if has_bos(model) else document_separator(tok)
    return pack(tok, list(texts), n_ctx, bos_id=start, eos_id=start if sep is None else sep)


def chat_text(model, prompt: str | Sequence[dict]) -> str:
    """``prompt`` (a user message, or a list of ``{"role", "content"}`` messages) through the model's chat
    template, ending with the assistant's turn opened (``add_generation_prompt``)."""
    tok = model.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        name = getattr(model.cfg, "model_name", "this model")
        raise SteerscopeError(f"{name} has no chat template; drop --chat/chat=True (plain prompts work on any model)")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise SteerscopeError(f"empty prompt {prompt!r}: a message needs some text")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        bad = [m for m in messages if not isinstance(m, dict) or not isinstance(m.get("role"), str)
               or not isinstance(m.get("content"), str)]
        if not messages or bad:
            raise SteerscopeError("chat messages must be a non-empty list of {'role': str, 'content': str} mappings")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(model, prompt: str | Sequence[dict]) -> Tensor:
    """The chat-formatted prompt as token ids, exactly as ``apply_chat_template(tokenize=True)`` gives them (the
    template writes its own special tokens, so no BOS is added on top)."""
    ids = model.tokenizer(chat_text(model, prompt), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def encode_prompts(model, prompts, chat: bool = False) -> list[Tensor]:
    """Plain prompts (``encode_all``) or, with ``chat``, each prompt or message list through the chat template.
    A list of message mappings is one conversation."""
    if not chat:
        return encode_all(model, prompts)
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SteerscopeError("the prompt list is empty: give at least one prompt")
    return [encode_chat(model, p) for p in prompts]
