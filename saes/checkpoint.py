"""Resumable run plumbing for the trainer: data streams, data parallelism, checkpoint files.

**Data streams** are addressed by batch index: ``source.batches(start)`` yields the same batches from
``start`` on in every run, so the data position in a checkpoint is one integer.
(a) A tensor ``[N, d_in]``, or a pair ``(x [N, d_in], target [N, d_out])`` for transcoders:
shuffled epochs; batch ``i`` is rows ``[i*B, (i+1)*B)`` of the concatenated per-epoch permutations,
each drawn by a generator seeded from ``(seed, epoch)``.
(b) An ``ActivationStore``: ``site`` (and ``target_site``) choose the columns; epoch ``e`` reads
``store.batches(site, batch_size, seed=seed + e)``, and a transcoder's two sites with the same seed,
so their rows align. (c) An iterable of batches, or a callable returning a fresh iterator (needed to
resume); each batch a tensor, an ``(x, target)`` pair, or a dict ``{"x": ..., "target": ..., **extra}``.
Extra keys are sliced with the batch (DDP) and passed to ``training_loss`` as keyword arguments.
For a g-SAE, batches from the live model carry ``"grad"`` (dLoss/dx, e.g. from
``saes.gsae.collect_with_grads``); since x is trained on ``x * s``, ``grad`` is passed as ``grad / s``.

**Checkpoints** are safetensors + JSON, no pickle, nothing executable on load. Two files in
``<out>/checkpoints/``::

    step-000000120.safetensors   every tensor: model.*, optim.<param>.<key>, rng.*, and trainer tensors
    step-000000120.json          everything else: counters, data position, configs, optimizer settings,
                                 and the sha256 of the .safetensors file

Both are written to a temporary name and renamed; the JSON goes last and is the commit mark. A run
killed while writing leaves at most an orphan file that :func:`latest` ignores. Older checkpoints are
deleted once a newer one is complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from probe.errors import SteerscopeError

DIRNAME = "checkpoints"

# ---------------------------------------------------------------- data streams, addressed by batch index
def as_batch(item: Any) -> dict[str, Any]:
    """A batch as a dict with "x" (and optionally "target" and extra keys); leading dims flattened."""
    if isinstance(item, Tensor):
        item = {"x": item}
    elif isinstance(item, tuple | list) and len(item) == 2:
        item = {"x": item[0], "target": item[1]}
    elif not isinstance(item, Mapping) or "x" not in item:
        raise SteerscopeError(f"a batch must be a tensor, an (x, target) pair or a dict with 'x', got {type(item).__name__}")
    return {k: v.reshape(-1, v.shape[-1]) if isinstance(v, Tensor) and v.ndim > 2 else v
            for k, v in item.items() if v is not None}


def finite(batch: dict[str, Any]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in batch.values() if isinstance(v, Tensor) and v.is_floating_point())


class TensorSource:
    """In-memory rows (and targets): batch i is rows [i*B, (i+1)*B) of the per-epoch permutations, end to end."""

    def __init__(self, x: Tensor, target: Tensor | None, batch_size: int, seed: int):
        if x.ndim != 2 or (target is not None and (target.ndim != 2 or len(target) != len(x))):
            raise SteerscopeError(f"data must be [N, d_in] (and target [N, d_out]), got {tuple(x.shape)}"
                                  + (f" and {tuple(target.shape)}" if target is not None else ""))
        if len(x) == 0:
            raise SteerscopeError("the training data is empty")
        self.x, self.target, self.batch_size, self.seed = x, target, batch_size, seed
        self.default_tokens = len(x)
        self._perms: dict[int, Tensor] = {}

    def dims(self) -> tuple[int, int | None]:
        return self.x.shape[1], None if self.target is None else self.target.shape[1]

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(len(self.x), generator=gen)
        return self._perms[epoch]

    def batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        n = len(self.x)
        for i in itertools.count(start):
            lo, hi, parts = i * self.batch_size, (i + 1) * self.batch_size, []
            while lo < hi:
                epoch, off = divmod(lo, n)
                take = min(hi - lo, n - off)
                parts.append(self._perm(epoch)[off: off + take])
                lo += take
            idx = torch.cat(parts)
            yield {"x": self.x[idx]} if self.target is None else {"x": self.x[idx], "target": self.target[idx]}

    def peek(self, n: int) -> list[dict[str, Any]]:
        return list(itertools.islice(self.batches(0), n))


class StoreSource(TensorSource):
    """An ActivationStore's site (and target site); epoch e shuffles with seed + e."""

    def __init__(self, store: Any, site: str | None, target_site: str | None, batch_size: int, seed: int):
        if site is None:
            raise SteerscopeError(f"training from an activation store needs site= (it has {', '.join(store.sites)})")
        self.store, self.site, self.target_site, self.batch_size, self.seed = store, site, target_site, batch_size, seed
        self.default_tokens = int(store.n_tokens)
        self.per_epoch = math.ceil(self.default_tokens / batch_size)

    def dims(self) -> tuple[int, int | None]:
        return self.store.d(self.site), self.store.d(self.target_site) if self.target_site else None

    def batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        epoch, skip = divmod(start, self.per_epoch)
        while True:
            xs = self.store.batches(self.site, self.batch_size, shuffle=True, seed=self.seed + epoch)
            ts = self.store.batches(self.target_site, self.batch_size, shuffle=True, seed=self.seed + epoch) \
                if self.target_site else itertools.repeat(None)
            for j, (x, t) in enumerate(zip(xs, ts, strict=False)):  # equal lengths: same rows per site
                if j >= skip:
                    yield {"x": x} if t is None else {"x": x, "target": t}
            epoch, skip = epoch + 1, 0


