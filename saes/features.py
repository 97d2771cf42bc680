"""The feature store: per-feature statistics, examples, logit effects and neighbours as Parquet tables.

>>> build_feature_store("runs/sae", "austen-dense", "austen", "runs/features", n_tokens=200_000)

One streaming pass over the corpus (or over an ``ActivationStore`` holding the dictionary's input site)
keeps, in memory bounded by the number of features: counts, sums and maxima; each feature's top
``n_examples`` tokens with its activations over a token window; and a histogram of its nonzero
activations over [0, 2^e) in ``n_bins`` bins, with a uniform sample of tokens per bin (smallest random
keys). When an activation passes 2^e, e grows and bins merge in pairs: counts stay exact, and the
smallest keys of a union of samples sample the union uniformly. The occupied bins then form
``n_intervals`` groups of (nearly) equal width, SAEDashboard's intervals with edges on the bin grid.

Tables (Parquet, sorted by feature; small row groups, so one feature's query reads little): features,
examples (kind "top" | "interval-i", with token windows), logits (top/bottom tokens), neighbours
(decoder cosine), vocab; then meta.json (config, fingerprint, model, eval.json/history.json, speed, and each
table's size and sha256, checked when the store opens).

A store always knows its dictionary's directory (``meta["dictionary_path"]``): the one given, the one
the object was loaded from or saved to (if its weights still match), or, for a dictionary that was
never saved, ``<store>/dictionary``. The path is relative to the store when both sit in one run
directory (so the run directory can move), with the absolute path beside it (``dictionary_path_abs``).

Logit effects: the decoder row in the residual stream (as is when d_model wide, ``W_dec @ W_out`` for
``mlp.hook_post``, ``W_dec @ W_O`` for ``attn.hook_z``), centred for LayerNorm models, times ln_final's
gain, times ``W_U``. The final norm's division by the residual scale (positive) is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from probe.errors import SteerscopeError
from probe.hooks import capture
from probe.locks import dir_lock
from probe.sites import layer_of, resolve_one
from probe.store_files import file_entry
from saes.base import Dictionary, fingerprint, load_dictionary
from saes.directions import logit_table, neighbour_table, residual_directions
from saes.provenance import dictionary_dir, path_fields, read_beside, refresh

FORMAT, VERSION = "steerscope-features", 1


dictionary_fingerprint = fingerprint  # the name this module has always exported


class _Bottom:
    """Per slot, the ``size`` entries with the smallest keys offered so far (ascending), with payloads."""

    def __init__(self, n: int, size: int, width: int):
        self.key = torch.full((n, size), math.inf)
        self.pay = {"row": torch.full((n, size), -1), "act": torch.zeros(n, size),
                    "win": torch.zeros(n, size, width, dtype=torch.float16)}

    def offer(self, slot, key, row, act, window) -> None:
        """Merge candidates that beat their slot's worst; ``window(i)`` gives windows of candidates ``i``."""
        i = (key < self.key[slot, -1]).nonzero().flatten()
        if len(i):
            self.merge(slot[i], key[i], {"row": row[i], "act": act[i], "win": window(i).half()})

    def merge(self, slot, key, pay: dict) -> None:
        uniq, inv = torch.unique(slot, return_inverse=True)
        size = self.key.shape[1]
        group = torch.cat([torch.arange(len(uniq)).repeat_interleave(size), inv])
        keys = torch.cat([self.key[uniq].flatten(), key])
        order = keys.sort(stable=True).indices
        order = order[group[order].sort(stable=True).indices]  # by group, then key
        counts = torch.bincount(group, minlength=len(uniq))
        rank = torch.arange(len(group)) - (counts.cumsum(0) - counts)[group[order]]
        keep = rank < size
        dst, rk, src = uniq[group[order][keep]], rank[keep], order[keep]
        self.key[dst, rk] = keys[src]
        for name, t in self.pay.items():
            t[dst, rk] = torch.cat([t[uniq].flatten(0, 1), pay[name]])[src]

    def move(self, src, dst, into: _Bottom, clear: bool = False) -> None:
        """Merge the entries of slots ``src`` into slots ``dst`` of ``into`` (``clear``: empty ``src`` first)."""
        key, pay = self.key[src], {name: t[src] for name, t in self.pay.items()}
        if clear:
            self.key[src], self.pay["row"][src] = math.inf, -1
        live = torch.isfinite(key)
        if live.any():
            into.merge(dst[:, None].expand_as(key)[live], key[live], {n: t[live] for n, t in pay.items()})

