"""app.store (read-only DuckDB queries) and app.commands_app (the ``features`` and ``app`` commands)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import typer
from typer.testing import CliRunner

from app.commands_app import register
from app.store import FeatureStore, StoreError
from probe.store import ActivationStore
from saes.base import load_dictionary
from tests.app.conftest import D_SAE, DEAD, contexts


@pytest.fixture(scope="module")
def fs(app_env):
    return FeatureStore.open(app_env["store"])


def test_feature_examples_logits_neighbours(fs):
    f = fs.feature(3)
    assert f["feature"] == 3 and 0 < f["density"] < 1 and f["max_act"] >= f["mean_act"] > 0
    ex = fs.examples(3)
    kinds = [r["kind"] for r in ex]
    assert kinds[0] == "top" and kinds.count("top") == min(20, f["n_fired"])
    assert [r["act"] for r in ex if r["kind"] == "top"] == sorted((r["act"] for r in ex if r["kind"] == "top"), reverse=True)
    lows = [r["interval_lo"] for r in ex if r["kind"] != "top"]
    assert lows == sorted(lows, reverse=True)  # highest interval first
    assert all(len(r["tokens"]) == len(r["acts"]) == len(r["token_ids"]) for r in ex)
    logits = fs.logits(3)
    assert len(logits["top"]) == len(logits["bottom"]) == 10
    assert logits["top"][0]["value"] >= logits["top"][-1]["value"] > logits["bottom"][-1]["value"]
    nb = fs.neighbours(3)
    assert len(nb) == 10 and 3 not in {r["neighbour"] for r in nb}
    assert [r["cosine"] for r in nb] == sorted((r["cosine"] for r in nb), reverse=True)


def test_ids_histogram_overview_and_token_search(fs):
    for bad, msg in ((D_SAE, "does not exist"), (-1, "does not exist"), ("3.5", "not a whole number")):
        with pytest.raises(StoreError, match=msg):
            fs.feature(bad)
    assert fs.check_id(" 7 ") == 7
    hist = fs.density_histogram(bins=10)
    assert sum(hist["counts"]) + hist["dead"] == D_SAE and hist["dead"] >= 1
    table = fs.overview()
    assert len(table) == D_SAE and table.loc[DEAD, "n_fired"] == 0
    ex = fs.examples(5)[0]
    found = fs.search_token("  " + ex["tokens"][ex["center"]].upper() + " ")
    assert 5 in {r["feature"] for r in found["fires_on"]}
    top_logit = fs.logits(5)["top"][0]["token"]
    assert 5 in {r["feature"] for r in fs.search_token(top_logit)["promotes"]}
    assert fs.search_token("   ") == {"fires_on": [], "promotes": []}
    assert set(fs.stats([1, 2])) == {1, 2}


def test_queries_from_many_threads(fs):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: len(fs.examples(i % 100)) + len(fs.neighbours(i % 100)), range(200)))
    assert len(results) == 200 and all(r >= 10 for r in results)


def test_the_store_knows_its_dictionary(fs, app_env):
    fs.check_dictionary(load_dictionary(app_env["sae"]))
    with pytest.raises(StoreError, match="built from another dictionary"):
        fs.check_dictionary(load_dictionary(app_env["other_sae"]))


def test_open_refuses_incomplete_or_foreign_directories(app_env, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="no meta.json"):
        FeatureStore.open(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(app_env["store"], copy)
    (copy / "neighbours.parquet").unlink()
    with pytest.raises(StoreError, match="neighbours.parquet is missing"):
        FeatureStore.open(copy)
    (copy / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreError, match="not the meta of a steerscope feature store"):
        FeatureStore.open(copy)


# ------------------------------------------------------------------ commands
@pytest.mark.parametrize("table", ["features", "examples", "logits", "neighbours", "vocab"])
def test_one_flipped_byte_in_any_table_is_caught_when_the_store_opens(app_env, tmp_path, table):
    store = tmp_path / "store"
    shutil.copytree(app_env["store"], store)
    file = store / f"{table}.parquet"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the column data: Parquet's footer still parses
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{table}.parquet is corrupted .*sha256"):
        FeatureStore.open(store)
    file.write_bytes(bytes(data[:-10]))  # the footer goes: Parquet itself says so
    with pytest.raises(StoreError, match=f"{table}.parquet is corrupt"):
        FeatureStore.open(store)


def test_a_table_of_another_size_is_caught(app_env, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(app_env["store"], store)
    meta = json.loads((store / "meta.json").read_text())
    meta["tables"]["features"]["bytes"] += 1
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="features.parquet is truncated or altered"):
        FeatureStore.open(store)


def test_a_store_built_before_table_checksums_still_opens(app_env, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(app_env["store"], store)
    meta = json.loads((store / "meta.json").read_text())
    assert set(meta.pop("tables")) == {"features", "examples", "logits", "neighbours", "vocab"}
    (store / "meta.json").write_text(json.dumps(meta))
    assert FeatureStore.open(store).n_features == D_SAE


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_features_command_builds_from_an_activation_store(cli, app_env, tmp_path):
    from probe.models import load_model

    model = load_model(str(app_env["dense"]), device="cpu")
    ActivationStore.build(model, contexts(6, 16), ["blocks.1.hook_resid_post"], 90, tmp_path / "acts", progress=False)
    res = cli("features", app_env["sae"], "--model", app_env["dense"], "--store", tmp_path / "acts", "--out",
              tmp_path / "fs", "--device", "cpu", "--no-progress")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"): res.stdout.rindex("}") + 1])
    assert summary["features"] == D_SAE and summary["n_tokens"] == 90 and summary["tokens_per_s"] > 0
    assert FeatureStore.open(tmp_path / "fs").meta["source"].startswith("store:")


def test_commands_fail_with_one_line_errors(cli, app_env, tmp_path):
    res = cli("app", "--store", tmp_path / "nowhere")
    assert isinstance(res.exception, StoreError) and "does not exist" in str(res.exception)
    nomodel = tmp_path / "sae"
    shutil.copytree(app_env["sae"], nomodel)
    cfg = json.loads((nomodel / "cfg.json").read_text())
    (nomodel / "cfg.json").write_text(json.dumps({**cfg, "model": None}))
    res = cli("features", nomodel, "--out", tmp_path / "fs", "--device", "cpu")
    assert "names no model; pass --model" in str(res.exception)
