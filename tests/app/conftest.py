"""Tiny feature stores built once per session: random 2-layer models saved in zoo format (so the app loads
them by path), random TopK SAEs, random token contexts. Nothing is downloaded or trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from probe.models import build_model, load_model, save_zoo_weights
from saes.features import build_feature_store
from saes.topk import TopKConfig, TopKSAE

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "app" / "dashboard.py"
D_SAE, DEAD = 128, 127  # feature 127 can never win the top-k: a dead feature
EVAL = {"l0": 8.0, "fvu": 0.25, "explained_variance": 0.75, "ce_score": 0.9, "dead_frac": 0.0078}
HISTORY = [{"step": s, "loss": 2.0 / (s + 1), "fvu": 1.0 / (s + 1), "l0": 8.0} for s in range(0, 50, 10)]


def save_zoo_dir(spec: dict, tokenizer_file: Path, path: Path, seed: int = 0):
    """A random model written as a zoo directory (config.json, weights, tokenizer, card) and loaded back."""
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    save_zoo_weights(build_model(spec, tokenizer_file), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(spec))
    (path / "card.json").write_text(json.dumps({"note": "random test model"}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return load_model(str(path), device="cpu")


def random_sae(model, path: Path, seed: int, site: str = "blocks.1.hook_resid_post") -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKConfig(d_in=model.cfg.d_model, d_sae=D_SAE, k=8, site=site, model=model.cfg.model_name))
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e4
    sae.save(path)
    return sae


def contexts(n: int, n_ctx: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.randint(3, 8192, (n, n_ctx - 1), generator=g)], 1)


@pytest.fixture(scope="session")
def app_env(tmp_path_factory, tiny_spec, tokenizer_file) -> dict[str, Path]:
    """Paths: dense model, its SAE and store; an unrelated SAE; a MoE model, SAE and store."""
    root = tmp_path_factory.mktemp("appenv")
    dense = save_zoo_dir(tiny_spec("austen-dense", model_name="tiny-dense"), tokenizer_file, root / "dense")
    random_sae(dense, root / "sae", seed=0)
    (root / "sae" / "eval.json").write_text(json.dumps(EVAL))
    (root / "sae" / "history.json").write_text(json.dumps(HISTORY))
    build_feature_store(root / "sae", dense, contexts(48, 32), root / "store", model_ref=str(root / "dense"),
                        progress=False)
    random_sae(dense, root / "other_sae", seed=1)
    moe = save_zoo_dir(tiny_spec("austen-moe", model_name="tiny-moe"), tokenizer_file, root / "moe")
    random_sae(moe, root / "moe_sae", seed=2)
    build_feature_store(root / "moe_sae", moe, contexts(8, 16), root / "moe_store", model_ref=str(root / "moe"),
                        progress=False)
    return {name: root / name for name in ("dense", "sae", "store", "other_sae", "moe", "moe_sae", "moe_store")}


@pytest.fixture(scope="session", autouse=True)
def _clear_streamlit_caches():
    """Drop cached stores and models at the end, so DuckDB objects do not outlive the interpreter's teardown."""
    yield
    import gc

    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    gc.collect()


@pytest.fixture
def store_env(app_env, monkeypatch):
    """Point the app at the dense store (environment variables, as ``steerscope app`` does with flags)."""
    for name in ("DICTIONARY", "MODEL", "DEVICE", "VECTORS", "TRANSCODERS"):
        monkeypatch.delenv(f"STEERSCOPE_{name}", raising=False)
    monkeypatch.setenv("STEERSCOPE_STORE", str(app_env["store"]))
    monkeypatch.setenv("STEERSCOPE_DEVICE", "cpu")
    return app_env