class _Intervals:
    """Doubling histograms of nonzero activations with a uniform sample per bin (module docstring)."""

    def __init__(self, d_sae: int, bins: int, per_bin: int, width: int, seed: int):
        self.bins, self.exp = bins, torch.full((d_sae,), -(2**40))  # 2^exp bounds the activations seen so far
        self.counts = torch.zeros(d_sae, bins, dtype=torch.long)
        self.sample = _Bottom(d_sae * bins, per_bin, width)
        self.gen = torch.Generator().manual_seed(seed)

    def observe(self, f, a, row, window) -> None:
        top = torch.zeros(len(self.exp)).scatter_reduce_(0, f, a, "amax")
        feats = (top > 0).nonzero().flatten()
        need = torch.ceil(torch.log2(top[feats])).long()
        grow = need > self.exp[feats]
        if grow.any():  # (a feature's first activations "grow" it from nothing: empty bins merge)
            self._rescale(feats[grow], need[grow] - self.exp[feats[grow]])
            self.exp[feats[grow]] = need[grow]
        b = (a / torch.exp2(self.exp[f].float()) * self.bins).long().clamp_(0, self.bins - 1)
        slot = f * self.bins + b
        self.counts.view(-1).index_add_(0, slot, torch.ones_like(slot))
        self.sample.offer(slot, torch.rand(len(a), generator=self.gen), row, a, window)

    def _rescale(self, feats, shift) -> None:
        bins = self.bins
        idx = torch.arange(bins)[None] >> shift[:, None].clamp(max=62)
        self.counts[feats] = torch.zeros(len(feats), bins, dtype=torch.long).scatter_add_(1, idx, self.counts[feats])
        slots = feats[:, None] * bins
        self.sample.move((slots + torch.arange(bins)).flatten(), (slots + idx).flatten(), self.sample, clear=True)

    def width(self) -> torch.Tensor:
        """Bin width per feature."""
        return torch.exp2(self.exp.clamp(min=-126).float()) / self.bins

    def groups(self, max_act: torch.Tensor, n: int, per: int) -> tuple[_Bottom, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` equal-width groups of the ``m`` occupied bins (bin b -> group b n // m): samples [F * n slots],
        lo, hi, fraction of tokens [F, n]. Group g holds bins [ceil(g m / n), ceil((g + 1) m / n))."""
        F, w, b = len(max_act), self.width(), torch.arange(self.bins)
        m = torch.ceil(max_act / w).clamp(1, self.bins).long()[:, None]
        ok = b[None] < m
        out = _Bottom(F * n, per, self.sample.pay["win"].shape[-1])
        self.sample.move(ok.flatten().nonzero().flatten(), (torch.arange(F)[:, None] * n + b * n // m)[ok], out)
        edges = (torch.arange(n + 1) * m + n - 1) // n  # [F, n + 1] bin edges of the groups
        cum = torch.cat([torch.zeros(F, 1, dtype=torch.long), self.counts.cumsum(1)], 1)
        frac = (cum.gather(1, edges[:, 1:]) - cum.gather(1, edges[:, :-1])) / cum[:, -1:].clamp(min=1)
        return out, edges[:, :-1] * w[:, None], edges[:, 1:] * w[:, None], frac


def _contexts(model, data, n_ctx: int | None) -> torch.Tensor:
    """Token ids [n, T] starting with BOS: a tensor as is; texts or a corpus spec packed into contexts."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.is_floating_point() or data.shape[1] < 2:
            raise SteerscopeError(f"token ids must be an integer tensor [n_contexts, n_ctx >= 2], got {tuple(data.shape)}")
        return data.long().cpu()
    from probe.corpus import load_corpus
    from probe.tokens import pack_texts
    if model.tokenizer is None:
        raise SteerscopeError("this model has no tokenizer: pass token ids [n_contexts, n_ctx] or an ActivationStore")
    texts = load_corpus(data, "train") if isinstance(data, str) else list(data)
    return pack_texts(model, texts, n_ctx or min(model.cfg.n_ctx, 128))


def _source(model, data, site: str, n_tokens: int | None, n_ctx: int | None, batch_contexts: int):
    """(tokens [C, T], rows, label, rows per context, batches of (x [n, d], ids ctx * T + pos [n])).
    Batches start at a context; BOS is never a row unless the store includes it."""
    store = data if hasattr(data, "batches") and hasattr(data, "manifest") else None
    if store is not None and site in store.sites:  # read the rows, no model run
        tokens, off, label, total = store.tokens, 0 if store.manifest["include_bos"] else 1, f"store:{store.path}", \
            min(n_tokens or store.n_tokens, store.n_tokens)
    else:
        tokens, off, label = _contexts(model, data if store is None else store.tokens, n_ctx), 1, "tokens"
        tokens = tokens[: math.ceil((n_tokens or tokens.numel()) / (tokens.shape[1] - 1))]
        total = min(n_tokens or tokens.numel(), tokens[:, 1:].numel())
    T, per, stop = tokens.shape[1], tokens.shape[1] - off, (None if layer_of(site) is None else layer_of(site) + 1)

    def run():  # activations at the site, BOS dropped: [b * (T - 1), d]
        for c0 in range(0, len(tokens), batch_contexts):
            batch = tokens[c0 : c0 + batch_contexts].to(model.cfg.device)
            with torch.no_grad(), capture(model, [site]) as acts:
                model(batch, return_type=None) if stop is None else model(batch, stop_at_layer=stop)
            yield acts[site][:, 1:].reshape(len(batch) * (T - 1), -1)

    def gen():
        start = 0
        for x in store.batches(site, per * batch_contexts, shuffle=False) if label != "tokens" else run():
            r, n = torch.arange(start, start + len(x)), min(len(x), total - start)
            yield x[:n], ((r // per) * T + r % per + off)[:n]
            start += len(x)
            if start >= total:
                return

    return tokens, total, label, per, gen()


def _windows(codes, r, f, per: int, left: int, right: int):
    """A function: indices i of nonzero entries (r, f) -> the feature's acts over token windows [len(i), W].
    Batches hold whole contexts of ``per`` rows, so row r + o is o tokens away if in the same context."""
    o = torch.arange(-left, right + 1)

    def window(i):
        rows, p = r[i][:, None] + o, r[i][:, None] % per + o
        ok = (p >= 0) & (p < per) & (rows < len(codes))
        return torch.where(ok, codes[rows.clamp(0, len(codes) - 1), f[i][:, None].expand_as(rows)], 0.0)
    return window


def build_feature_store(dictionary: Dictionary | str | Path, model, tokens_or_store, out_dir: str | Path, *,
                        n_tokens: int | None = None, n_examples: int = 20, n_intervals: int = 10,
                        per_interval: int = 5, n_bins: int = 40, window: tuple[int, int] = (8, 3),
                        n_logits: int = 10, n_neighbours: int = 10, n_ctx: int | None = None,
                        batch_contexts: int = 8, model_ref: str | None = None, device: str | None = None,
                        seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build the feature store of ``dictionary`` in ``out_dir``; returns its meta (also in meta.json).

    ``dictionary``: a Dictionary or its directory; ``model``: a HookedTransformer or a ``load_model``
    name; ``tokens_or_store``: ids [n, T] starting with BOS, texts, a corpus spec, or an ActivationStore
    (read directly when it holds the input site). ``window``: tokens kept (left, right) of each example.
    ``model_ref``: what the app passes to ``load_model``. A finished store of the same dictionary and
    settings in ``out_dir`` is reused; any other store there needs ``overwrite``.
    """
    from probe.models import load_model, resolve_device

    dict_path, device = (Path(dictionary).resolve() if isinstance(dictionary, str | Path) else None), resolve_device(device)
    dictionary = load_dictionary(dict_path, device=device) if dict_path is not None else dictionary
    if isinstance(model, str | Path):
        model_ref, model = model_ref or str(model), load_model(model, device=device)
    if n_tokens is not None and n_tokens < 1:
        raise SteerscopeError(f"n_tokens must be a positive number of tokens to scan (or None: all), got {n_tokens}")
    if min(n_examples, n_intervals, per_interval, n_logits, batch_contexts) < 1 or min(*window, n_neighbours) < 0 \
            or n_bins < 2 * n_intervals:
        raise SteerscopeError("n_examples, n_intervals, per_interval, n_logits, batch_contexts must be >= 1, window "
                              f"and n_neighbours >= 0, n_bins >= 2 * n_intervals; got {n_bins} bins, {n_intervals} intervals")
    site = resolve_one(model, dictionary.cfg.site or "")
    params = dict(n_tokens=n_tokens, n_examples=n_examples, n_intervals=n_intervals, per_interval=per_interval,
                  n_bins=n_bins, window=list(window), n_logits=n_logits, n_neighbours=n_neighbours, seed=seed)
    t0 = time.time()
    tokens, total, label, per, batches = _source(model, tokens_or_store, site, n_tokens, n_ctx, batch_contexts)
    params["data"] = hashlib.sha256(tokens.int().numpy().tobytes()).hexdigest()[:16] + f"/{total}"
    fp, out = dictionary_fingerprint(dictionary), Path(out_dir)
    _existing(out, fp, params, overwrite)  # refuse another artifact's directory before touching it
    with dir_lock(out, "feature-store build"):  # one build per directory; stale temp files of a killed one go
        for stale in out.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        if (old := _existing(out, fp, params, overwrite)) is not None:
            return refresh(old, dictionary, dict_path, out)
        (out / "meta.json").unlink(missing_ok=True)  # no meta.json: not a finished store
        dict_path = dictionary_dir(dictionary, dict_path, fp, out)
        top, iv, stats = _scan(dictionary, batches, total, per, params, progress)
        tok, scan_s = model.tokenizer, time.time() - t0
        strs = tok.batch_decode([[i] for i in range(model.cfg.d_vocab)]) if tok is not None else [""] * model.cfg.d_vocab
        vocab = pa.array([s or f"<{i}>" for i, s in enumerate(strs)])  # each id decoded on its own
        dirs, write_site, note = residual_directions(dictionary, model)
        tables = {"features": _features_table(stats, iv, total), "logits": logit_table(dirs, model, n_logits, vocab),
                  "examples": _examples_table(top, iv, stats["max"], tokens, vocab, params),
                  "neighbours": neighbour_table(dictionary.W_dec.detach().float().cpu(), n_neighbours),
                  "vocab": pa.table({"token_id": np.arange(len(vocab), dtype=np.int32), "token": vocab})}
        for name, table in tables.items():
            write_atomic(out / f"{name}.parquet", table.replace_schema_metadata({"fingerprint": fp}))
        meta = _meta(dictionary, dict_path, out, fp, model, model_ref, site, write_site, note, params, total, tokens, label)
        meta["tables"] = {name: file_entry(f"{name}.parquet", (out / f"{name}.parquet").read_bytes()) for name in tables}
        meta["build"] = {"seconds": round(time.time() - t0, 3), "scan_seconds": round(scan_s, 3),
                         "tokens_per_s": round(total / max(scan_s, 1e-9), 1), "n_example_rows": tables["examples"].num_rows}
        write_atomic(out / "meta.json", json.dumps(meta, indent=2, default=str).encode())
        return meta


def _existing(out: Path, fp: str, params: dict, overwrite: bool) -> dict | None:
    """The meta of a finished store of this very build (dictionary, data, settings) in ``out``, reused unless
    ``overwrite``; else None (build). Another store there needs ``overwrite``."""
    meta = None
    with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
        meta = json.loads((out / "meta.json").read_text())
    for marker, kind in (("manifest.json", "an activation store"), ("cfg.json", "a dictionary")):
        if (out / marker).is_file():
            raise SteerscopeError(f"{out} holds {kind}; give the feature store a directory of its own (--out)")
    if isinstance(meta, dict) and meta.get("fingerprint") == fp and meta.get("params") == params and not overwrite:
        return meta
    if meta is not None and not overwrite:
        raise SteerscopeError(f"{out} holds another feature store; pass overwrite=True (--overwrite) or choose another directory")
    return None


def _scan(dictionary, batches, total: int, per: int, p: dict, progress: bool):
    F, (left, right) = dictionary.cfg.d_sae, p["window"]
    top = _Bottom(F, p["n_examples"], left + right + 1)
    iv = _Intervals(F, p["n_bins"], p["per_interval"], left + right + 1, p["seed"])
    count, total_act, mx = torch.zeros(F, dtype=torch.long), torch.zeros(F, dtype=torch.float64), torch.zeros(F)
    dtype, device = next(dictionary.parameters()).dtype, next(dictionary.parameters()).device
    with tqdm(total=total, unit="tok", desc="feature store", disable=not progress) as bar, torch.no_grad():
        for x, g in batches:
            codes = dictionary.encode(x.to(device=device, dtype=dtype)).float().cpu()
            r, f = (codes > 0).nonzero(as_tuple=True)  # the sparse entries (dense column reductions are slow)
            a, window = codes[r, f], _windows(codes, r, f, per, left, right)
            count += torch.bincount(f, minlength=F)
            total_act.index_add_(0, f, a.double())
            mx.scatter_reduce_(0, f, a, "amax")
            top.offer(f, -a, g[r], a, window)
            iv.observe(f, a, g[r], window)
            bar.update(len(x))
    return top, iv, {"count": count, "sum": total_act, "max": mx}


def _examples_table(top: _Bottom, iv: _Intervals, mx: torch.Tensor, tokens: torch.Tensor, vocab: pa.Array, p: dict):
    F, n, (left, right), T = len(mx), p["n_intervals"], p["window"], tokens.shape[1]
    groups, lo, hi, frac = iv.groups(mx, n, p["per_interval"])
    parts = []  # (feature, kind: -1 top / interval i, rank, row, act, window acts)
    for table, n_kind in ((top, 1), (groups, n)):
        f, k, rank = torch.isfinite(table.key.view(F, n_kind, -1)).nonzero(as_tuple=True)
        slot = f * n_kind + k
        parts.append((f, k - int(n_kind == 1), rank, *(t[slot, rank] for t in table.pay.values())))
    cols = [torch.cat(c) for c in zip(*parts, strict=True)]
    order = torch.from_numpy(np.lexsort((cols[2].numpy(), cols[1].numpy(), cols[0].numpy())))
    f, kind, rank, row, act, win = (c[order] for c in cols)
    ctx, pos, ki, is_iv = row // T, row % T, kind.clamp(min=0), (kind >= 0).numpy()
    wpos = pos[:, None] + torch.arange(-left, right + 1)
    inside = (wpos >= 0) & (wpos < T)
    ids = tokens[ctx[:, None], wpos.clamp(0, T - 1)].int()
    offsets, flat = pa.array(np.r_[0, inside.sum(1).cumsum(0).numpy()].astype(np.int32)), pa.array(ids[inside].numpy())
    kinds = np.array(["top"] + [f"interval-{i}" for i in range(n)])
    return pa.table({
        "feature": f.int().numpy(), "kind": kinds[(kind + 1).numpy()], "rank": rank.short().numpy(),
        **{f"interval_{c}": pa.array(v[f, ki].float().numpy(), mask=~is_iv) for c, v in (("lo", lo), ("hi", hi), ("frac", frac))},
        "context": ctx.int().numpy(), "position": pos.int().numpy(), "act": act.numpy(),
        "center": (left - (~inside[:, :left]).sum(1)).short().numpy(), "token_ids": pa.ListArray.from_arrays(offsets, flat),
        "tokens": pa.ListArray.from_arrays(offsets, pa.DictionaryArray.from_arrays(flat, vocab)),
        "acts": pa.ListArray.from_arrays(offsets, pa.array(win.float()[inside].numpy())),
        "token": pa.DictionaryArray.from_arrays(pa.array(ids[:, left].numpy()), vocab)})


def _features_table(stats: dict, iv: _Intervals, total: int) -> pa.Table:
    count, width = stats["count"], iv.width()
    occupied = torch.where(count > 0, torch.ceil(stats["max"] / width).clamp(1, iv.bins), 0).long()
    hist = [c[:k].tolist() for c, k in zip(iv.counts, occupied.tolist(), strict=True)]
    return pa.table({"feature": np.arange(len(count), dtype=np.int32), "density": (count.double() / max(total, 1)).numpy(),
                     "n_fired": count.numpy(), "max_act": stats["max"].numpy(),
                     "mean_act": (stats["sum"] / count.clamp(min=1)).float().numpy(),
                     "hist_counts": pa.array(hist, pa.list_(pa.int64())),
                     "hist_width": torch.where(count > 0, width, 0.0).numpy()})


def write_atomic(file: Path, data: pa.Table | bytes) -> None:
    """Write atomically: a temporary file, then rename."""
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        pq.write_table(data, tmp, row_group_size=4096 if file.stem == "examples" else 16384, compression="zstd")
    os.replace(tmp, file)


def _meta(dictionary, dict_path, out, fp, model, model_ref, site, write_site, note, params, total, tokens, label) -> dict:
    keys = ("model_name", "n_layers", "d_model", "d_mlp", "n_heads", "d_vocab", "n_ctx", "num_experts")
    return {"format": FORMAT, "version": VERSION, "fingerprint": fp, "architecture": dictionary.architecture,
            "d_sae": dictionary.cfg.d_sae, "dictionary": dictionary.cfg.to_dict(), "site": site, "write_site": write_site,
            **path_fields(dict_path, out), "logits_note": note,
            "model": model_ref or dictionary.cfg.model or model.cfg.model_name,
            "model_cfg": {k: getattr(model.cfg, k, None) for k in keys}, "n_tokens": int(total),
            "n_contexts": int(tokens.shape[0]), "n_ctx": int(tokens.shape[1]), "source": label, "params": params,
            "eval": read_beside(dict_path, "eval", fp),
            "history": read_beside(dict_path, "history", fp) or dictionary.cfg.training.get("history")}