class IterSource:
    """An iterable of batches, or a callable returning a fresh iterator. Ends when the data ends."""

    def __init__(self, data: Any):
        self.data, self._head = data, []
        self.default_tokens = sum(len(as_batch(b)["x"]) for b in data) if isinstance(data, list | tuple) else None

    def _fresh(self) -> Iterator | None:
        if callable(self.data):
            return iter(self.data())
        it = iter(self.data)
        return None if it is self.data else it  # None: a one-shot iterator

    def batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        it = self._fresh() or itertools.chain(self._head, self.data)
        for item in itertools.islice(it, start, None):
            yield as_batch(item)

    def peek(self, n: int) -> list[dict[str, Any]]:
        it = self._fresh()
        if it is None:  # keep what we pull from a one-shot iterator, to be yielded again by batches()
            self._head += list(itertools.islice(self.data, max(0, n - len(self._head))))
            return [as_batch(b) for b in self._head[:n]]
        return [as_batch(b) for b in itertools.islice(it, n)]

    def dims(self) -> tuple[int, int | None]:
        first = self.peek(1)
        if not first:
            raise SteerscopeError("the training data yielded no batches")
        t = first[0].get("target")
        return first[0]["x"].shape[-1], None if t is None else t.shape[-1]


Source = TensorSource | IterSource


def make_source(data: Any, site: str | None, target_site: str | None, batch_size: int, seed: int) -> Source:
    """The stream for ``data`` (see :mod:`saes.train` for the accepted kinds)."""
    if isinstance(data, Tensor):
        return TensorSource(data, None, batch_size, seed)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return TensorSource(data[0], data[1], batch_size, seed)
    if all(hasattr(data, a) for a in ("dims", "peek", "batches", "default_tokens")):
        return data  # already a source (e.g. one layer's feed in saes.circuits.layers)
    if hasattr(data, "batches") and hasattr(data, "d"):
        return StoreSource(data, site, target_site if target_site != site else None, batch_size, seed)
    if callable(data) or isinstance(data, Iterable):
        return IterSource(data)
    raise SteerscopeError(f"cannot train on {type(data).__name__}: give a tensor, an (x, target) pair, "
                          "an ActivationStore, or an iterable of batches")


