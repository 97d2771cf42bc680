"""Hook lifetimes as context managers: every hook added here is removed on exit, also on exceptions.

>>> with capture(model, ["blocks.1.hook_resid_post"]) as acts:
...     model(tokens)
>>> acts["blocks.1.hook_resid_post"].shape
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from probe.sites import SiteSpec, resolve, resolve_one

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]


def count_hooks(model) -> int:
    """Number of forward + backward hooks currently attached to the model's hook points."""
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


@contextmanager
def hooks(model, fwd: Sequence[tuple[str, HookFn]] = (), bwd: Sequence[tuple[str, HookFn]] = ()) -> Iterator[None]:
    """Attach forward/backward hooks (names already resolved); always detach them.

    Torch sets backward hooks up during the forward pass: run both the forward and the backward
    inside the context for ``bwd`` hooks to fire.
    """
    handles = []
    try:
        for name, fn in fwd:
            handles.append(_hook_point(model, name).register_forward_hook(_adapt(fn)))
        for name, fn in bwd:
            handles.append(_hook_point(model, name).register_full_backward_hook(_adapt_bwd(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model, sites: SiteSpec, detach: bool = True, to: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each resolved site during the body's forward passes.

    The dict maps site -> the tensor of the most recent forward pass (batch-first, as TL gives it).
    """
    names = resolve(model, sites)
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> HookFn:
        def fn(t: torch.Tensor, hook) -> None:
            t = t.detach() if detach else t
            store[name] = t.to(to) if to else t
        return fn

    with hooks(model, [(n, make(n)) for n in names]):
        yield store


def _hook_point(model, name: str):
    """The hook point ``name``; a name that is not exact goes through resolve_one (its errors suggest names)."""
    return model.hook_dict[name] if name in model.hook_dict else model.hook_dict[resolve_one(model, name)]


def _adapt(fn: HookFn):
    """TransformerLens-style ``fn(tensor, hook)`` -> torch forward hook ``(module, inp, out)``."""
    def forward_hook(module, inputs, output):
        res = fn(output, module)
        return output if res is None else res
    return forward_hook


def _adapt_bwd(fn: HookFn):
    def backward_hook(module, grad_input, grad_output):
        res = fn(grad_output[0], module)
        return None if res is None else (res,)
    return backward_hook
