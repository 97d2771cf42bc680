"""Shared fixtures: tiny random TransformerLens models built in the test (no download, no zoo weights).

The hub is switched off before anything imports huggingface_hub, so no test can reach it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if "STEERSCOPE_CACHE" not in os.environ:  # converted GGUF models go to a per-run directory, not ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["STEERSCOPE_CACHE"] = tempfile.mkdtemp(prefix="steerscope-test-cache-")
    atexit.register(shutil.rmtree, os.environ["STEERSCOPE_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

from probe.models import build_model  # noqa: E402
from probe.zoo import ZOO_DIR  # noqa: E402
from probe.zoo.specs import MODEL_SPECS  # noqa: E402

torch.set_num_threads(1)

TOKENIZER_FILE = ZOO_DIR / "tokenizer.json"
TINY = {"n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}


def _tiny_spec(name: str, **overrides) -> dict:
    return {**MODEL_SPECS[name], **TINY, **overrides}


@pytest.fixture(scope="session")
def tiny_spec():
    """``tiny_spec(zoo_name, **overrides)``: a zoo architecture shrunk to 2 layers, d_model 64."""
    return _tiny_spec


@pytest.fixture(scope="session")
def tokenizer_file():
    """The bundled byte-level BPE (vocabulary 8192; <|bos|>, <|eos|>, <|pad|> are ids 0, 1, 2)."""
    return TOKENIZER_FILE


@pytest.fixture(scope="session", autouse=True)
def _hub_is_off():
    import huggingface_hub

    assert huggingface_hub.is_offline_mode(), "huggingface_hub was imported before tests/conftest.py set HF_HUB_OFFLINE"


@pytest.fixture(scope="session")
def tiny_dense():
    """austen-dense shrunk: LayerNorm, GELU MLP, rotary attention."""
    return build_model(_tiny_spec("austen-dense"), TOKENIZER_FILE).eval()


@pytest.fixture(scope="session")
def tiny_moe():
    """austen-moe shrunk: RMSNorm, 8 gated-SiLU experts, top-2 routing."""
    return build_model(_tiny_spec("austen-moe"), TOKENIZER_FILE).eval()


@pytest.fixture(params=["dense", "moe"])
def tiny_model(request):
    """Each tiny model in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """[2, 7] token ids, BOS first, as the models are fed in training."""
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(3, MODEL_SPECS["austen-dense"]["d_vocab"], (2, 6), generator=gen)
    return torch.cat([torch.zeros(2, 1, dtype=torch.long), body], dim=1)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A zoo-style model directory (config.json, model.safetensors, tokenizer.json) of tiny austen-dense."""
    import json
    import shutil

    from probe.models import save_zoo_weights

    d = tmp_path_factory.mktemp("tinyzoo")
    spec = _tiny_spec("austen-dense")
    torch.manual_seed(0)
    save_zoo_weights(build_model(spec, TOKENIZER_FILE), d / "model.safetensors", dtype=torch.float32)
    (d / "config.json").write_text(json.dumps(spec))
    shutil.copy(TOKENIZER_FILE, d / "tokenizer.json")
    (d / "card.json").write_text("{}")
    return d
