"""Apply steering vectors at generation time, with positions that stay right under the KV cache.

Positions are columns of the left-padded batch: the prompt occupies columns ``< prompt_len``
(row r's real tokens start at column ``pad_left[r]``, with BOS), generated tokens sit at
columns ``>= prompt_len``. Modes:

- ``"prompt"``: a [d] vector is added at every real prompt position;
- ``"generated"``: at every generated position (the first new token is sampled from the prompt pass,
  so it is unsteered; the effect starts with the second);
- ``"all"``: both;
- ``"last"``: the last prompt position only (the decision position: an agent's action token is read from it,
  as EAST steers; Rahn et al. 2024). Decode passes add nothing.

A [T, d] ActAdd vector is added at the first T real positions of each row (BOS = position 0) and
nowhere else, whatever the mode ("generated" is refused). Under the KV cache those positions are
only in the prompt pass, so decode passes add nothing; without the cache each full recomputation
adds it at the same positions, and both give the same tokens.

A :class:`~steering.inlp.Projection` (e.g. ``INLP.fit(...).at(site)``) goes in the same list: instead of
adding, it replaces the activation x by ``x @ P`` (``(x - mean) @ P + mean`` when centred) at the positions
the mode selects. Interventions at one site apply in list order.

>>> with steer(model, [v], mode="all"):
...     logits = model(tokens)
>>> texts = generate(model, ["She walked", "Mr. Darcy"], steer=[v], mode="prompt", max_new_tokens=20)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from probe.hooks import hooks
from probe.sites import resolve_one
from probe.tokens import encode_prompts, pad, real_mask
from probe.twin import twin_of
from steering.inlp import INLP, Projection
from steering.vectors import SteeringVector, site_width

Mode = Literal["prompt", "generated", "all", "last"]
MODES = ("prompt", "generated", "all", "last")
MAX_ADDED = 1e8  # largest |coeff x vector| entry: squares of larger ones (LayerNorm variances) near fp32 overflow


@dataclass
class Positions:
    """Where the current forward pass sits; the steering hooks read it on every call.

    ``start`` is the column of the first token of the forward (the KV-cache length); set it before
    each cached forward when you drive the model yourself (``generate`` does it for you).
    """

    start: int = 0  # column of this forward's first token
    prompt_len: int | None = None  # columns of the (left-padded) prompt; None: every position is prompt
    pad_left: Tensor | None = None  # [B] left-padding columns per row; None: no padding


class Generation(NamedTuple):
    """What ``generate_tokens`` returns."""

    tokens: Tensor  # [B, prompt_len + N] left-padded prompts followed by the new tokens
    logits: Tensor  # [B, N, d_vocab] next-token logits that each new token was drawn from
    prompt_len: int  # columns of the padded prompt
    pad_left: Tensor  # [B] left pads per row
    texts: list[str]  # decoded continuations (prompt not repeated, cut at EOS)


def check_vectors(model, vectors, mode: Mode = "all") -> list[SteeringVector | Projection]:
    """Validate vectors and projections against the model (site exists, width matches, mode fits); return them
    (None: none)."""
    if mode not in MODES:
        raise SteerscopeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if vectors is None:
        return []
    vectors = [vectors] if isinstance(vectors, SteeringVector | Projection | INLP) else list(vectors)
    out = []
    for v in vectors:
        if isinstance(v, INLP):
            raise SteerscopeError("an INLP erasure has no site: pass erasure.at(site) in steer=")
        if isinstance(v, Projection):
            out.append(_check_projection(model, v))
            continue
        if not isinstance(v, SteeringVector):
            raise SteerscopeError(f"steer= takes SteeringVector or Projection objects, got {type(v).__name__}")
        site = resolve_one(model, v.site)
        width = site_width(model, site)
        if width is not None and v.d != width:
            raise SteerscopeError(f"{v!r} has dimension {v.d}, but {site} of this model has width {width}")
        if v.positional and mode in ("generated", "last"):
            raise SteerscopeError("an ActAdd [T, d] vector steers the first T prompt positions; use mode='prompt' or 'all'")
        if not bool(torch.isfinite(v.scaled()).all()) or float(v.scaled().abs().max()) > MAX_ADDED:
            raise SteerscopeError(f"{v!r}: coeff x vector reaches {float(v.scaled().abs().max()):.3g}, beyond what the "
                                  f"activations can hold without overflowing (limit {MAX_ADDED:g}); use a smaller coeff")
        if v.positional and v.tensor.shape[0] > model.cfg.n_ctx:
            raise SteerscopeError(f"{v!r} is longer than the model's context ({model.cfg.n_ctx})")
        out.append(v if site == v.site else SteeringVector(site, v.tensor, v.coeff, v.provenance))
    return out


def _check_projection(model, p: Projection) -> Projection:
    site = resolve_one(model, p.site)
    width = site_width(model, site)
    if width is not None and p.d != width:
        raise SteerscopeError(f"{p!r} has width {p.d}, but {site} of this model has width {width}")
    return p if site == p.site else Projection(site, p.P, p.mean, p.provenance)


@contextmanager
def steer(model, vectors, mode: Mode = "prompt", prompt_len: int | None = None,
          pad_left: Tensor | None = None, twin=None) -> Iterator[Positions]:
    """Add each vector's ``coeff * tensor`` (apply each projection) at its site while the body runs; hooks
    always removed.

    Yields the :class:`Positions` the hooks read. Without ``prompt_len`` every position of a
    forward is a prompt position (``"generated"`` then needs ``prompt_len``).
    """
    vectors = check_vectors(model, vectors, mode)
    if mode == "generated" and prompt_len is None:
        raise SteerscopeError("mode='generated' needs prompt_len (the number of prompt columns)")
    pos = Positions(0, prompt_len, None if pad_left is None else pad_left.to(model.cfg.device))
    if prompt_len is not None:
        real_lens = prompt_len - (pos.pad_left if pos.pad_left is not None else torch.zeros(1))
        _check_actadd_fits([v.tensor.shape[0] for v in vectors if v.positional], real_lens)
    pairs = [(v.site, _make_hook(v, mode, pos)) for v in vectors]
    with twin.hooks(pairs) if twin is not None else hooks(model, pairs):  # twin: probe.twin, same hooks
        yield pos


_steer = steer  # ``generate`` takes a ``steer=`` argument that shadows the context manager


def _make_hook(v: SteeringVector | Projection, mode: Mode, pos: Positions):
    """A TL-style hook ``fn(activation, hook)`` adding ``v`` (projecting by ``v``) at the positions ``mode`` selects."""
    if isinstance(v, Projection):
        return _projection_hook(v, mode, pos)
    cache: dict[tuple, Tensor] = {}

    def add_vector(t: Tensor) -> Tensor:
        key = (t.device, t.dtype)
        if key not in cache:
            cache[key] = v.scaled().to(device=t.device, dtype=t.dtype)
        return cache[key]

    def fn(t: Tensor, hook) -> Tensor | None:
        if t.ndim != 3 or t.shape[-1] != v.d:
            raise SteerscopeError(f"{v!r} has dimension {v.d}, but {v.site} gives activations of shape {tuple(t.shape)}")
        if v.positional:
            return _add_positional(t, add_vector(t), pos)
        add = add_vector(t)
        return _edit_flat(t, lambda x: x + add, mode, pos)

    return fn


def _projection_hook(p: Projection, mode: Mode, pos: Positions):
    """A TL-style hook replacing the activation by ``p.apply(activation)`` at the positions ``mode`` selects."""
    cache: dict[torch.device, Projection] = {}

    def fn(t: Tensor, hook) -> Tensor | None:
        if t.ndim != 3 or t.shape[-1] != p.d:
            raise SteerscopeError(f"{p!r} has width {p.d}, but {p.site} gives activations of shape {tuple(t.shape)}")
        if t.device not in cache:
            cache[t.device] = p.to(t.device)
        return _edit_flat(t, cache[t.device].apply, mode, pos)

    return fn


def _edit_flat(t: Tensor, edit, mode: Mode, pos: Positions) -> Tensor | None:
    """``edit(t)`` at the columns ``mode`` selects, ``t`` elsewhere (None: nothing selected in this forward)."""
    n, P = t.shape[1], pos.prompt_len
    if mode == "last":  # prompts are left-padded, so every row's last prompt token is in the same column
        j = (P if P is not None else pos.start + n) - 1 - pos.start
        if not 0 <= j < n:
            return None
        out = t.clone()
        out[:, j : j + 1] = edit(t[:, j : j + 1])
        return out
    if P is None:  # the whole forward is prompt
        in_prompt_only = True
    elif pos.start >= P:  # a decode pass: every column is generated
        return None if mode == "prompt" else edit(t)
    else:
        in_prompt_only = pos.start + n <= P
    if mode == "generated" and in_prompt_only:
        return None
    if pos.pad_left is None and (mode == "all" or in_prompt_only):
        return edit(t)
    cols = torch.arange(pos.start, pos.start + n, device=t.device)
    real = cols[None, :] >= (pos.pad_left[:, None] if pos.pad_left is not None else 0)
    prompt = cols[None, :] < (P if P is not None else pos.start + n)
    keep = {"prompt": real & prompt, "generated": ~prompt, "all": real}[mode]
    return torch.where(keep[..., None], edit(t), t)


def _add_positional(t: Tensor, add: Tensor, pos: Positions) -> Tensor | None:
    """ActAdd: row j of ``add`` [T, d] goes to real position j of each row (BOS = 0)."""
    B, n = t.shape[:2]
    T = add.shape[0]
    if pos.prompt_len is not None and pos.start >= pos.prompt_len:  # a decode pass: nothing to add
        return None
    pad = pos.pad_left if pos.pad_left is not None else torch.zeros(B, dtype=torch.long, device=t.device)
    if pos.start >= T + int(pad.max()):  # past the first T positions of every row
        return None
    if pos.start == 0 and pos.prompt_len is None:
        _check_actadd_fits([T], n - pad)
    j = torch.arange(pos.start, pos.start + n, device=t.device)[None, :] - pad[:, None]  # [B, n]
    valid = (j >= 0) & (j < T)
    return torch.where(valid[..., None], t + add[j.clamp(0, T - 1)], t)


def _check_actadd_fits(lengths: list[int], real_lens: Tensor) -> None:
    """Every ActAdd length T must fit in the shortest prompt (BOS included)."""
    shortest = int(real_lens.min())
    for T in lengths:
        if T > shortest:
            raise SteerscopeError(f"the ActAdd steering prompt has {T} tokens (with BOS), longer than the "
                                  f"prompt it steers ({shortest}); use a longer prompt or a shorter steering prompt")


# --- generation --------------------------------------------------------------------------------

def left_pad(model, prompts, chat: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Tokenize (the model's convention, or its chat template with ``chat``; :mod:`probe.tokens`) and left-pad:
    tokens [B, P], attention mask [B, P], pad_left [B]."""
    tokens, lengths = pad(model, encode_prompts(model, prompts, chat), "left")
    dev = model.cfg.device
    return tokens, real_mask(lengths, tokens.shape[1], "left").to(dev), (tokens.shape[1] - lengths).to(dev)


