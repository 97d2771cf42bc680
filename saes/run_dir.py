"""The output directory of a training run: who may write there, and what goes when a dictionary is replaced.

``train(out=DIR)`` holds ``DIR``'s lock (:func:`probe.locks.dir_lock`) for the whole run, so a second run
into the same directory gets one line naming the first. A directory that already holds a finished
dictionary is refused unless ``overwrite=True``; overwriting removes what belonged to the old dictionary
(its ``eval.json``, feature stores inside ``DIR``, stale checkpoints) before training starts, so the new
weights never sit beside the old one's numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from probe.errors import SteerscopeError
from saes import checkpoint as ckpt

OWNED_FILES = ("eval.json", "history.json")  # written beside a dictionary by evaluate() / the trainer


def check_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to train into ``out`` when that would silently replace or mix with something there."""
    if out.exists() and not out.is_dir():
        raise SteerscopeError(f"cannot train into {out}: it is a file, not a directory")
    for marker, kind in (("manifest.json", "an activation store"), ("meta.json", "a feature store")):
        if (out / marker).exists() and not (out / "cfg.json").exists():
            raise SteerscopeError(f"{out} holds {kind}; give the dictionary a directory of its own (--out)")
    finished = (out / "cfg.json").exists()
    if finished and not overwrite and not (resume and ckpt.exists(out / ckpt.DIRNAME)):
        raise SteerscopeError(f"{out} already holds a dictionary ({_describe(out)}); pass overwrite=True "
                              "(--overwrite) to replace it and its eval.json/feature stores, or choose another out")


def clear_old(out: Path, *, resume: bool) -> list[str]:
    """Remove what belonged to a dictionary being replaced; returns the names removed."""
    removed = []
    for name in OWNED_FILES:
        if (out / name).exists():
            (out / name).unlink()
            removed.append(name)
    for child in sorted(out.iterdir()) if out.is_dir() else []:
        if child.is_dir() and (child / "meta.json").exists() and (child / "features.parquet").exists():
            shutil.rmtree(child)  # a feature store of the old dictionary
            removed.append(child.name + "/")
    if not resume and ckpt.exists(out / ckpt.DIRNAME):
        ckpt.remove(out / ckpt.DIRNAME)
        removed.append(ckpt.DIRNAME + "/")
    return removed


def _describe(out: Path) -> str:
    try:
        cfg = json.loads((out / "cfg.json").read_text())
        return f"{cfg.get('architecture', '?')} d_sae={cfg.get('d_sae', '?')} at {cfg.get('site', '?')}"
    except (OSError, ValueError, AttributeError):
        return "cfg.json unreadable"


def same_config(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise SteerscopeError(f"cannot resume from {where}: the training config changed ({'; '.join(diff)}); "
                              "rerun with the saved settings or use a new out directory")


def open_wandb(cfg: Any) -> Any:
    try:
        import wandb
        return wandb.init(project="steerscope", config=cfg.to_dict())
    except ImportError as e:
        raise SteerscopeError("wandb=True needs the wandb package (pip install wandb)") from e
