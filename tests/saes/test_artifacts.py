"""A dictionary directory is checksummed and written atomically; damaged or foreign files are one clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch

from probe.errors import SteerscopeError
from saes.base import load_dictionary
from saes.topk import TopKConfig, TopKSAE


def sae(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4))


def flip_one_data_bit(file) -> None:
    """Flip the lowest bit of the last byte: inside the tensor data, the header stays valid."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))


def test_one_flipped_bit_in_the_weights_is_caught(tmp_path):
    sae().save(tmp_path / "d")
    assert len(json.loads((tmp_path / "d" / "cfg.json").read_text())["weights_sha256"]) == 64
    flip_one_data_bit(tmp_path / "d" / "weights.safetensors")
    with pytest.raises(SteerscopeError, match="its sha256 differs"):
        load_dictionary(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d", verify=False)  # the opt-out still loads (to inspect)
    assert any(not torch.equal(v, sae().state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_dictionary_saved_before_checksums_loads_unchecked(tmp_path):
    sae().save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    del cfg["weights_sha256"]
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(load_dictionary(tmp_path / "d").W_enc, sae().W_enc, rtol=0, atol=0)


def test_overwriting_never_leaves_a_silent_mix(tmp_path, monkeypatch):
    """A crash after the new weights were renamed in but before cfg.json was: the load fails loudly."""
    sae(0).save(tmp_path / "d")
    import saes.base as base

    real = base.atomic_write

    def crash_on_cfg(file, data):
        if file.name == "cfg.json":
            raise KeyboardInterrupt("killed")
        real(file, data)

    monkeypatch.setattr(base, "atomic_write", crash_on_cfg)
    with pytest.raises(KeyboardInterrupt):
        sae(1).save(tmp_path / "d")
    monkeypatch.undo()
    with pytest.raises(SteerscopeError, match="corrupted or truncated"):
        load_dictionary(tmp_path / "d")
    assert not [p for p in os.listdir(tmp_path / "d") if ".tmp" in p]  # no temporary file left behind


@pytest.mark.parametrize("content, message", [
    (b"[1, 2, 3]", "must hold a JSON object"),
    (b"\xff\xfe\x00binary", "not valid JSON"),
    (b'{"architecture": "topk", "format_version": 99, "d_in": 16, "d_sae": 64, "k": 4}', "format_version 99"),
])
def test_a_bad_cfg_json_is_one_clear_error(tmp_path, content, message):
    sae().save(tmp_path / "d")
    (tmp_path / "d" / "cfg.json").write_bytes(content)
    with pytest.raises(SteerscopeError, match=message):
        load_dictionary(tmp_path / "d")