@torch.no_grad()
def last_token_logits(model, tokens: Tensor, mask: Tensor, pairs=(), twin=None) -> Tensor:
    """Next-token logits [B, V] at the last column of a left-padded batch (``left_pad``), with the ``(site, hook)``
    ``pairs`` attached: on ``twin`` (``probe.twin``) when given, else on the HookedTransformer."""
    if twin is not None:
        with twin.hooks(list(pairs)):
            return twin.forward(tokens, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                                last_only=True)[:, -1]
    with hooks(model, list(pairs)):
        return model(tokens, attention_mask=mask)[:, -1]


def generate(model, prompts: str | Sequence[str], steer: Sequence[SteeringVector | Projection] | None = (),
             mode: Mode = "prompt", max_new_tokens: int = 40, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, do_sample: bool = False, seed: int | None = None,
             use_kv_cache: bool = True, stop_at_eos: bool = True, chat: bool = False) -> str | list[str]:
    """Generate continuations (the prompt is not repeated): a str for a str prompt (or one conversation), else a list.

    ``steer=None`` and ``steer=[]`` both generate unsteered. ``chat=True`` puts each prompt (a user message, or
    a list of ``{"role", "content"}`` messages) through the model's chat template; the templated text is the
    prompt, so mode "prompt" steers all of it and "generated" only the assistant's new tokens."""
    out = generate_tokens(model, prompts, steer, mode, max_new_tokens, temperature, top_k, top_p, do_sample,
                          seed, use_kv_cache, stop_at_eos, chat)
    one = isinstance(prompts, str) or (chat and bool(prompts) and isinstance(prompts[0], dict))
    return out.texts[0] if one else out.texts


