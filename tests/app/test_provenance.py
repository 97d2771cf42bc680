"""A feature store always knows its dictionary's directory and shows the evaluation written beside it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from app.store import FeatureStore
from probe.models import load_model
from saes.base import fingerprint, load_dictionary
from saes.features import build_feature_store
from saes.metrics import evaluate
from tests.app.conftest import EVAL, contexts, random_sae


@pytest.fixture(scope="module")
def dense(app_env):
    return load_model(str(app_env["dense"]), device="cpu")


def build(sae, model, out, **kw):
    return build_feature_store(sae, model, contexts(8, 16), out, progress=False, **kw)


def test_a_loaded_object_records_its_directory_relative_to_the_run(dense, tmp_path):
    random_sae(dense, tmp_path / "run" / "sae", seed=3)
    meta = build(load_dictionary(tmp_path / "run" / "sae"), dense, tmp_path / "run" / "features")
    assert meta["dictionary_path"] == "../sae"
    assert FeatureStore.open(tmp_path / "run" / "features").dictionary_dir() == (tmp_path / "run" / "sae").resolve()
    assert not (tmp_path / "run" / "features" / "dictionary").exists()


def test_outside_the_run_directory_the_path_is_absolute(dense, tmp_path):
    random_sae(dense, tmp_path / "elsewhere" / "sae", seed=3)
    meta = build(tmp_path / "elsewhere" / "sae", dense, tmp_path / "run" / "features")
    assert meta["dictionary_path"] == str((tmp_path / "elsewhere" / "sae").resolve())


def test_a_never_saved_dictionary_is_saved_beside_the_store(dense, tmp_path):
    sae = random_sae(dense, tmp_path / "unused", seed=4)
    sae.source_path = None  # as if it was only ever in memory
    build(sae, dense, tmp_path / "features")
    store = FeatureStore.open(tmp_path / "features")
    assert store.dictionary_dir() == (tmp_path / "features" / "dictionary").resolve()
    store.check_dictionary(load_dictionary(store.dictionary_dir()))  # the same weights


def test_an_object_changed_after_loading_is_not_credited_to_its_old_directory(dense, tmp_path):
    random_sae(dense, tmp_path / "sae", seed=5)
    sae = load_dictionary(tmp_path / "sae")
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    build(sae, dense, tmp_path / "features")
    store = FeatureStore.open(tmp_path / "features")
    assert store.dictionary_dir() == (tmp_path / "features" / "dictionary").resolve()
    assert fingerprint(load_dictionary(store.dictionary_dir())) == store.meta["fingerprint"]


def test_the_run_directory_can_move(dense, tmp_path):
    random_sae(dense, tmp_path / "a" / "sae", seed=6)
    build(tmp_path / "a" / "sae", dense, tmp_path / "a" / "features")
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert FeatureStore.open(tmp_path / "b" / "features").dictionary_dir() == (tmp_path / "b" / "sae").resolve()
    shutil.rmtree(tmp_path / "b" / "sae")
    assert FeatureStore.open(tmp_path / "b" / "features").dictionary_dir() is None


def test_an_evaluation_written_after_the_build_shows_without_a_rebuild(dense, tmp_path):
    sae = random_sae(dense, tmp_path / "sae", seed=7)
    build(tmp_path / "sae", dense, tmp_path / "features")
    store = FeatureStore.open(tmp_path / "features")
    assert store.evaluation() is None
    ev = evaluate(sae, dense, contexts(4, 16, seed=1), out=tmp_path / "sae")
    assert ev["fingerprint"] == store.meta["fingerprint"]
    assert store.evaluation() == json.loads((tmp_path / "sae" / "eval.json").read_text())


def test_an_evaluation_of_another_dictionary_is_ignored(dense, tmp_path):
    random_sae(dense, tmp_path / "sae", seed=8)
    build(tmp_path / "sae", dense, tmp_path / "features")
    (tmp_path / "sae" / "eval.json").write_text(json.dumps({**EVAL, "fingerprint": "0" * 32}))
    assert FeatureStore.open(tmp_path / "features").evaluation() is None
    (tmp_path / "sae" / "eval.json").write_text(json.dumps(EVAL))  # unstamped (older builds): shown
    assert FeatureStore.open(tmp_path / "features").evaluation() == EVAL


def test_a_reused_store_without_a_recorded_dictionary_gets_one(dense, tmp_path):
    sae = random_sae(dense, tmp_path / "sae", seed=9)
    build(sae, dense, tmp_path / "features")
    meta_file = tmp_path / "features" / "meta.json"
    old = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**old, "dictionary_path": None, "dictionary_path_abs": None}))  # an older build
    assert FeatureStore.open(tmp_path / "features").dictionary_dir() is None
    again = build(sae, dense, tmp_path / "features")  # reused, not rebuilt
    assert again["build"] == old["build"]
    assert FeatureStore.open(tmp_path / "features").dictionary_dir() == (tmp_path / "sae").resolve()


# ------------------------------------------------------------------ the pages on such stores
@pytest.fixture
def orphan(store_env, tmp_path, monkeypatch):
    """A copy of the dense store whose dictionary directory is gone."""
    store = tmp_path / "orphan"
    shutil.copytree(store_env["store"], store)
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "dictionary_path": str(tmp_path / "gone"),
                                                 "dictionary_path_abs": str(tmp_path / "gone")}))
    monkeypatch.setenv("STEERSCOPE_STORE", str(store))
    return store


def test_overview_shows_an_evaluation_written_after_the_build(store_env, tmp_path, monkeypatch, dense):
    from tests.app.test_pages import open_app

    shutil.copytree(store_env["sae"], tmp_path / "run" / "sae")
    (tmp_path / "run" / "sae" / "eval.json").unlink()
    build(tmp_path / "run" / "sae", dense, tmp_path / "run" / "features", model_ref=str(store_env["dense"]))
    monkeypatch.setenv("STEERSCOPE_STORE", str(tmp_path / "run" / "features"))
    assert "No evaluation yet" in "\n".join(i.value for i in open_app().info)
    later = {**EVAL, "fvu": 0.123, "ce_score": 0.456}
    (tmp_path / "run" / "sae" / "eval.json").write_text(json.dumps(later))
    metrics = {m.label: m.value for m in open_app().metric}
    assert metrics["FVU"] == "0.123" and metrics["CE score"] == "0.456"


def test_steer_with_saved_vectors_needs_no_dictionary(orphan, tmp_path, monkeypatch, dense):
    from steering import SteeringVector
    from tests.app.test_pages import open_app

    g = torch.Generator().manual_seed(0)
    SteeringVector.from_direction(torch.randn(dense.cfg.d_model, generator=g), "blocks.0.hook_resid_post",
                                  coeff=40.0).save(tmp_path / "vectors" / "random")
    monkeypatch.setenv("STEERSCOPE_VECTORS", str(tmp_path / "vectors"))
    at = open_app("steer")
    at.multiselect(key="steer_saved").select("random").run()
    at.slider(key="steer_tokens").set_value(8).run()
    at.button(key="steer_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    gens = [h.value for h in at.html if 'class="ss-gen"' in h.value]
    assert len(gens) == 2 and gens[0] != gens[1]
    report = "\n".join(m.value for m in at.markdown if "ss-diff" in m.value)
    assert "departs from the baseline at generated token" in report


def test_live_dictionary_pages_explain_a_missing_dictionary(orphan):
    from tests.app.test_pages import open_app

    at = open_app("search")
    assert "is not at" in "\n".join(e.value for e in at.error) and "--dictionary DIR" in "\n".join(e.value for e in at.error)


def test_token_difference_counts_positions():
    from app.views._ui import token_difference

    assert token_difference([1, 2, 3], [1, 2, 3]) == {"first": None, "n_diff": 0, "n": 3}
    assert token_difference([1, 2, 3], [1, 5, 3, 4]) == {"first": 1, "n_diff": 2, "n": 4}
