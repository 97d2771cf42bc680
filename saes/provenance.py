"""Which dictionary a feature store belongs to, where it lives, and its evaluation and training history.

A store records its dictionary's directory in ``meta.json``: ``dictionary_path`` relative to the store
when both sit under the store's parent directory (one run directory, so ``runs/`` can move), else
absolute, and ``dictionary_path_abs`` always absolute. ``eval.json`` and ``history.json`` beside the
dictionary are read when asked for, so an evaluation written after the build shows without a rebuild;
an ``eval.json`` stamped with another dictionary's fingerprint is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from probe.errors import SteerscopeError
from probe.store_files import atomic_write
from saes.base import Dictionary, fingerprint, load_dictionary


def dictionary_dir(dictionary: Dictionary, given: Path | None, fp: str, store_dir: Path) -> Path:
    """The dictionary's directory: ``given``; else the one the object was saved to or loaded from, if the
    weights there are still these (same fingerprint); else a copy saved now as ``store_dir/dictionary``."""
    if given is not None:
        return Path(given).resolve()
    src = dictionary.source_path
    if src is not None and (Path(src) / "weights.safetensors").is_file():
        with contextlib.suppress(SteerscopeError):
            if fingerprint(load_dictionary(src)) == fp:
                return Path(src).resolve()
    return dictionary.save(Path(store_dir) / "dictionary").resolve()


def path_fields(dict_path: Path, store_dir: Path) -> dict[str, str]:
    """``dictionary_path`` (relative to the store inside one run directory, else absolute) and
    ``dictionary_path_abs``."""
    dict_path, store_dir = Path(dict_path).resolve(), Path(store_dir).resolve()
    inside = dict_path.is_relative_to(store_dir.parent)
    return {"dictionary_path": os.path.relpath(dict_path, store_dir) if inside else str(dict_path),
            "dictionary_path_abs": str(dict_path)}


def resolve_dictionary_path(meta: dict[str, Any], store_dir: Path) -> Path | None:
    """The dictionary directory recorded in a store's meta (relative to ``store_dir`` first, then the absolute
    path), if it still holds a dictionary (``cfg.json``); else None."""
    for p in (meta.get("dictionary_path"), meta.get("dictionary_path_abs")):
        if p and ((cand := (Path(store_dir) / p).resolve()) / "cfg.json").is_file():
            return cand
    return None


def read_beside(dict_path: Path | None, name: str, fp: str) -> Any:
    """``name``.json in the dictionary's directory (None if absent, unreadable, or stamped with another
    dictionary's fingerprint)."""
    if dict_path is None:
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
        data = json.loads((Path(dict_path) / f"{name}.json").read_text())
        if isinstance(data, dict) and data.get("fingerprint", fp) != fp:
            return None
        return data
    return None


def refresh(meta: dict[str, Any], dictionary: Dictionary, given: Path | None, store_dir: Path) -> dict[str, Any]:
    """A reused store: rewrite its meta's dictionary path if it does not resolve (older builds recorded none)
    or another directory was given for the same weights."""
    have = resolve_dictionary_path(meta, store_dir)
    if have is None or (given is not None and have != Path(given).resolve()):
        meta = {**meta, **path_fields(dictionary_dir(dictionary, given, meta["fingerprint"], store_dir), store_dir)}
        atomic_write(Path(store_dir) / "meta.json", json.dumps(meta, indent=2, default=str).encode())
    return meta
