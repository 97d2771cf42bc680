"""Train any registered dictionary: Adam with warmup and decay, dead-latent tracking, checkpoints, DDP.

>>> sae = train("topk", X, d_sae=768, k=8, seed=0)              # X: [N, d_in], one epoch by default
>>> sae = train("topk", store, site="blocks.2.hook_resid_post", d_sae=4096, k=32, n_tokens=4_000_000, out="runs/sae")

**Data**: a tensor [N, d_in], a pair (x, target), an ActivationStore (``site``/``target_site`` pick the
columns), or an iterable of batches / a callable returning one; see :mod:`saes.checkpoint`. Extra dict
keys (e.g. a g-SAE's ``"grad"``) reach ``training_loss`` as keyword arguments.

**One step.** A batch with NaN/inf is skipped, counted (``n_skipped_nonfinite``), never trained on; from
20 batches read on (and at the end) more than ``max_nonfinite_frac`` bad ones raise. Else ``loss =
training_loss(x*s, target*s, dead=mask, **extra)``; backward; DDP all-reduce; with ``cfg.normalize_decoder``
the parallel gradient is removed before the Adam step and decoder rows renormalised after. A latent is
dead once it has not fired for ``dead_tokens`` tokens.

**Input scaling.** ``s = sqrt(d_in) / mean ||x||`` over the first ``scale_batches`` batches; training
sees ``x*s`` (and ``target*s``); ``fold_input_scale(s)`` at the end, so the result takes raw activations.

**Checkpoints** in ``out/checkpoints`` (:mod:`saes.checkpoint`) every ``checkpoint_minutes`` of wall time
(default 10) and/or every ``checkpoint_every`` steps; ``resume=True`` continues the newest, bit-identical
on CPU; deleted once the dictionary is saved. **The out directory** is locked for the run and a finished
dictionary there is refused unless ``overwrite=True`` (:mod:`saes.run_dir`). **A store's shards** are all
checked against their sha256 before the first step (``verify_data``), so damage never surfaces mid-run.

**DDP.** Under ``torchrun`` (or an initialised process group) every rank reads the same global batch,
trains on its slice, gradients are all-reduced, and rank 0 writes checkpoints and the result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from probe.errors import SteerscopeError, suggest
from probe.locks import dir_lock
from saes import checkpoint as ckpt
from saes.base import Dictionary, get_architecture
from saes.metrics import fired, fvu, l0
from saes.run_dir import check_out, clear_old, open_wandb, same_config
from saes.schedule import geometric_median, lr_at, resolve_defaults

Decay = Literal["linear", "cosine", "none"]
BDecInit = Literal["mean", "geometric_median", "zeros"]
MIN_BATCHES_BEFORE_NONFINITE_CHECK = 20  # the bad-batch fraction is checked from this many batches on


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (run options such as ``out`` or ``device`` do not)."""

    architecture: str  # registry name, e.g. "topk"
    d_sae: int  # number of latents
    n_tokens: int | None = None  # rows to train on; None: whole passes over a tensor/store, enough for MIN_STEPS
    #                              steps (at most MAX_EPOCHS passes); a run still under MIN_STEPS warns once
    lr: float | None = None  # peak Adam learning rate; None: 2e-4 / sqrt(d_sae / 16384) (sparsify's rule)
    k: int | None = None  # active latents per token (TopK-family architectures)
    batch_size: int = 4096  # global batch: rows per step over all DDP ranks
    warmup_steps: int | None = None  # linear lr warmup steps; None: 5% of the run's steps, at most 1000
    decay: Decay = "linear"  # "linear": to min_lr_frac over the last decay_frac of tokens; "cosine": over the run
    decay_frac: float = 0.2  # linear decay: the final fraction of n_tokens over which the lr decays
    min_lr_frac: float = 0.0  # lr at the end of the decay, as a fraction of the peak lr
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    grad_clip: float | None = None  # clip the gradient norm (after the DDP all-reduce); None: off
    seed: int = 0  # weight init and data order
    b_dec_init: BDecInit = "mean"  # b_dec from the first batch's mean, its geometric median, or zeros
    normalize_inputs: bool = True  # train on x * s with E||x * s|| = sqrt(d_in); s folded in at the end
    scale_batches: int = 8  # batches used to estimate s
    dead_tokens: int | None = None  # dead after this many tokens unfired; None: min(1e6, n_tokens // 4)
    max_nonfinite_frac: float = 0.05  # more bad (NaN/inf) batches than this fraction raise
    site: str | None = None  # input site (column of a store; a label otherwise)
    target_site: str | None = None  # target site of a transcoder
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # extra fields of the architecture's config

    def __post_init__(self) -> None:
        for name, options in (("decay", get_args(Decay)), ("b_dec_init", get_args(BDecInit))):
            value = getattr(self, name)
            if value not in options:
                raise SteerscopeError(f"{name} must be one of {', '.join(options)}, got {value!r}.{suggest(str(value), options)}")
        for name in ("d_sae", "batch_size", "scale_batches", "n_tokens", "dead_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise SteerscopeError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise SteerscopeError(f"{name} must be >= 0, got {v!r}")
        if self.lr is not None and not self.lr > 0:
            raise SteerscopeError(f"lr must be > 0, got {self.lr!r}")
        if not (0 < self.decay_frac <= 1 and 0 <= self.min_lr_frac <= 1 and 0 <= self.max_nonfinite_frac <= 1):
            raise SteerscopeError("decay_frac must be in (0, 1]; min_lr_frac and max_nonfinite_frac in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SteerscopeError(f"unknown training config fields: {', '.join(unknown)}.{suggest(unknown[0], names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class RunOptions:
    """Where and how a run executes; none of this changes the weights."""

    out: str | Path | None = None  # directory of the final dictionary (and of checkpoints)
    checkpoint_every: int | None = None  # steps between checkpoints; None: by wall time only
    checkpoint_minutes: float | None = 10.0  # wall time between checkpoints (with out=); None: by steps only
    overwrite: bool = False  # replace a finished dictionary in out (and remove its eval.json / feature stores)
    verify_data: bool = True  # check every shard of an ActivationStore's sha256 before training
    resume: bool = False  # continue from the newest checkpoint in out/checkpoints (fresh start if none)
    device: str = "cpu"
    progress: bool = True  # tqdm bar with live L0 / FVU / dead fraction
    wandb: bool = False  # log metrics to Weights & Biases (imported only when True)
    log_every: int = 10  # steps between metric updates (bar, wandb, divergence check)

    def __post_init__(self) -> None:
        if self.log_every < 1 or (self.checkpoint_every is not None and self.checkpoint_every < 1):
            raise SteerscopeError(f"log_every and checkpoint_every must be positive step counts (got log_every="
                                  f"{self.log_every}, checkpoint_every={self.checkpoint_every})")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes >= 0:
            raise SteerscopeError(f"checkpoint_minutes must be >= 0 (got {self.checkpoint_minutes})")


def train(architecture: str, data: Any, *, site: str | None = None, target_site: str | None = None, d_sae: int,
          k: int | None = None, n_tokens: int | None = None, batch_size: int = 4096, lr: float | None = None,
          warmup_steps: int | None = None, decay: Decay = "linear", decay_frac: float = 0.2, min_lr_frac: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.999), grad_clip: float | None = None, seed: int = 0,
          b_dec_init: BDecInit = "mean", normalize_inputs: bool = True, scale_batches: int = 8,
          dead_tokens: int | None = None, max_nonfinite_frac: float = 0.05, out: str | Path | None = None,
          checkpoint_every: int | None = None, checkpoint_minutes: float | None = 10.0, resume: bool = False,
          overwrite: bool = False, verify_data: bool = True, device: str = "cpu", progress: bool = True,
          wandb: bool = False, log_every: int = 10, **arch_kwargs: Any) -> Dictionary:
    """Train a dictionary of ``architecture`` on ``data``; returns it (input scale folded in, eval mode).

    Fields are documented on :class:`TrainConfig` (what decides the weights) and :class:`RunOptions`;
    ``arch_kwargs`` go to the architecture's config (e.g. ``l1_coeff=5.0`` for "relu", ``model=...``).
    The training summary lands in ``dictionary.cfg.training``; with ``out`` the dictionary is saved there.
    """
    cfg = TrainConfig(architecture=architecture, d_sae=d_sae, n_tokens=n_tokens, lr=lr, k=k, batch_size=batch_size,
                      warmup_steps=warmup_steps, decay=decay, decay_frac=decay_frac, min_lr_frac=min_lr_frac,
                      betas=tuple(betas), grad_clip=grad_clip, seed=seed, b_dec_init=b_dec_init,
                      normalize_inputs=normalize_inputs, scale_batches=scale_batches, dead_tokens=dead_tokens,
                      max_nonfinite_frac=max_nonfinite_frac, site=site, target_site=target_site, arch_kwargs=arch_kwargs)
    run = RunOptions(out=out, checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes, resume=resume,
                     overwrite=overwrite, verify_data=verify_data, device=device, progress=progress, wandb=wandb,
                     log_every=log_every)
    return Trainer(cfg, data, run).fit()


# ---------------------------------------------------------------- the loop
class Trainer:
    """One training run; use :func:`train`."""

    def __init__(self, cfg: TrainConfig, data: Any, run: RunOptions):
        self.run, self.dist = run, ckpt.DataParallel(run.device)
        self.device = self.dist.device
        self.source = ckpt.make_source(data, cfg.site, cfg.target_site, cfg.batch_size, cfg.seed)
        if run.out is not None:
            check_out(Path(run.out), overwrite=run.overwrite, resume=run.resume)
        if run.verify_data and callable(getattr(getattr(self.source, "store", None), "verify", None)):
            self.source.store.verify()  # every shard's sha256 now, not 72 % into the run
        self.cfg = cfg = resolve_defaults(cfg, self.source)
        cls = get_architecture(cfg.architecture)
        _check_capabilities(cls, cfg, self.source)
        d_in, d_out = self.source.dims()
        self.model = _build(cls, cfg, d_in, d_out, data).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.dead = ckpt.DeadTracker(cfg.d_sae, cfg.dead_tokens, self.device)
        self.st = ckpt.RunState()
        self.ckpt_dir = Path(run.out) / ckpt.DIRNAME if run.out is not None else None
        self._last: tuple[Tensor, Any, Tensor] | None = None

    def fit(self) -> Dictionary:
        if self.run.out is None or self.dist.rank != 0:
            return self._fit()
        with dir_lock(self.run.out, "train"):
            check_out(Path(self.run.out), overwrite=self.run.overwrite, resume=self.run.resume)  # again, locked
            if self.run.overwrite:
                clear_old(Path(self.run.out), resume=self.run.resume)
            return self._fit()

    def _fit(self) -> Dictionary:
        self.begin()
        try:
            if not self.done:
                for batch in self.source.batches(self.st.batch_index):
                    if self.feed(batch):
                        break
            return self.end()
        finally:
            self.close()

    # The loop in three parts, so a driver can step several trainers on one stream (saes.circuits.layers).
    def begin(self) -> None:
        """Resume or initialise from the data, open the progress bar (and wandb)."""
        self._t0 = self._last_ckpt = time.time()
        if not self._resume():
            self._init_from_data()
        self.model.train()
        self._bar = tqdm(total=self.cfg.n_tokens, initial=self.st.tokens, unit="tok", unit_scale=True, mininterval=0.5,
                         desc=f"train {self.cfg.architecture}", disable=not self.run.progress or self.dist.rank != 0)
        self._wb = open_wandb(self.cfg) if self.run.wandb and self.dist.rank == 0 else None

    @property
    def done(self) -> bool:
        """True once ``n_tokens`` rows have been trained on."""
        return self.st.tokens >= self.cfg.n_tokens

    def feed(self, batch: dict[str, Any]) -> bool:
        """Train on the next batch of the stream (skip it if not finite); returns :attr:`done`."""
        self.st.batch_index += 1
        if not ckpt.finite(batch):
            self.st.n_skipped += 1
            self._check_nonfinite(final=False)
            return self.done
        self._step(batch)
        self._bar.update(len(batch["x"]))
        if self.st.step % self.run.log_every == 0:
            self._log(self._bar, self._wb)
        if self._checkpoint_due():
            self.checkpoint()
        return self.done

    def checkpoint(self) -> None:
        """Write a checkpoint now (``out`` must be set)."""
        self._checkpoint(time.time() - self._t0)
        self._last_ckpt = time.time()

    def end(self) -> Dictionary:
        """Final checks and metrics; fold the input scale, save to ``out``; returns the dictionary."""
        self._check_nonfinite(final=True)
        if self.st.step == 0:
            raise SteerscopeError("no training step was taken: the data yielded no usable batch")
        if self._last is not None:
            self._log(self._bar, self._wb)
        self.close()
        return self._finish(time.time() - self._t0)

    def close(self) -> None:
        """Close the progress bar and wandb (idempotent)."""
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
        if getattr(self, "_wb", None) is not None:
            self._wb.finish()
        self._bar = self._wb = None

    def _step(self, batch: dict[str, Any]) -> None:
        cfg, model = self.cfg, self.model
        n = len(batch["x"])
        x, target, extra = self._prepare(self.dist.shard(batch))
        lr = lr_at(cfg, self.st.step, self.st.tokens / cfg.n_tokens)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss, out = model.training_loss(x, target, dead=self.dead.mask(), **extra)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_grads(model, len(x) / n)
        if model.cfg.normalize_decoder:
            model.remove_parallel_grad_()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        if model.cfg.normalize_decoder:
            model.normalize_decoder_()
        with torch.no_grad():
            self.dead.update(self.dist.any_rank(fired(out.codes)), n)
        self.st.step += 1
        self.st.tokens += n
        self._last = (loss.detach(), out._replace(recon=out.recon.detach()), x if target is None else target)

    def _prepare(self, local: dict[str, Any]) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """Move to the device in float32 and scale: x*s, target*s, grad/s (a gradient w.r.t. x)."""
        s = self.st.scale
        move = {k: v.to(self.device, torch.float32) if isinstance(v, Tensor) and v.is_floating_point() else v
                for k, v in local.items()}
        x, target = move.pop("x") * s, move.pop("target", None)
        if "grad" in move:
            move["grad"] = move["grad"] / s
        return x, None if target is None else target * s, move

    def _init_from_data(self) -> None:
        """Input scale from the first batches, b_dec from the first one (identical on every rank)."""
        cfg, model = self.cfg, self.model
        heads = [b for b in self.source.peek(cfg.scale_batches) if ckpt.finite(b)]
        if not heads:
            raise SteerscopeError(f"none of the first {cfg.scale_batches} batches is free of NaN/inf")
        if cfg.normalize_inputs:
            norms = torch.cat([h["x"].double().norm(dim=1) for h in heads])
            self.st.scale = math.sqrt(model.cfg.d_in) / max(float(norms.mean()), 1e-12)
        goal = heads[0].get("target", heads[0]["x"]).float() * self.st.scale
        if cfg.b_dec_init != "zeros" and isinstance(getattr(model, "b_dec", None), torch.nn.Parameter):
            value = goal.mean(0) if cfg.b_dec_init == "mean" else geometric_median(goal)
            with torch.no_grad():
                model.b_dec.copy_(value.to(model.b_dec))
        if model.cfg.normalize_decoder:
            model.normalize_decoder_()
        self.dist.broadcast(model)

    def _check_nonfinite(self, final: bool) -> None:
        seen, bad = self.st.batch_index, self.st.n_skipped
        if (final or seen >= MIN_BATCHES_BEFORE_NONFINITE_CHECK) and seen and bad > self.cfg.max_nonfinite_frac * seen:
            raise SteerscopeError(f"{bad} of {seen} batches contained NaN/inf (more than max_nonfinite_frac="
                                  f"{self.cfg.max_nonfinite_frac}); they were skipped, never trained on. Check the "
                                  "activations (e.g. `steerscope cache verify`, a float16 overflow at this site)")

    def _log(self, bar: tqdm, wb: Any) -> None:
        loss, out, goal = self._last
        if not bool(torch.isfinite(loss)):
            raise SteerscopeError(f"training diverged: the loss is {float(loss)} at step {self.st.step}; lower lr "
                                  f"(now {self.cfg.lr:g}) or set grad_clip")
        m = {"loss": float(loss), "l0": float(l0(out.codes)), "fvu": float(fvu(goal, out.recon)),
             "dead_frac": float(self.dead.mask().float().mean()), "lr": self.opt.param_groups[0]["lr"]}
        self.st.metrics = m
        if not self.st.history or self.st.history[-1]["step"] != self.st.step:
            self.st.history.append({"step": self.st.step, "tokens": self.st.tokens, **m})
        bar.set_postfix(l0=f"{m['l0']:.1f}", fvu=f"{m['fvu']:.3f}", dead=f"{m['dead_frac']:.1%}", refresh=False)
        if wb is not None:
            wb.log(m, step=self.st.step)

    def _checkpoint_due(self) -> bool:
        run = self.run
        if self.ckpt_dir is None:
            return False
        due = bool(run.checkpoint_every) and self.st.step % run.checkpoint_every == 0
        if run.checkpoint_minutes is not None and not due:
            late = time.time() - self._last_ckpt >= 60 * run.checkpoint_minutes
            due = bool(self.dist.any_rank(torch.tensor([late], device=self.device))[0])  # rank clocks differ
        return due

    def _checkpoint(self, wall: float) -> None:
        if self.dist.rank == 0:
            opt_tensors, opt_meta = ckpt.optimizer_state(self.opt)
            tensors = {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, **opt_tensors,
                       **ckpt.rng_state(), "dead.since": self.dead.since}
            state = {**dataclasses.asdict(self.st), "wall_time_s": self.st.wall_time_s + wall}
            meta = {"config": self.cfg.to_dict(), "dictionary": self.model.cfg.to_dict(), "optimizer": opt_meta,
                    "state": state, "world_size": self.dist.world}
            ckpt.write(self.ckpt_dir, self.st.step, tensors, meta)
        self.dist.barrier()

    def _resume(self) -> bool:
        """Load the newest checkpoint if ``resume`` (False when there is none: a fresh start)."""
        if self.ckpt_dir is None:
            if self.run.resume:
                raise SteerscopeError("resume=True needs out= (checkpoints live in OUT/checkpoints)")
            return False
        if not ckpt.exists(self.ckpt_dir):
            return False
        if not self.run.resume:
            raise SteerscopeError(f"{self.ckpt_dir} holds checkpoints of an unfinished run: pass resume=True "
                                  "(--resume) to continue it, or choose another out directory")
        tensors, meta = ckpt.latest(self.ckpt_dir)
        same_config(meta["config"], self.cfg.to_dict(), self.ckpt_dir)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        ckpt.load_optimizer_state(self.opt, tensors, meta["optimizer"])
        ckpt.set_rng_state(tensors)
        self.dead.since.copy_(tensors["dead.since"])
        self.st = ckpt.RunState(**meta["state"])
        return True

    def _finish(self, wall: float) -> Dictionary:
        st, model = self.st, self.model
        model.cfg.training = {"config": self.cfg.to_dict(), "n_steps": st.step, "n_tokens_trained": st.tokens,
                              "n_batches": st.batch_index, "n_skipped_nonfinite": st.n_skipped, "input_scale": st.scale,
                              "world_size": self.dist.world, "wall_time_s": round(st.wall_time_s + wall, 3), **st.metrics,
                              "history": st.history}
        model.fold_input_scale(st.scale)
        model.eval()
        if self.run.out is not None and self.dist.rank == 0:
            model.save(self.run.out)
            ckpt.remove(self.ckpt_dir)
        self.dist.barrier()
        self.dist.close()
        return model


def _check_capabilities(cls: type[Dictionary], cfg: TrainConfig, source: Any) -> None:
    caps, name = cls.capabilities, cfg.architecture
    if "backprop" not in caps:
        hint = " (use saes.snmf.fit_snmf / `steerscope snmf`)" if name == "snmf" else ""
        raise SteerscopeError(f"{name!r} is not trained by gradient descent{hint}")
    if cfg.normalize_inputs and "fold_input_scale" not in caps:
        raise SteerscopeError(f"{name!r} cannot fold an input scale into its weights; pass normalize_inputs=False")
    if "needs_target" in caps and source.dims()[1] is None:
        raise SteerscopeError(f"{name!r} predicts a target: pass data=(x, target), a store with target_site=, "
                              "or batches with a 'target' entry")


def _build(cls: type[Dictionary], cfg: TrainConfig, d_in: int, d_out: int | None, data: Any) -> Dictionary:
    """The dictionary, initialised from the global RNG seeded with ``cfg.seed``."""
    kw = dict(cfg.arch_kwargs)
    if cfg.k is not None:
        kw["k"] = cfg.k
    fields = {f.name for f in dataclasses.fields(cls.Config)} - {"d_in", "d_sae", "d_out", "training"}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise SteerscopeError(f"{cfg.architecture!r} has no option {unknown[0]!r}.{suggest(unknown[0], fields)} "
                              f"Its options: {', '.join(sorted(fields))}")
    info = getattr(data, "manifest", None)
    if "model" in fields and "model" not in kw and isinstance(info, dict) and isinstance(info.get("model"), dict):
        kw["model"] = info["model"].get("model_name")
    kw.setdefault("site", cfg.site)
    kw.setdefault("target_site", cfg.target_site)
    torch.manual_seed(cfg.seed)
    return cls(cls.Config(d_in=d_in, d_sae=cfg.d_sae, d_out=d_out, **kw))
