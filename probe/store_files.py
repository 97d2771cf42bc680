"""The files of an activation store: names, atomic writes, the manifest, checksummed reads.

Every write goes to a temporary name first and is moved into place, so a killed build leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from probe.errors import SteerscopeError
from probe.locks import LOCK

MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"


def check_dir(path: Path, spec: dict, overwrite: bool, repair: bool = True) -> str:
    """``fresh``, ``resume``, ``done`` or ``wipe``; refuse a foreign directory or a different store. A complete store
    with damaged shards is ``resume`` after they are deleted (``repair=False``: a read-only look, says ``done``)."""
    if not path.exists() or (path.is_dir() and not any(p.name != LOCK for p in path.iterdir())):
        return "fresh"
    old = read_manifest(path) if path.is_dir() else None
    if old is None:
        raise SteerscopeError(f"{path} exists and is not an activation store (no {MANIFEST}); choose a new or empty directory")
    diff = next((k for k in {**old, **spec} if k not in ("complete", "shards") and old.get(k) != spec.get(k)), None)
    if overwrite:
        return "wipe"
    if diff is None:
        if not old.get("complete"):
            return "resume"
        return "resume" if repair and drop_damaged(path, old) else "done"
    raise SteerscopeError(
        f"{path} holds a different activation store ({diff}: {str(old.get(diff))[:60]} != {str(spec.get(diff))[:60]}); "
        "pass overwrite=True to replace it or choose another path"
    )


def drop_damaged(path: Path, manifest: dict) -> list[str]:
    """Delete the shards of a complete store whose size or sha256 differ from the manifest, keeping each good
    shard's entry beside it (``.sha256`` sidecar) so a resumed build re-makes only the damaged ones."""
    bad = []
    for entry in manifest["shards"]:
        try:
            read_checked(path / entry["file"], entry)
        except SteerscopeError:
            bad.append(entry["file"])
    for entry in manifest["shards"] if bad else ():
        if entry["file"] in bad:
            (path / entry["file"]).unlink(missing_ok=True)
        else:
            write_sidecar(path, entry)
    return bad


def sidecar(path: Path, shard: str) -> Path:
    return path / f"{shard}.sha256"


def write_sidecar(path: Path, entry: dict) -> None:
    """A shard's size and sha256, written when the shard is: a resumed build checks carried-over shards with it."""
    atomic_write(sidecar(path, entry["file"]), json.dumps(entry).encode())


def read_sidecar(path: Path, shard: str) -> dict | None:
    try:
        entry = json.loads(sidecar(path, shard).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return entry if isinstance(entry, dict) and {"file", "sha256", "bytes"} <= set(entry) else None


def prepare(path: Path, spec: dict, tokens: torch.Tensor, wipe: bool) -> None:
    """Create the directory, drop temp files (and an old store on ``wipe``), write tokens + a partial manifest."""
    path.mkdir(parents=True, exist_ok=True)
    if wipe:
        (path / MANIFEST).unlink(missing_ok=True)
    for f in path.iterdir():
        if ".tmp" in f.name or (wipe and (f.name == TOKENS or f.name.startswith("shard-"))):  # shards and sidecars
            f.unlink()
    atomic_write(path / TOKENS, tokens_bytes(tokens))
    write_manifest(path, {**spec, "complete": False, "shards": []})


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def tokens_bytes(tokens: torch.Tensor) -> bytes:
    return st_save({"tokens": tokens.to(torch.int32).contiguous()})


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def file_entry(name: str, data: bytes) -> dict:
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def atomic_write(file: Path, data: bytes) -> None:
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SteerscopeError(f"{file} is not valid JSON; delete the directory or choose another path") from e


def read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise SteerscopeError(f"cannot read {file}: {e.strerror or e}") from e


def read_checked(file: Path, entry: dict) -> bytes:
    """The file's bytes, after checking size and sha256 against its manifest entry."""
    data = read_bytes(file)
    if len(data) != entry["bytes"]:
        raise SteerscopeError(f"{file} is truncated or altered ({len(data)} bytes, manifest says {entry['bytes']}); rebuild the store")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SteerscopeError(f"{file} is corrupted (sha256 mismatch); rebuild the store")
    return data
