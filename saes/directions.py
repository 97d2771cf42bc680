"""Feature directions in the residual stream, their logit effects and their nearest neighbours (tables of the
feature store, :mod:`saes.features`).

Logit effects: the decoder row in the residual stream (as is when d_model wide, ``W_dec @ W_out`` for
``mlp.hook_post``, ``W_dec @ W_O`` for ``attn.hook_z``), centred for LayerNorm models, times ln_final's
gain, times ``W_U``. The final norm's division by the residual scale (positive) is ignored.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from probe.sites import layer_of


def residual_directions(dictionary, model) -> tuple[torch.Tensor | None, str, str]:
    """Decoder rows in the residual stream, the site they write to, and how they were mapped."""
    W, site = dictionary.W_dec.detach().float().cpu(), dictionary.cfg.target_site or dictionary.cfg.site or ""
    cfg, layer = model.cfg, layer_of(site)
    block = model.blocks[layer] if layer is not None else None
    if W.shape[1] == cfg.d_model:
        return W, site, "decoder rows (d_model wide) used as residual directions"
    if site.endswith("mlp.hook_post") and isinstance(getattr(block.mlp, "W_out", None), torch.Tensor):
        return W @ block.mlp.W_out.detach().float().cpu(), site, "W_dec @ W_out (MLP neurons -> residual)"
    if site.endswith("attn.hook_z") and W.shape[1] == cfg.n_heads * cfg.d_head:
        return W @ block.attn.W_O.detach().float().cpu().reshape(-1, cfg.d_model), site, "W_dec @ W_O (heads -> residual)"
    return None, site, f"no logit effects: cannot map {site} (width {W.shape[1]}) to the residual stream"


def _per_feature(vals: torch.Tensor, ids: torch.Tensor, id_name: str, value_name: str) -> dict[str, np.ndarray]:
    F, k = vals.shape  # columns feature, rank, ids, values of a per-feature top-k ([F, k] tensors)
    return {"feature": np.repeat(np.arange(F, dtype=np.int32), k), "rank": np.tile(np.arange(k, dtype=np.int16), F),
            id_name: ids.numpy().astype(np.int32).ravel(), value_name: vals.numpy().astype(np.float32).ravel()}


def logit_table(dirs, model, n: int, vocab: pa.Array, chunk: int = 512) -> pa.Table:
    """Top and bottom ``n`` tokens of each residual direction through the unembedding (module docstring)."""
    parts: dict[str, list] = {"top": [], "bottom": []}
    if dirs is not None:
        W_U, ln = model.W_U.detach().float().cpu(), getattr(model, "ln_final", None)
        dirs = dirs - dirs.mean(1, keepdim=True) if model.cfg.normalization_type in ("LN", "LNPre") else dirs
        dirs = dirs * ln.w.detach().float().cpu() if isinstance(getattr(ln, "w", None), torch.Tensor) else dirs
        for c0 in range(0, len(dirs), chunk):
            eff = dirs[c0 : c0 + chunk] @ W_U
            for kind in parts:
                parts[kind].append(eff.topk(min(n, W_U.shape[1]), 1, largest=kind == "top"))
    tables = []
    for kind, got in parts.items():
        t = _per_feature(*(torch.cat(x) for x in zip(*got, strict=True)) if got else (torch.zeros(0, 0),) * 2,
                         "token_id", "value")
        tables.append(pa.table({**t, "kind": pa.array([kind] * len(t["value"]), pa.string()),
                                "token": pa.DictionaryArray.from_arrays(pa.array(t["token_id"]), vocab)}))
    return pa.concat_tables(tables).sort_by([("feature", "ascending"), ("kind", "descending")])


def neighbour_table(W: torch.Tensor, n: int, chunk: int = 1024) -> pa.Table:
    """The ``n`` decoder rows of highest cosine similarity to each row."""
    Wn, k, vals, idx = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12), min(n, len(W) - 1), [], []
    for c0 in range(0, len(W), chunk):
        sim = Wn[c0 : c0 + chunk] @ Wn.T
        sim[torch.arange(len(sim)), torch.arange(c0, c0 + len(sim))] = -math.inf
        v, i = sim.topk(k, 1)
        vals.append(v)
        idx.append(i)
    return pa.table(_per_feature(torch.cat(vals), torch.cat(idx), "neighbour", "cosine"))
