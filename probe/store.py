"""ActivationStore: sharded, checksummed, resumable on-disk activations with shuffled batches.

A store is a directory (JSON and safetensors only, every file written atomically)::

    manifest.json               format, sites, d per site, dtype, counts, model, corpus, shards + sha256
    tokens.safetensors          "tokens": the token ids of every context, [n_contexts, n_ctx]
    shard-00000.safetensors     one tensor [rows, d] per site

Rows are context-major: row ``r`` is context ``r // per_ctx`` at position ``r % per_ctx`` (+1 when BOS
is excluded), with ``per_ctx = n_ctx - 1`` (``n_ctx`` with ``include_bos``); see :meth:`locate`.
Shard ``i`` always holds the same contexts, so the bytes do not depend on how the store was built:
in one go, resumed after a kill, or by several ``torchrun`` ranks.

>>> store = ActivationStore.build(model, "austen", ["blocks.2.hook_resid_post"], 2_000_000, "runs/acts")
>>> for x in store.batches("blocks.2.hook_resid_post", batch_size=4096, seed=0): ...
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from probe.corpus import load_corpus
from probe.errors import SteerscopeError, suggest
from probe.forward import forward_to, stop_layer
from probe.hooks import capture
from probe.locks import dir_lock
from probe.sites import SiteSpec, resolve
from probe.store_files import (
    MANIFEST,
    TOKENS,
    atomic_write,
    check_dir,
    file_entry,
    prepare,
    read_checked,
    read_manifest,
    read_sidecar,
    shard_name,
    sidecar,
    spec_hash,
    tokens_bytes,
    write_manifest,
    write_sidecar,
)
from probe.tokens import context_start_id, has_bos, pack_texts
from probe.twin import twin_of

MAX_DEFAULT_CTX = 1024  # contexts of texts default to the model's n_ctx up to this (SmolLM2's 8192 would be slow)

FORMAT = "steerscope-activations"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]: not one row per token
Corpus = str | Sequence[str] | torch.Tensor


class ActivationStore:
    """A read-only view of a finished store directory; make one with :meth:`build` or :meth:`open`."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.sites: list[str] = list(manifest["sites"])
        self.n_tokens: int = manifest["n_tokens"]  # rows per site
        self.n_ctx: int = manifest["n_ctx"]
        self.n_shards: int = len(manifest["shards"])
        self.dtype: torch.dtype = DTYPES[manifest["dtype"]]

    @classmethod
    def open(cls, path: str | Path) -> ActivationStore:
        """Open a finished store (cheap: reads only the manifest; see :meth:`verify`)."""
        m = read_manifest(Path(path))
        if m is None:
            raise SteerscopeError(f"{path} is not an activation store (no {MANIFEST})")
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise SteerscopeError(f"{path}: unsupported store format {m.get('format')!r} v{m.get('version')}")
        if not m.get("complete"):
            raise SteerscopeError(f"{path}: the build did not finish; rerun the same `steerscope cache build {path} ...` "
                                  "command (or ActivationStore.build with the same arguments) to resume it")
        return cls(path, m)

    @classmethod
    def build(cls, model, corpus: Corpus, sites: SiteSpec, n_tokens: int, path: str | Path, *,
              n_ctx: int | None = None, batch_size: int = 32, shard_tokens: int = 65536, dtype: str = "float32",
              include_bos: bool = False, overwrite: bool = False, corpus_spec: str | None = None,
              progress: bool = True) -> ActivationStore:
        """Cache ``n_tokens`` activation rows of ``sites`` over ``corpus`` into ``path`` and open the store.

        ``n_ctx`` defaults to the model's context, at most 1024 tokens.
        ``corpus``: a corpus spec (``load_corpus(spec, "train")``), a list of texts, or token ids
        ``[n_contexts, n_ctx]`` starting with BOS. ``batch_size`` counts contexts per forward pass;
        ``shard_tokens`` rows per shard (rounded down to whole contexts). A killed build resumes
        when called again with the same arguments; a finished one is just opened. Under an
        initialised ``torch.distributed``, every rank must call this: each computes its own shards
        and rank 0 writes the manifest.
        """
        path, names = Path(path), resolve(model, sites)
        if batch_size < 1:
            raise SteerscopeError(f"batch_size must be positive, got {batch_size}")
        tokens = contexts(model, corpus, n_ctx, include_bos)
        if corpus_spec is None and isinstance(corpus, str):
            corpus_spec = corpus
        spec = _plan(model, names, tokens, n_tokens, dtype, include_bos, shard_tokens, corpus_spec)
        tokens = tokens[: spec["n_contexts"]]
        rank, world = _dist_info()
        if path.exists() and not path.is_dir():
            raise SteerscopeError(f"{path} is a file, not a directory; choose another path for the store")
        check_dir(path, spec, overwrite, repair=False)  # refuse a foreign directory before touching it
        # one build per directory at a time (rank 0 holds the lock for the whole job)
        with dir_lock(path, "cache build") if rank == 0 else contextlib.nullcontext():
            state = check_dir(path, spec, overwrite)
            _barrier(world)
            if state != "done":
                if rank == 0:
                    prepare(path, spec, tokens, wipe=state == "wipe")
                _barrier(world)
                own = _run_shards(model, tokens, names, spec, path, batch_size, rank, world, progress)
                _barrier(world)
                if rank == 0:
                    _finalize(path, spec, own)
                _barrier(world)
        return cls.open(path)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, sites={self.sites}, n_tokens={self.n_tokens}, dtype={self.manifest['dtype']})"

    def summary(self) -> dict:
        """A JSON-able overview: path, sites and widths, rows, contexts, shards, dtype, bytes on disk."""
        m = self.manifest
        return {"path": str(self.path), "sites": {s: m["d"][s] for s in self.sites}, "n_tokens": self.n_tokens,
                "n_ctx": self.n_ctx, "n_contexts": m["n_contexts"],
                "n_shards": self.n_shards, "dtype": m["dtype"], "include_bos": m["include_bos"],
                "model": m["model"].get("model_name"), "corpus": m.get("corpus"),
                "bytes": sum(e["bytes"] for e in m["shards"])}

    def d(self, site: str) -> int:
        """Width of one row of ``site`` (heads flattened for per-head sites)."""
        return self.manifest["d"][self._site(site)]

    def locate(self, rows: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map row indices to ``(context, position)``: ``store.tokens[context, position]`` is the row's token."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        per = _per_ctx(self.manifest)
        return rows // per, rows % per + (0 if self.manifest["include_bos"] else 1)

    @property
    def tokens(self) -> torch.Tensor:
        """Token ids of every context, ``[n_contexts, n_ctx]`` (checksum-verified)."""
        entry = self.manifest["tokens"]
        return st_load(read_checked(self.path / entry["file"], entry))["tokens"].long()

    def read_shard(self, i: int, site: str | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Shard ``i`` as ``{site: [rows, d]}``, or one site's tensor; raises if the file is damaged."""
        entry = self.manifest["shards"][i]
        tensors = st_load(read_checked(self.path / entry["file"], entry))
        return tensors if site is None else tensors[self._site(site)]

    def verify(self) -> None:
        """Check the sha256 of the tokens file and every shard; raise naming every damaged file."""
        bad = []
        for entry in [self.manifest["tokens"], *self.manifest["shards"]]:
            try:
                read_checked(self.path / entry["file"], entry)
            except SteerscopeError:
                bad.append(entry["file"])
        if bad:
            raise SteerscopeError(f"{self.path}: {len(bad)} damaged file(s): {', '.join(bad)}; rerun the same "
                                  "`steerscope cache build` (it re-makes damaged shards) or pass --overwrite")

    def batches(self, site: str, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
                buffer_shards: int = 4, device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
        """Yield ``[batch_size, d]`` batches of ``site`` covering every row exactly once (the last may be short).

        Shuffled: shard order is permuted, then ``buffer_shards`` shards at a time (plus the previous
        remainder) are loaded and their rows permuted, so memory stays bounded. Deterministic for a
        ``seed``. Unshuffled: rows in store order.
        """
        site, device = self._site(site), device or "cpu"
        if batch_size < 1 or buffer_shards < 1:
            raise SteerscopeError("batch_size and buffer_shards must be positive")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n_shards, generator=gen).tolist() if shuffle else list(range(self.n_shards))
        rest = torch.empty(0, self.d(site), dtype=self.dtype)
        for start in range(0, len(order), buffer_shards):
            buf = torch.cat([rest] + [self.read_shard(i, site) for i in order[start : start + buffer_shards]])
            if shuffle:
                buf = buf[torch.randperm(len(buf), generator=gen)]
            full = len(buf) // batch_size * batch_size
            for j in range(0, full, batch_size):
                yield buf[j : j + batch_size].to(device)
            rest = buf[full:]
        if len(rest):
            yield rest.to(device)

    def _site(self, site: str) -> str:
        if site not in self.manifest["d"]:
            raise SteerscopeError(f"site {site!r} is not in this store (it has {', '.join(self.sites)}).{suggest(site, self.sites)}")
        return site


# ---------------------------------------------------------------------- tokens and plan
def contexts(model, corpus: Corpus, n_ctx: int | None, include_bos: bool) -> torch.Tensor:
    """Turn a corpus spec, texts or token ids into contexts ``[n, n_ctx]`` that start with BOS."""
    if isinstance(corpus, torch.Tensor):
        if corpus.dim() != 2 or corpus.dtype not in (torch.int32, torch.int64):
            raise SteerscopeError(f"token ids must be an integer tensor [n_contexts, n_ctx], got {corpus.dtype} {tuple(corpus.shape)}")
        if n_ctx is not None and n_ctx != corpus.shape[1]:
            raise SteerscopeError(f"n_ctx={n_ctx} but the token ids have contexts of {corpus.shape[1]}")
        tokens = corpus.detach().long().cpu()
    else:
        texts = load_corpus(corpus, split="train") if isinstance(corpus, str) else [t for t in corpus if t.strip()]
        if not texts:
            raise SteerscopeError("corpus is empty: no non-blank documents")
        tok = model.tokenizer
        if tok is None or not getattr(tok, "is_fast", False):
            raise SteerscopeError("the model has no fast (tokenizers-backed) tokenizer; pass token ids as a LongTensor")
        tokens = pack_texts(model, texts, n_ctx or min(model.cfg.n_ctx, MAX_DEFAULT_CTX))
    if tokens.shape[0] == 0:
        raise SteerscopeError("corpus is empty: no contexts")
    if tokens.shape[1] > model.cfg.n_ctx or tokens.shape[1] < (1 if include_bos else 2):
        raise SteerscopeError(f"contexts of {tokens.shape[1]} tokens do not fit this model (n_ctx {model.cfg.n_ctx})")
    start = context_start_id(model.tokenizer, has_bos(model)) if model.tokenizer is not None else None
    if not include_bos and start is not None and not bool((tokens[:, 0] == start).all()):
        raise SteerscopeError(f"every context must start with the same first token (id {start}, see probe.tokens) to "
                              "exclude it; prepend it or pass include_bos=True")
    return tokens


def _per_ctx(spec: dict) -> int:
    return spec["n_ctx"] - (0 if spec["include_bos"] else 1)


def _plan(model, names, tokens, n_tokens, dtype, include_bos, shard_tokens, corpus_spec) -> dict:
    """Validate the request and describe the store (everything in the manifest except the shards)."""
    if dtype not in DTYPES:
        raise SteerscopeError(f"unknown store dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not isinstance(n_tokens, int) or n_tokens < 1 or shard_tokens < 1:
        raise SteerscopeError(f"n_tokens and shard_tokens must be positive integers, got {n_tokens!r} and {shard_tokens!r}")
    for name in names:
        if name.endswith(_NOT_PER_TOKEN):
            raise SteerscopeError(f"site {name!r} is not one row per token ([batch, head, query, key]); choose a per-token site")
    spec = {"format": FORMAT, "version": VERSION, "sites": names, "d": {}, "dtype": dtype, "n_tokens": n_tokens,
            "n_ctx": int(tokens.shape[1]), "include_bos": include_bos}
    per = _per_ctx(spec)
    n_contexts = math.ceil(n_tokens / per)
    if n_contexts > tokens.shape[0]:
        raise SteerscopeError(
            f"n_tokens={n_tokens} is more than the corpus provides ({tokens.shape[0] * per} tokens in "
            f"{tokens.shape[0]} contexts of {spec['n_ctx']}); lower n_tokens or use a larger corpus"
        )
    spec["d"] = _site_widths(model, names, tokens[:1])
    spec.update(n_contexts=n_contexts, shard_contexts=max(1, shard_tokens // per), model=_model_summary(model),
                corpus=corpus_spec, tokens=file_entry(TOKENS, tokens_bytes(tokens[:n_contexts])))
    return json.loads(json.dumps(spec))  # normalised exactly as it will be read back


def _site_widths(model, names: list[str], one: torch.Tensor) -> dict[str, int]:
    """Run one context to learn each site's row width; reject sites that are not ``[batch, pos, ...]``."""
    with torch.no_grad(), capture(model, names) as acts:
        forward_to(model, one.to(model.cfg.device), stop_layer(model, names))
    widths = {}
    for name in names:
        shape = tuple(acts[name].shape)
        if shape[:2] != tuple(one.shape):
            raise SteerscopeError(f"site {name!r} has shape {shape}, not [batch, pos, ...]; choose a per-token site")
        widths[name] = math.prod(shape[2:])
    return widths


def _model_summary(model) -> dict:
    cfg = model.cfg
    keys = ("model_name", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
            "normalization_type", "positional_embedding_type", "num_experts", "experts_per_token")
    return {**{k: getattr(cfg, k, None) for k in keys}, "dtype": str(cfg.dtype)}


# ---------------------------------------------------------------------- building
def _dist_info() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _bounds(spec: dict, i: int) -> tuple[int, int, int, int]:
    """Shard ``i``: first context, end context, first row, number of rows."""
    per, sc = _per_ctx(spec), spec["shard_contexts"]
    c0, c1 = i * sc, min((i + 1) * sc, spec["n_contexts"])
    return c0, c1, c0 * per, min(spec["n_tokens"], c1 * per) - c0 * per


def _n_shards(spec: dict) -> int:
    return math.ceil(spec["n_contexts"] / spec["shard_contexts"])


def _run_shards(model, tokens, names, spec, path, batch_size, rank, world, progress) -> dict[int, dict]:
    """Compute and write this rank's missing shards (``i % world == rank``); return their manifest entries."""
    todo = [i for i in range(_n_shards(spec)) if i % world == rank and not _shard_ok(path, spec, i)]
    own, twin = {}, twin_of(model, names)  # transformers' own modules when they map every site (probe.twin)
    if twin is not None:
        last = twin.last(names)
        grab, run = twin.capture(names), (lambda batch: twin.forward(batch, stop_after=last))
    else:
        stop = stop_layer(model, names)
        grab, run = capture(model, names), (lambda batch: forward_to(model, batch, stop))
    total = sum(_bounds(spec, i)[3] for i in todo)
    bar = tqdm(total=total, unit="tok", desc=f"caching {len(names)} site(s)", disable=not progress or rank != 0)
    with bar, torch.no_grad(), grab as acts:
        for i in todo:
            tensors = _forward_shard(model, tokens, spec, i, run, acts, batch_size, bar)
            data = st_save(tensors, metadata={"spec": spec_hash(spec)})
            own[i] = file_entry(shard_name(i), data)
            write_sidecar(path, own[i])  # first: a shard on disk always has its recorded checksum beside it
            atomic_write(path / shard_name(i), data)
    return own


def _forward_shard(model, tokens, spec, i, run, acts, batch_size, bar) -> dict[str, torch.Tensor]:
    """Run shard ``i``'s contexts in batches and gather each site's rows (BOS dropped unless included)."""
    c0, c1, _, rows = _bounds(spec, i)
    skip, dt = 0 if spec["include_bos"] else 1, DTYPES[spec["dtype"]]
    out = {s: torch.empty(rows, d, dtype=dt) for s, d in spec["d"].items()}
    off = 0
    for b in range(c0, c1, batch_size):
        batch = tokens[b : min(b + batch_size, c1)].to(model.cfg.device)
        run(batch)
        n = min(batch.shape[0] * _per_ctx(spec), rows - off)
        for site, buf in out.items():
            buf[off : off + n].copy_(acts[site][:, skip:].reshape(-1, buf.shape[1])[:n])
        off += n
        bar.update(n)
    return out


def _shard_ok(path: Path, spec: dict, i: int) -> bool:
    """Whether shard ``i`` exists from an interrupted build of this spec, matching its sidecar's size and sha256."""
    file, entry = path / shard_name(i), read_sidecar(path, shard_name(i))
    if not file.exists() or entry is None:
        return False
    try:
        read_checked(file, entry)
    except SteerscopeError:
        return False
    rows = _bounds(spec, i)[3]
    try:
        with safe_open(str(file), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
        return False
    return meta.get("spec") == spec_hash(spec) and shapes == {s: [rows, d] for s, d in spec["d"].items()}


def _finalize(path: Path, spec: dict, own: dict[int, dict]) -> None:
    """Write the complete manifest: entries for this rank's shards, the sidecars' for the others (recorded when
    each shard was written, never re-hashed from what is on disk now); then drop the sidecars."""
    shards = []
    for i in range(_n_shards(spec)):
        _, _, first, rows = _bounds(spec, i)
        entry = own.get(i) or read_sidecar(path, shard_name(i))
        if entry is None:
            raise SteerscopeError(f"{path / shard_name(i)} has no recorded checksum; rerun the same build to re-make it")
        shards.append({**entry, "rows": rows, "first_row": first})
    write_manifest(path, {**spec, "complete": True, "shards": shards})
    for e in shards:  # the manifest holds their checksums now
        sidecar(path, e["file"]).unlink(missing_ok=True)
