"""A (skip) transcoder for every layer, trained in one pass over a streamed corpus.

Each layer's transcoder reads ``blocks.L.ln2.hook_normalized`` (the MLP's input) and predicts
``blocks.L.hook_mlp_out``. The model runs once per chunk of contexts; every layer's trainer takes its
batches from that chunk, in lockstep, so no layer's activations ever reach the disk (memory holds one
chunk: ``buffer_tokens`` rows per site). The stream is deterministic and addressed by batch index
(contexts drawn in a seeded order, rows shuffled within each chunk by a generator seeded with the
chunk's index), so a killed run resumes from its checkpoints exactly like ``saes.train``.

>>> tcs = train_transcoders(model, "austen", "runs/tc", n_tokens=500_000, d_sae=4096, k=32)
>>> tcs = load_transcoders("runs/tc"); tcs[2]            # the layer-2 Transcoder
>>> tcs.site(2), tcs.target_site(2)
('blocks.2.ln2.hook_normalized', 'blocks.2.hook_mlp_out')

On disk, ``DIR/layer_NN/`` is an ordinary dictionary directory (``cfg.json`` + ``weights.safetensors``,
openable with ``load_dictionary``) and ``DIR/transcoders.json`` (written last) is the index: the
model, the layers, the options and each layer's final training metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from probe.errors import SteerscopeError
from probe.forward import forward_to
from probe.hooks import capture
from probe.locks import dir_lock
from probe.store import contexts
from probe.store_files import atomic_write
from probe.twin import twin_of
from saes import checkpoint as ckpt
from saes.base import Dictionary, load_dictionary
from saes.run_dir import check_out, clear_old
from saes.train import RunOptions, TrainConfig, Trainer

FORMAT, VERSION, INDEX = "steerscope.transcoders", 1, "transcoders.json"
INPUT, OUTPUT = "blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out"


def layer_dir(root: Path, layer: int) -> Path:
    return root / f"layer_{layer:02d}"


@dataclass
class Transcoders:
    """Per-layer transcoders of one model (``tcs[L]`` is layer L's), as :func:`load_transcoders` returns them."""

    by_layer: dict[int, Dictionary]
    info: dict[str, Any]
    path: Path | None = None

    def __getitem__(self, layer: int) -> Dictionary:
        if layer not in self.by_layer:
            raise SteerscopeError(f"no transcoder for layer {layer}; these cover layers {sorted(self.by_layer)}")
        return self.by_layer[layer]

    def __len__(self) -> int:
        return len(self.by_layer)

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    @property
    def skip(self) -> bool:
        return bool(self.info.get("skip"))

    @property
    def model_name(self) -> str | None:
        return self.info.get("model")

    def site(self, layer: int) -> str:
        return self[layer].cfg.site

    def target_site(self, layer: int) -> str:
        return self[layer].cfg.target_site

    def to(self, *args, **kwargs) -> Transcoders:
        for tc in self.by_layer.values():
            tc.to(*args, **kwargs)
        return self

    def check_model(self, model) -> None:
        """One clear line when these transcoders do not fit ``model``."""
        name, n_layers, d = model.cfg.model_name, model.cfg.n_layers, model.cfg.d_model
        if self.model_name not in (None, name):
            raise SteerscopeError(f"these transcoders were trained on {self.model_name!r}, not {name!r}")
        for layer, tc in self.by_layer.items():
            if layer >= n_layers or tc.cfg.d_in != d or tc.cfg.d_out != d:
                raise SteerscopeError(f"the layer-{layer} transcoder ({tc.cfg.d_in} -> {tc.cfg.d_out}) does not fit "
                                      f"{name} ({n_layers} layers, d_model {d})")


def load_transcoders(path: str | Path) -> Transcoders:
    """Open a directory written by :func:`train_transcoders` (checks the index and every layer)."""
    path = Path(path)
    index = path / INDEX
    if not index.is_file():
        hint = " (it holds a single dictionary; open it with load_dictionary)" if (path / "cfg.json").is_file() else ""
        raise SteerscopeError(f"{path} is not a transcoders directory: no {INDEX}{hint}")
    try:
        info = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SteerscopeError(f"{index} is damaged ({e.msg if hasattr(e, 'msg') else e}); retrain or restore it") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION or not isinstance(info.get("layers"), list):
        raise SteerscopeError(f"{index}: not a steerscope transcoders index (format {info.get('format')!r})")
    by_layer = {}
    for entry in info["layers"]:
        layer = int(entry["layer"])
        tc = load_dictionary(path / entry["path"])
        if tc.cfg.site != INPUT.format(L=layer) or tc.cfg.target_site != OUTPUT.format(L=layer):
            raise SteerscopeError(f"{path / entry['path']} maps {tc.cfg.site} -> {tc.cfg.target_site}, not layer {layer}'s MLP")
        by_layer[layer] = tc.eval()
    return Transcoders(by_layer, info, path)


# ---------------------------------------------------------------------- the stream
class LayerStream:
    """Batches of every layer's (MLP input, MLP output) rows, addressed by batch index.

    Rows are the contexts' tokens after the first (the BOS / attention sink, as in ActivationStore), in
    chunks of ``chunk_contexts`` contexts; within a chunk the rows are permuted by a generator seeded with
    ``(seed, chunk)``. Batch ``i`` is rows ``[i*B, (i+1)*B)`` of the concatenated chunks.
    """

    def __init__(self, model, tokens: torch.Tensor, layers: Sequence[int], batch_size: int, chunk_contexts: int,
                 seed: int, forward_batch: int = 32):
        self.model, self.tokens, self.layers = model, tokens, list(layers)
        self.batch_size, self.chunk_contexts, self.seed, self.forward_batch = batch_size, chunk_contexts, seed, forward_batch
        self.per = tokens.shape[1] - 1
        self.chunk_rows = chunk_contexts * self.per
        self.n_rows = tokens.shape[0] * self.per
        self.sites = [s for L in self.layers for s in (INPUT.format(L=L), OUTPUT.format(L=L))]
        self._chunk: tuple[int, dict[str, torch.Tensor]] | None = None

    def n_batches(self) -> int:
        return self.n_rows // self.batch_size

    def _rows(self, c: int) -> dict[str, torch.Tensor]:
        """Chunk ``c``'s rows of every site, permuted (kept until another chunk is asked for)."""
        if self._chunk is not None and self._chunk[0] == c:
            return self._chunk[1]
        ctx = self.tokens[c * self.chunk_contexts: (c + 1) * self.chunk_contexts]
        parts: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        twin = twin_of(self.model, self.sites)  # transformers' own modules when they map every site (probe.twin)
        if twin is not None:
            last = twin.last(self.sites)
            grab, run = twin.capture(self.sites), (lambda batch: twin.forward(batch, stop_after=last))
        else:
            stop = max(self.layers) + 1
            grab, run = capture(self.model, self.sites), (lambda batch: forward_to(self.model, batch, stop))
        with torch.no_grad(), grab as acts:
            for b in range(0, len(ctx), self.forward_batch):
                run(ctx[b: b + self.forward_batch].to(self.model.cfg.device))
                for s in self.sites:
                    parts[s].append(acts[s][:, 1:].reshape(-1, acts[s].shape[-1]).float().cpu())
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + c) % 2**63)
        rows = {s: torch.cat(p) for s, p in parts.items()}
        perm = torch.randperm(len(next(iter(rows.values()))), generator=gen)
        self._chunk = (c, {s: r[perm] for s, r in rows.items()})
        return self._chunk[1]

    def batches(self, start: int = 0) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
        """``{layer: {"x": [B, d], "target": [B, d]}}`` for batch ``start``, ``start + 1``, ... (whole batches only)."""
        for i in range(start, self.n_batches()):
            lo, hi = i * self.batch_size, (i + 1) * self.batch_size
            pieces: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
            while lo < hi:
                c, off = divmod(lo, self.chunk_rows)
                take = min(hi - lo, self.chunk_rows - off)
                rows = self._rows(c)
                for s in self.sites:
                    pieces[s].append(rows[s][off: off + take])
                lo += take
            yield {L: {"x": torch.cat(pieces[INPUT.format(L=L)]), "target": torch.cat(pieces[OUTPUT.format(L=L)])}
                   for L in self.layers}