# ---------------------------------------------------------------- distributed
class DataParallel:
    """Data parallelism over an initialised process group (made here from torchrun's env if needed)."""

    def __init__(self, device: str):
        self.owned = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.owned = True
        on = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        if on and device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"
            torch.cuda.set_device(device)
        self.device = device

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.world == 1:
            return batch
        n = len(batch["x"])
        return {k: v.tensor_split(self.world)[self.rank] if isinstance(v, Tensor) and len(v) == n else v
                for k, v in batch.items()}

    def average_grads(self, model: torch.nn.Module, weight: float) -> None:
        """grad = sum over ranks of weight_r * grad_r, with weight_r = local rows / global rows."""
        if self.world == 1:
            return
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad.mul_(weight))

    def any_rank(self, mask: Tensor) -> Tensor:
        if self.world == 1:
            return mask
        m = mask.to(torch.int32)
        dist.all_reduce(m)
        return m > 0

    def broadcast(self, model: torch.nn.Module) -> None:
        if self.world > 1:
            for t in model.state_dict().values():
                dist.broadcast(t, 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owned:
            # every rank past its last collective before any closes its connections (a rank that
            # tears down while a peer is still inside an all_reduce can abort the peer's gloo thread)
            dist.barrier()
            dist.destroy_process_group()


# ---------------------------------------------------------------- run state
@dataclass
class RunState:
    """Counters a checkpoint carries (besides tensors)."""

    step: int = 0  # optimizer steps taken
    tokens: int = 0  # rows trained on (skipped batches excluded)
    batch_index: int = 0  # batches read from the data (trained or skipped): the data position
    n_skipped: int = 0  # batches skipped for NaN/inf
    scale: float = 1.0  # input scale s
    wall_time_s: float = 0.0  # before this process (resumed runs)
    metrics: dict[str, float] = field(default_factory=dict)  # last logged loss / l0 / fvu / dead_frac / lr
    history: list[dict[str, float]] = field(default_factory=list)  # every logged step's metrics (training curves)


# ---------------------------------------------------------------- dead latents
class DeadTracker:
    """Tokens since each latent last fired; a latent is dead once that count reaches ``dead_tokens``."""

    def __init__(self, d_sae: int, dead_tokens: int, device: str | torch.device = "cpu"):
        self.dead_tokens = dead_tokens
        self.since = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, fired: Tensor, n_tokens: int) -> None:
        self.since.add_(n_tokens).masked_fill_(fired, 0)

    def mask(self) -> Tensor:
        return self.since >= self.dead_tokens



# ---------------------------------------------------------------- optimizer and RNG state
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (``optim.<param>.<key>``) and JSON-able settings."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        scalars[str(idx)] = {}
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{key}"] = v.detach().cpu().clone().contiguous()
            else:
                scalars[str(idx)][key] = v
    return tensors, {"state": scalars, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state` (tuples such as Adam's betas come back as tuples)."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    groups = []
    for saved, current in zip(meta["param_groups"], opt.param_groups, strict=True):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, Tensor]:
    """The global torch RNG states (CPU, and every CUDA device when there is one)."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# ---------------------------------------------------------------- files
def write(directory: str | Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically and delete older ones; returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"step-{step:09d}"
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    _atomic_write(directory / f"{stem}.safetensors", blob)
    meta = {**meta, "step": step, "tensors_file": f"{stem}.safetensors", "sha256": hashlib.sha256(blob).hexdigest()}
    json_path = directory / f"{stem}.json"
    _atomic_write(json_path, json.dumps(meta, indent=1).encode())
    for old in directory.glob("step-*"):
        if not old.name.startswith(stem + "."):
            old.unlink(missing_ok=True)
    return json_path


def latest(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint in ``directory`` as (tensors, meta), or None if there is none."""
    directory = Path(directory)
    for json_path in sorted(directory.glob("step-*.json"), reverse=True):
        try:
            meta = json.loads(json_path.read_text())
            meta["tensors_file"], meta["sha256"]  # noqa: B018 - both needed below
        except (ValueError, KeyError, TypeError) as e:
            raise SteerscopeError(f"checkpoint {json_path} is damaged ({type(e).__name__}); delete {directory} to "
                                  "start over") from None
        blob_path = directory / meta["tensors_file"]
        if not blob_path.exists():
            continue
        blob = blob_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise SteerscopeError(f"checkpoint {blob_path} does not match its checksum (damaged); delete {directory} to start over")
        return st_load(blob), meta
    return None


def exists(directory: str | Path) -> bool:
    return any(Path(directory).glob("step-*.json"))


def remove(directory: str | Path) -> None:
    """Delete the checkpoints of a finished run (only our own ``step-*`` files, then the folder if empty)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for f in directory.glob("step-*"):
        f.unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
