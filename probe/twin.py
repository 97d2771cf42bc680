"""The hot paths on a Hugging Face twin: caching activations and generating run transformers' own modules,
with hooks under TransformerLens names, whenever a model has a twin and every site asked for is mapped.

Why: on SmolLM2-135M (2 CPU threads) a HookedTransformer forward runs at about 0.65x transformers' own
(``bench/real_model.py``), and generation pays TL's per-hook Python overhead on every token. The twin is
the same weights in transformers' ``LlamaForCausalLM``; ``probe.tokens`` and the steering hooks are shared,
so only the forward differs. ``tests/probe/test_twin.py`` checks every mapped site, the logits and
generated tokens (steered and unsteered, every mode) against the HookedTransformer path.

Mapped sites (Llama family), per layer L: ``hook_resid_pre`` (the decoder layer's input), ``hook_resid_post``
(its output), ``hook_attn_out`` (``self_attn``'s output), ``hook_resid_mid`` (``post_attention_layernorm``'s
input), ``ln2.hook_normalized`` (that input divided by its RMS, before the gain: what a transcoder reads),
``hook_mlp_out`` (``mlp``'s output), ``mlp.hook_post`` (``mlp.down_proj``'s input). Any other site,
a model without a twin, a model with a hook of its own active (e.g. inside ``probe.hooks.hooks`` or
``model.hooks``), or ``STEERSCOPE_TWIN=0`` uses the HookedTransformer, unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

ARCHITECTURES = ("LlamaForCausalLM",)
_SITE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_resid_mid|hook_mlp_out|"
                   r"mlp\.hook_post|ln2\.hook_normalized)$")
HookFn = Callable[[Tensor, Any], Tensor | None]  # TL-style: fn(activation, hook) -> replacement or None


class _Stop(Exception):
    """Raised by the hook of the deepest site a caller needs: the rest of the forward is skipped."""


class Twin:
    """A transformers causal LM standing in for a HookedTransformer on the hot paths."""

    def __init__(self, hf):
        self.hf = hf.eval()
        self.layers = hf.model.layers

    def last(self, sites: Sequence[str]) -> str:
        """The site a forward reaches last (stopping right after it still fills every site)."""
        order = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out",
                 "hook_resid_post")
        return max(sites, key=lambda s: (int(_SITE.match(s).group(1)), order.index(_SITE.match(s).group(2))))

    def supports(self, sites: Sequence[str]) -> bool:
        return all(_SITE.match(s) and int(_SITE.match(s).group(1)) < len(self.layers) for s in sites)

    def _target(self, site: str) -> tuple[torch.nn.Module, bool | str]:
        """(module, where): the activation is the module's first input (True), its output (False), or (``"norm"``)
        the RMS-normalised input before the module's gain (TL's RMSNorm ``hook_normalized``)."""
        m = _SITE.match(site)
        if m is None:
            raise KeyError(site)
        layer, name = self.layers[int(m.group(1))], m.group(2)
        return {"hook_resid_pre": (layer, True), "hook_resid_post": (layer, False),
                "hook_attn_out": (layer.self_attn, False), "hook_resid_mid": (layer.post_attention_layernorm, True),
                "ln2.hook_normalized": (layer.post_attention_layernorm, "norm"),
                "hook_mlp_out": (layer.mlp, False), "mlp.hook_post": (layer.mlp.down_proj, True)}[name]

    @contextlib.contextmanager
    def hooks(self, pairs: Sequence[tuple[str, HookFn]], stop_after: str | None = None) -> Iterator[None]:
        """Run ``fn(activation, None)`` at each site (a returned tensor replaces the activation); with
        ``stop_after`` the forward ends right after that site (``forward`` then returns None)."""
        handles = []
        try:
            for site, fn in pairs:
                module, where = self._target(site)
                handles.append(module.register_forward_hook(_norm(fn)) if where == "norm"
                               else module.register_forward_pre_hook(_pre(fn), with_kwargs=True) if where
                               else module.register_forward_hook(_post(fn)))
            if stop_after is not None:
                module, where = self._target(stop_after)
                handles.append(module.register_forward_pre_hook(_raise, with_kwargs=True) if where is True
                               else module.register_forward_hook(_raise_post))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def capture(self, sites: Sequence[str]) -> Iterator[dict[str, Tensor]]:
        """``{site: activation}`` filled by the forwards inside the block (the last forward wins)."""
        acts: dict[str, Tensor] = {}

        def keep(site):
            def fn(t, hook):
                acts[site] = t.detach()
            return fn

        with self.hooks([(s, keep(s)) for s in sites]):
            yield acts

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Any = None, last_only: bool = False, stop_after: str | None = None) -> Tensor | None:
        """Logits [B, T, V] (or [B, 1, V] with ``last_only``); None when stopped early by ``stop_after``."""
        kw = dict(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                  use_cache=cache is not None, logits_to_keep=1 if last_only else 0)
        if stop_after is None:
            return self.hf(**kw).logits
        with self.hooks([], stop_after=stop_after), contextlib.suppress(_Stop):
            self.hf.model(**{k: v for k, v in kw.items() if k != "logits_to_keep"})
        return None

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)


def _pre(fn: HookFn):
    def hook(module, args, kwargs):
        if args:
            out = fn(args[0], None)
            return None if out is None else ((out, *args[1:]), kwargs)
        out = fn(kwargs["hidden_states"], None)
        return None if out is None else (args, {**kwargs, "hidden_states": out})
    return hook


def _post(fn: HookFn):
    def hook(module, args, output):
        t = output[0] if isinstance(output, tuple) else output
        out = fn(t, None)
        if out is None:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out
    return hook


def _norm(fn: HookFn):
    """On an RMSNorm: fn sees x / rms(x) (before the gain, as TL's hook_normalized); a returned tensor r makes
    the module's output gain * r."""
    def hook(module, args, output):
        x = args[0]
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        out = fn(normed, None)
        return None if out is None else module.weight * out.to(x.dtype)
    return hook


def _raise(module, args, kwargs):
    raise _Stop


def _raise_post(module, args, output):
    raise _Stop


def enabled() -> bool:
    return os.environ.get("STEERSCOPE_TWIN", "1") != "0"


def twin_of(model, sites: Sequence[str] = ()) -> Twin | None:
    """The model's twin when it has one, it is enabled, and it maps every site in ``sites``; else None."""
    twin = getattr(model, "_steerscope_twin", None)
    if twin is None or not enabled() or _has_tl_hooks(model):
        return None  # a hook someone put on the HookedTransformer must run: stay on it
    if not isinstance(twin, Twin):
        twin = model._steerscope_twin = twin()  # built once (None: this architecture has no twin)
        if twin is None:
            return None
    if next(twin.hf.parameters()).device != torch.device(model.cfg.device):
        twin.hf.to(model.cfg.device)
    return twin if twin.supports(sites) else None


def _has_tl_hooks(model) -> bool:
    return any(hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks
               for hp in getattr(model, "hook_dict", {}).values())


def attach(model, loader: Callable[[], Any]) -> None:
    """Give ``model`` a twin, built by ``loader()`` (returning a transformers model) the first time it is used."""
    def build() -> Twin | None:
        hf = loader()
        if type(hf).__name__ not in ARCHITECTURES:
            return None
        return Twin(hf.to(model.cfg.device, model.cfg.dtype))

    model._steerscope_twin = build