class _Feed:
    """One layer's view of the stream, for a Trainer: dims and the first batches (the driver feeds the rest)."""

    def __init__(self, head: list[dict[str, torch.Tensor]], n_rows: int):
        self.head, self.default_tokens = head, n_rows

    def dims(self) -> tuple[int, int]:
        return self.head[0]["x"].shape[1], self.head[0]["target"].shape[1]

    def peek(self, n: int) -> list[dict[str, torch.Tensor]]:
        return self.head[:n]

    def batches(self, start: int = 0):
        raise SteerscopeError("a layer's trainer is fed by train_transcoders, batch by batch")


# ---------------------------------------------------------------------- training
def train_transcoders(model, corpus, out: str | Path, *, n_tokens: int, d_sae: int, k: int = 32, skip: bool = False,
                      layers: Sequence[int] | None = None, batch_size: int = 1024, n_ctx: int | None = None,
                      buffer_tokens: int = 32768, seed: int = 0, lr: float | None = None, resume: bool = False,
                      overwrite: bool = False, checkpoint_minutes: float | None = 10.0, device: str = "cpu",
                      progress: bool = True, corpus_spec: str | None = None, **arch_kwargs: Any) -> Transcoders:
    """Train a transcoder (``skip``: a skip transcoder) on every layer in ``layers`` (default: all) of ``model``.

    ``n_tokens`` rows per layer (one pass, the stream shared by every layer); ``buffer_tokens`` rows per
    chunk held in memory per site; ``arch_kwargs`` reach each layer's config (e.g. ``aux_coeff``).
    With ``resume=True`` a killed run continues from its last checkpoint (written every
    ``checkpoint_minutes``); finished layers are kept. Returns the :class:`Transcoders`, saved in ``out``.
    """
    out = Path(out)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(int(L) for L in layers))
    if not layers or any(not 0 <= L < n_layers for L in layers):
        raise SteerscopeError(f"layers must be between 0 and {n_layers - 1} for {model.cfg.model_name}, got {layers}")
    if not isinstance(n_tokens, int) or n_tokens < batch_size or batch_size < 1:
        raise SteerscopeError(f"n_tokens ({n_tokens}) must be an integer of at least one batch (batch_size {batch_size})")
    if out.exists() and not out.is_dir():
        raise SteerscopeError(f"{out} is a file; choose a directory for the transcoders")
    if (out / INDEX).is_file() and not overwrite:
        raise SteerscopeError(f"{out} already holds finished transcoders; pass overwrite=True (--overwrite) or "
                              "choose another directory")
    tokens = contexts(model, corpus, n_ctx, include_bos=False)
    per = tokens.shape[1] - 1
    need = math.ceil(math.ceil(n_tokens / batch_size) * batch_size / per)  # whole batches up to n_tokens
    if need > tokens.shape[0]:
        raise SteerscopeError(f"n_tokens={n_tokens} is more than the corpus provides ({tokens.shape[0] * per} tokens); "
                              "lower n_tokens or use a larger corpus")
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))[:need]
    stream = LayerStream(model, tokens[order], layers, batch_size, max(1, buffer_tokens // per), seed)
    arch = "skip_transcoder" if skip else "transcoder"
    with contextlib.ExitStack() as stack:
        stack.enter_context(dir_lock(out, "transcoders"))
        trainers, done = {}, {}
        n_head = TrainConfig.__dataclass_fields__["scale_batches"].default
        head = list(itertools.islice(stream.batches(0), n_head)) if not all(_finished(layer_dir(out, L)) for L in layers) else []
        for L in layers:
            d = layer_dir(out, L)
            if resume and _finished(d):
                done[L] = load_dictionary(d).eval()
                continue
            stack.enter_context(dir_lock(d, "train"))
            check_out(d, overwrite=overwrite, resume=resume)  # Trainer checks again; here first, before the lock's dir
            if overwrite:
                clear_old(d, resume=resume)
            cfg = TrainConfig(architecture=arch, d_sae=d_sae, k=k, n_tokens=n_tokens, batch_size=batch_size, lr=lr,
                              seed=seed + L, site=INPUT.format(L=L), target_site=OUTPUT.format(L=L),
                              arch_kwargs={**arch_kwargs, "model": model.cfg.model_name})
            run = RunOptions(out=d, checkpoint_every=None, checkpoint_minutes=None, resume=resume, overwrite=overwrite,
                             verify_data=False, device=device, progress=False)
            trainers[L] = Trainer(cfg, _Feed([b[L] for b in head], stream.n_rows), run)
        if trainers:
            _run(trainers, stream, n_tokens, checkpoint_minutes, progress)
            done.update({L: t.end() for L, t in trainers.items()})
        info = {"format": FORMAT, "version": VERSION, "model": model.cfg.model_name, "skip": skip, "d_sae": d_sae,
                "k": k, "n_tokens": n_tokens, "batch_size": batch_size, "n_ctx": int(tokens.shape[1]), "seed": seed,
                "corpus": corpus_spec or (corpus if isinstance(corpus, str) else None),
                "layers": [{"layer": L, "path": layer_dir(out, L).name, "site": INPUT.format(L=L),
                            "target_site": OUTPUT.format(L=L), **_final_metrics(done[L])} for L in layers]}
        atomic_write(out / INDEX, json.dumps(info, indent=1).encode())
    return Transcoders({L: done[L] for L in layers}, info, out)


def _finished(d: Path) -> bool:
    return (d / "cfg.json").is_file() and not ckpt.exists(d / ckpt.DIRNAME)


def _final_metrics(tc: Dictionary) -> dict[str, Any]:
    t = tc.cfg.training or {}
    return {k: t[k] for k in ("fvu", "l0", "dead_frac", "n_tokens_trained", "wall_time_s") if k in t}


def _run(trainers: dict[int, Trainer], stream: LayerStream, n_tokens: int, minutes: float | None, progress: bool) -> None:
    """Step every layer's trainer on each batch of the stream; checkpoint them all together."""
    for t in trainers.values():
        t.begin()
    start = min(t.st.batch_index for t in trainers.values())
    trained = min(t.st.tokens for t in trainers.values())
    bar = tqdm(total=n_tokens, initial=trained, unit="tok", unit_scale=True, mininterval=0.5,
               desc=f"transcoders x{len(trainers)}", disable=not progress)
    last = time.time()
    try:
        for i, batch in enumerate(stream.batches(start), start):
            for L, t in trainers.items():
                if t.st.batch_index == i and not t.done:
                    t.feed(batch[L])
            bar.update(len(batch[next(iter(batch))]["x"]))
            if trainers and next(iter(trainers.values())).st.step % 10 == 0:
                ms = [t.st.metrics for t in trainers.values() if t.st.metrics]
                if ms:
                    bar.set_postfix(fvu=f"{sum(m['fvu'] for m in ms) / len(ms):.3f}",
                                    dead=f"{max(m['dead_frac'] for m in ms):.1%}", refresh=False)
            if all(t.done for t in trainers.values()):
                break
            if minutes is not None and time.time() - last >= 60 * minutes:
                for t in trainers.values():
                    t.checkpoint()
                last = time.time()
    finally:
        bar.close()
    if not all(t.done for t in trainers.values()):
        raise SteerscopeError(f"the stream ended before {n_tokens} tokens were trained; lower n_tokens")
