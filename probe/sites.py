"""One resolver for "which sites?": names, globs and predicates -> validated TransformerLens hook names.

Every layer of steerscope calls :func:`resolve`; nothing else parses site specs.

>>> resolve(model, "blocks.*.hook_resid_post")          # glob
>>> resolve(model, ["blocks.2.hook_resid_post", "hook_embed"])
>>> resolve(model, lambda name: name.endswith("hook_post"))
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from probe.errors import SteerscopeError, suggest

SiteSpec = str | Iterable[str] | Callable[[str], bool]
_LAYER = re.compile(r"^blocks\.(\d+)\.")
# Where each hook of a TL block fires, in order. ``hook_dict`` lists them in registration order,
# which is not forward order (ln2 before attn, hook_resid_pre after the MLP). A name ending in "."
# covers the hooks under it (in registration order); unknown names go last in their block.
_BLOCK_ORDER = (
    "hook_resid_pre", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "ln1.",
    "attn.hook_attn_input", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "attn.",
    "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "ln2.",
    "mlp.hook_expert_weights", "mlp.hook_expert_indices", "mlp.hook_pre", "mlp.hook_pre_linear",
    "mlp.hook_mid", "mlp.hook_post", "mlp.", "hook_mlp_out", "hook_resid_post",
)


def all_sites(model) -> list[str]:
    """Every hook name of the model, in the order the hooks fire in a forward pass."""
    names = list(model.hook_dict.keys())
    first_block = next((i for i, n in enumerate(names) if layer_of(n) is not None), len(names))
    n_layers = model.cfg.n_layers

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        i, name = item
        layer = layer_of(name)
        if layer is None:  # embeddings come before the blocks, ln_final and unembed after
            return (-1 if i < first_block else n_layers, 0, i)
        rest = name.split(".", 2)[2]
        stage = next((r for r, s in enumerate(_BLOCK_ORDER) if rest == s or (s[-1] == "." and rest.startswith(s))),
                     len(_BLOCK_ORDER))
        return (layer, stage, i)

    return [n for _, n in sorted(enumerate(names), key=key)]


def layer_of(site: str) -> int | None:
    """The block index a site belongs to (``None`` for embeddings and the final norm)."""
    m = _LAYER.match(site)
    return int(m.group(1)) if m else None


def resolve(model, spec: SiteSpec) -> list[str]:
    """Resolve ``spec`` to a non-empty, de-duplicated list of hook names in forward order.

    Raises SteerscopeError naming the problem (unknown name with suggestions, a layer the model
    does not have, a glob or predicate that matches nothing).
    """
    names = all_sites(model)
    known = set(names)
    if callable(spec):
        chosen = {n for n in names if spec(n)}
        if not chosen:
            raise SteerscopeError("the site predicate matched no hook of this model")
    elif isinstance(spec, str | Iterable):
        items = [spec] if isinstance(spec, str) else list(spec)
        if not items:
            raise SteerscopeError("no sites given")
        chosen = set()
        for item in items:
            chosen |= _resolve_one(model, item, names, known)
    else:
        raise SteerscopeError(f"sites must be a name, a glob, a list of them or a predicate; got {type(spec).__name__}")
    return [n for n in names if n in chosen]


def resolve_one(model, spec: str) -> str:
    """Resolve a spec that must name exactly one site."""
    sites = resolve(model, spec)
    if len(sites) != 1:
        raise SteerscopeError(f"{spec!r} matches {len(sites)} sites; give exactly one")
    return sites[0]


def _resolve_one(model, item: str, names: list[str], known: set[str]) -> set[str]:
    if not isinstance(item, str):
        raise SteerscopeError(f"a site must be a string, got {type(item).__name__}")
    if item in known:
        return {item}
    layer, n_layers = layer_of(item), model.cfg.n_layers
    if layer is not None and layer >= n_layers:
        raise SteerscopeError(f"site {item!r}: the model has {n_layers} layers (blocks.0 to blocks.{n_layers - 1})")
    if any(ch in item for ch in "*?["):
        hits = {n for n in names if fnmatch.fnmatchcase(n, item)}
        if not hits:
            raise SteerscopeError(f"site pattern {item!r} matches no hook of this model.{suggest(item, names)}")
        return hits
    raise SteerscopeError(f"unknown site {item!r}.{suggest(item, names)}")
