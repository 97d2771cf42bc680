"""A damaged or contested activation store: repaired by rerunning the build, rebuilt by overwrite, locked."""

from __future__ import annotations

import pytest

import probe.store as store_mod
from probe.errors import SteerscopeError
from probe.locks import dir_lock
from probe.store import ActivationStore
from tests.probe.test_store import KW, SITES, model, texts  # noqa: F401 (fixtures)


def flip(file) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))


def shard_bytes(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("shard-*"))}


def test_rerunning_the_build_remakes_only_the_damaged_shards(model, texts, tmp_path):
    s = ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    clean, good = shard_bytes(tmp_path), (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    flip(tmp_path / "shard-00001.safetensors")
    with pytest.raises(SteerscopeError, match="rerun the same `steerscope cache build`"):
        s.verify()
    again = ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    again.verify()
    assert shard_bytes(tmp_path) == clean and again.manifest == s.manifest
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == good  # the good shard was kept
    assert not list(tmp_path.glob("*.sha256")) and not (tmp_path / ".lock").exists()


def test_overwrite_rebuilds_even_the_same_store(model, texts, tmp_path):
    ActivationStore.build(model, texts, SITES[0], 300, tmp_path, **KW)
    stamp = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    ActivationStore.build(model, texts, SITES[0], 300, tmp_path, overwrite=True, **KW).verify()
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns != stamp


def test_a_shard_damaged_between_a_kill_and_the_resume_is_remade(model, texts, tmp_path, monkeypatch):
    clean_dir = tmp_path / "clean"
    clean = ActivationStore.build(model, texts, SITES[0], 300, clean_dir, **KW)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the manifest was finished")

    monkeypatch.setattr(store_mod, "_finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW)
    monkeypatch.undo()
    flip(tmp_path / "s" / "shard-00001.safetensors")  # damaged while nobody was looking
    resumed = ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW)
    resumed.verify()
    assert resumed.manifest["shards"] == clean.manifest["shards"]


def test_two_builds_into_one_directory_the_second_is_refused(model, texts, tmp_path):
    with dir_lock(tmp_path / "s", "cache build"), pytest.raises(SteerscopeError, match=r"in use by a cache build \(pid"):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW)
    ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "s", **KW).verify()  # released: it works now


def test_a_store_path_under_a_file_is_one_clear_error(model, texts, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SteerscopeError, match="a file is in the way|is a file"):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "f" / "s", **KW)
    with pytest.raises(SteerscopeError, match="is a file, not a directory"):
        ActivationStore.build(model, texts, SITES[0], 300, tmp_path / "f", **KW)
