"""Export steering vectors as a llama.cpp control vector (the GGUF layout repeng writes).

Layout: ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the llama.cpp
architecture name, e.g. "llama"), ``controlvector.layer_count`` (number of direction tensors), and
one float32 tensor ``direction.{il}`` of shape [n_embd] per steered layer.

Layer numbering. llama.cpp adds ``direction.{il}`` to the *output* of its 0-indexed block ``il``
(``build_cvec(cur, il)`` after the FFN residual add, tensor "l_out"), for il = 1 .. n_layer-1;
``direction.0`` is rejected by its loader. In TransformerLens names that is

    direction.{il}  ==  blocks.{il}.hook_resid_post  ==  blocks.{il+1}.hook_resid_pre

so our ``blocks.L.hook_resid_pre`` exports as ``direction.{L-1}`` (L >= 2) and
``blocks.L.hook_resid_post`` as ``direction.{L}`` (1 <= L <= n_layers-1). llama.cpp adds the
vector at every position (prompt and generated), so only [d] vectors meant for ``mode="all"``
export; ``coeff`` is baked in (run llama.cpp with strength 1 to reproduce it). The residual basis
must match the target model's (see :mod:`steering.vectors` on TL weight processing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from probe.errors import SteerscopeError
from probe.sites import layer_of
from steering.vectors import SteeringVector


def gguf_layer(site: str, n_layers: int) -> int:
    """The llama.cpp ``direction.{il}`` index for a residual-stream site (see the module docstring)."""
    layer = layer_of(site)
    kind = site.rsplit(".", 1)[-1]
    if layer is None or kind not in ("hook_resid_pre", "hook_resid_post"):
        raise SteerscopeError(f"GGUF control vectors live on the residual stream between blocks; {site!r} is not "
                              "blocks.L.hook_resid_pre or blocks.L.hook_resid_post")
    il = layer - 1 if kind == "hook_resid_pre" else layer
    if not 1 <= il <= n_layers - 1:
        raise SteerscopeError(f"{site} maps to llama.cpp layer {il}, but llama.cpp steers only layers 1 to "
                              f"{n_layers - 1} (outputs of blocks 1..{n_layers - 1}); pick a later site")
    return il


def export_gguf(vectors: list[SteeringVector], path: str | Path, n_layers: int,
                model_hint: str | None = None) -> Path:
    """Write ``vectors`` (summed per layer, ``coeff`` baked in) to a control-vector GGUF at ``path``."""
    import gguf

    vectors = [vectors] if isinstance(vectors, SteeringVector) else list(vectors)
    if not vectors:
        raise SteerscopeError("no steering vectors to export")
    directions: dict[int, torch.Tensor] = {}
    for v in vectors:
        if v.positional:
            raise SteerscopeError(f"{v!r} is positional ([T, d], ActAdd); llama.cpp control vectors are one [d] "
                                  "vector per layer added at every position")
        il = gguf_layer(v.site, n_layers)
        directions[il] = directions.get(il, 0) + v.scaled().cpu()
    dims = {int(d.shape[0]) for d in directions.values()}
    if len(dims) != 1:
        raise SteerscopeError(f"vectors of different widths {sorted(dims)} cannot share one control vector")
    hint = model_hint or str(vectors[0].provenance.get("model") or "unknown")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for il in sorted(directions):
        writer.add_tensor(f"direction.{il}", directions[il].numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def import_gguf(path: str | Path) -> list[SteeringVector]:
    """Read a control-vector GGUF back as [d] vectors at ``blocks.{il}.hook_resid_post`` (coeff 1)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise SteerscopeError(f"{path} is not a readable GGUF file: {e}") from e
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != "controlvector":
        raise SteerscopeError(f"{path} is not a control vector (general.architecture is not 'controlvector')")
    hint_field = reader.get_field("controlvector.model_hint")
    hint = hint_field.contents() if hint_field is not None else None
    out = []
    for t in reader.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit() or int(idx) == 0:
            raise SteerscopeError(f"{path}: unexpected tensor {t.name!r} (want direction.N with N >= 1)")
        data = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        out.append(SteeringVector(f"blocks.{int(idx)}.hook_resid_post", data, 1.0,
                                  {"method": "gguf", "model": hint, "gguf_layer": int(idx)}))
    return sorted(out, key=lambda v: v.provenance["gguf_layer"])
