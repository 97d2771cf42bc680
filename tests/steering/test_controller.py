"""Controller-weighted steering (steering.controller): directions, the controller's fit, its vectors, its files."""

from __future__ import annotations

import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import capture
from probe.tokens import encode
from steering.apply import generate
from steering.controller import Controller, last_token_states, layer_directions

TARGET = ["Tell me how to steal a car.", "How do I steal a bicycle?", "Help me steal a purse.",
          "Explain how to steal money.", "I want to steal a horse."]
BENIGN = ["Tell me how to bake bread.", "How do I plant a tree?", "Help me write a letter.",
          "Explain how rain forms.", "I want to learn the piano."]


def test_directions_are_last_token_mean_differences(tiny_dense):
    dirs = layer_directions(tiny_dense, TARGET, BENIGN)
    L = tiny_dense.cfg.n_layers
    assert dirs.shape == (L, tiny_dense.cfg.d_model)
    sums = {s: [] for s in ("t", "b")}
    for key, prompts in (("t", TARGET), ("b", BENIGN)):
        for p in prompts:  # one prompt at a time, unpadded
            with torch.no_grad(), capture(tiny_dense, [f"blocks.{i}.hook_resid_post" for i in range(L)]) as acts:
                tiny_dense(encode(tiny_dense, p)[None])
            sums[key].append(torch.stack([acts[f"blocks.{i}.hook_resid_post"][0, -1] for i in range(L)]))
    want = torch.stack(sums["t"]).mean(0) - torch.stack(sums["b"]).mean(0)
    assert torch.allclose(dirs, want, atol=1e-4)


def test_the_controller_separates_its_training_prompts_and_weights_each_layer(tiny_dense):
    ctl = Controller.fit(tiny_dense, TARGET, BENIGN, read_layer=1, alpha=2.0, hidden=32, epochs=300)
    s, w = ctl.weights_for(tiny_dense, TARGET + BENIGN)
    assert (s[:5] > 0.5).all() and (s[5:] < 0.5).all() and ctl.train_loss < 0.05
    assert w.shape == (10, 2) and bool(((w > 0) & (w < 1)).all())
    vecs = ctl.vectors_for(tiny_dense, TARGET[0])
    assert [v.site for v in vecs] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert [v.coeff for v in vecs] == pytest.approx([2.0 * float(s[0]) * float(w[0, L]) for L in range(2)], rel=1e-5)
    assert torch.equal(vecs[1].tensor, ctl.directions[1])
    text = generate(tiny_dense, TARGET[0], steer=vecs, mode="all", max_new_tokens=4)
    assert isinstance(text, str)
    quiet = Controller.fit(tiny_dense, TARGET, BENIGN, read_layer=1, alpha=0.0, hidden=32, epochs=10)
    assert generate(tiny_dense, TARGET[0], steer=quiet.vectors_for(tiny_dense, TARGET[0]), mode="all",
                    max_new_tokens=4) == generate(tiny_dense, TARGET[0], max_new_tokens=4)


def test_save_and_load_round_trip(tiny_dense, tmp_path):
    ctl = Controller.fit(tiny_dense, TARGET, BENIGN, read_layer=0, hidden=16, epochs=20)
    back = Controller.load(ctl.save(tmp_path / "ctl"))
    x = last_token_states(tiny_dense, BENIGN, [ctl.read_site])[ctl.read_site]
    assert all(torch.equal(a, b) for a, b in zip(ctl(x), back(x), strict=True))
    assert back.read_layer == 0 and back.model_name == tiny_dense.cfg.model_name
    (tmp_path / "ctl" / "controller.safetensors").write_bytes(b"garbage")
    with pytest.raises(SteerscopeError, match="not a saved controller"):
        Controller.load(tmp_path / "ctl")


def test_bad_inputs_get_one_line(tiny_dense, tiny_moe):
    with pytest.raises(SteerscopeError, match=r"\[n_layers, d_model\]"):
        Controller(torch.zeros(64), read_layer=0)
    with pytest.raises(SteerscopeError, match="read_layer"):
        Controller(torch.zeros(2, 64), read_layer=5)
    wide = Controller(torch.zeros(2, 32), read_layer=0)
    with pytest.raises(SteerscopeError, match="width 32"):
        wide.vectors_for(tiny_dense, "Hello")
    other = Controller(torch.zeros(2, 64), read_layer=0, model_name="some-other-model")
    with pytest.raises(SteerscopeError, match="trained on 'some-other-model'"):
        other.vectors_for(tiny_dense, "Hello")
    with pytest.raises(SteerscopeError, match="target and benign"):
        layer_directions(tiny_dense, TARGET, [])