@torch.no_grad()
def generate_tokens(model, prompts: str | Sequence[str], steer: Sequence[SteeringVector | Projection] | None = (),
                    mode: Mode = "prompt", max_new_tokens: int = 40, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, do_sample: bool = False,
                    seed: int | None = None, use_kv_cache: bool = True, stop_at_eos: bool = True,
                    chat: bool = False) -> Generation:
    """Batched generation with left padding; returns tokens, per-step logits and texts.

    Greedy unless ``do_sample``; sampling uses ``temperature``, ``top_k``, ``top_p`` and a
    generator seeded with ``seed``. Rows that produced EOS keep emitting EOS.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    tokens, mask, pad_left = left_pad(model, prompts, chat)
    B, P = tokens.shape
    if P + max_new_tokens > model.cfg.n_ctx:
        raise SteerscopeError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds n_ctx={model.cfg.n_ctx}")
    gen = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    sample = _sampler(temperature, top_k, top_p, do_sample, gen)
    twin = twin_of(model, [resolve_one(model, v.site) for v in check_vectors(model, steer, mode)])
    if twin is not None:  # transformers' own modules, the same hooks (probe.twin)
        tokens, logits, new = _twin_loop(model, twin, steer, mode, tokens, mask, pad_left, max_new_tokens, sample,
                                         eos, use_kv_cache)
        return Generation(tokens, logits, P, pad_left, _decode(model, new, eos))
    steps, new = [], []
    with _steer(model, steer, mode, prompt_len=P, pad_left=pad_left) as pos:
        cache = _new_cache(model, B) if use_kv_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        inp, inp_mask = tokens, mask
        for _ in range(max_new_tokens):
            logits = model(inp, attention_mask=inp_mask, past_kv_cache=cache)[:, -1].float()
            if steer and not bool(torch.isfinite(logits).all()):
                raise SteerscopeError("the steered activations overflowed (the logits are not finite); use a smaller coeff")
            nxt = sample(logits)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            steps.append(logits)
            new.append(nxt)
            tokens, mask = torch.cat([tokens, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if eos is not None and bool(done.all()):
                break
            pos.start = tokens.shape[1] - 1 if cache is not None else 0
            inp, inp_mask = (nxt[:, None], mask[:, -1:]) if cache is not None else (tokens, mask)
    new_tokens = torch.stack(new, 1)
    return Generation(tokens, torch.stack(steps, 1), P, pad_left, _decode(model, new_tokens, eos))


def _twin_loop(model, twin, steer, mode, tokens, mask, pad_left, max_new_tokens, sample, eos, use_kv_cache):
    """``generate_tokens``' loop on the twin: full attention mask and explicit positions, as transformers'
    ``generate`` drives the model (left-padded rows count positions from their first real token)."""
    B, P = tokens.shape
    steps, new = [], []
    with _steer(model, steer, mode, prompt_len=P, pad_left=pad_left, twin=twin) as pos:
        cache = twin.new_cache() if use_kv_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        inp = tokens
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = twin.forward(inp, attention_mask=mask, position_ids=positions[:, -inp.shape[1]:], cache=cache,
                                  last_only=True)[:, -1].float()
            if steer and not bool(torch.isfinite(logits).all()):
                raise SteerscopeError("the steered activations overflowed (the logits are not finite); use a smaller coeff")
            nxt = sample(logits)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            steps.append(logits)
            new.append(nxt)
            tokens, mask = torch.cat([tokens, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if eos is not None and bool(done.all()):
                break
            pos.start = tokens.shape[1] - 1 if cache is not None else 0
            inp = nxt[:, None] if cache is not None else tokens
    return tokens, torch.stack(steps, 1), torch.stack(new, 1)


def _new_cache(model, batch: int):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SteerscopeError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature > 0:
        raise SteerscopeError(f"temperature must be > 0, got {temperature!r} (use do_sample=False for greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SteerscopeError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SteerscopeError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _sampler(temperature: float, top_k: int | None, top_p: float | None, do_sample: bool, gen):
    """A function logits [B, V] -> next tokens [B]."""
    if not do_sample:
        return lambda logits: logits.argmax(-1)

    def sample(logits: Tensor) -> Tensor:
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1:
            sorted_logits, idx = logits.sort(-1, descending=True)
            before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass before each token
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, before >= top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]

    return sample


def _decode(model, new_tokens: Tensor, eos: int | None) -> list[str]:
    texts = []
    for row in new_tokens.tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(model.tokenizer.decode(row))
    return texts
