"""Every dashboard page under Streamlit's AppTest (in-process, no browser), on the tiny stores of conftest."""

from __future__ import annotations

import json
import shutil

import pytest
from streamlit.testing.v1 import AppTest

from app.store import FeatureStore
from tests.app.conftest import DASHBOARD, DEAD, EVAL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def open_app(page: str | None = None, **query: str) -> AppTest:
    at = AppTest.from_file(str(DASHBOARD), default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def html(at: AppTest) -> str:
    return "\n".join(h.value for h in at.html)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def frame(at: AppTest, column: str):
    """The (first) dataframe with this column."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


# ------------------------------------------------------------------ overview and feature
def test_overview_shows_model_dictionary_eval_and_density(store_env):
    at = open_app()
    assert titles(at) == ["Overview"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["features"] == "128" and metrics["experts"] == "dense"
    assert metrics["L0"] == "8.0" and metrics["CE score"] == f"{EVAL['ce_score']:.3f}"
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # three training curves (loss, fvu, l0) and the density histogram
    dead = int((FeatureStore.open(store_env["store"]).overview()["n_fired"] == 0).sum())
    assert dead >= 1 and f"{dead} of 128 features never fired" in texts(at.caption)
    assert len(at.dataframe[0].value) == 128


def test_feature_page_from_url_shows_every_panel(store_env):
    at = open_app("feature", feature="5")
    assert titles(at) == ["Feature 5"]
    f = FeatureStore.open(store_env["store"]).feature(5)
    assert {m.label: m.value for m in at.metric}["max activation"] == f"{f['max_act']:.3f}"
    page = html(at)
    assert page.count('class="ss-text"') >= 2 and 'class="ss-tok"' in page and "activation " in page
    assert "rgb(249,115,22)" in page  # the top example's own token is at the feature's max: full orange
    assert len(at.get("plotly_chart")) == 3  # histogram, promoted and suppressed tokens
    links = [p for p in at.get("page_link")]
    assert sum("cos" in p.proto.label for p in links) == 10  # neighbours


def test_feature_buttons_number_input_and_url(store_env):
    at = open_app("feature", feature="5")
    at.button(key="feature_next").click().run()
    assert titles(at) == ["Feature 6"] and at.query_params["feature"] in ("6", ["6"])
    at.button(key="feature_prev").click().run()
    at.button(key="feature_prev").click().run()
    assert titles(at) == ["Feature 4"]
    at.number_input(key="feature_id").set_value(0).run()
    at.button(key="feature_prev").click().run()  # wraps around
    assert titles(at) == ["Feature 127"] and not at.exception
    at.button(key="feature_random").click().run()
    assert titles(at)[0].startswith("Feature ") and not at.exception


@pytest.mark.parametrize("bad", ["100000", "-3", "abc"])
def test_feature_id_out_of_range_in_url_is_a_friendly_warning(store_env, bad):
    at = open_app("feature", feature=bad)
    assert "Showing feature 0 instead" in texts(at.warning)
    assert titles(at) == ["Feature 0"]


def test_dead_feature_says_so(store_env):
    at = open_app("feature", feature=str(DEAD))
    assert "never fired" in texts(at.info) and not html(at)


# ------------------------------------------------------------------ search
def test_search_text_runs_model_and_dictionary_live(store_env):
    at = open_app("search")
    at.text_area(key="search_text").input("Mr. Darcy looked at Elizabeth").run()
    assert not at.exception
    page = html(at)
    assert 'class="ss-tok"' in page and "of max" in page
    top = frame(at, "of max")
    assert len(top) == 8 and set(top.columns) >= {"feature", "activation", "of max"}
    assert len(frame(at, "max of max")) > 0
    import hashlib

    key = "search_pos_" + hashlib.sha1(b"Mr. Darcy looked at Elizabeth").hexdigest()[:12]  # the key follows the text
    at.selectbox(key=key).set_value(0).run()
    assert "Top features at token 1" in texts(at.markdown)


def test_search_very_long_text_is_cut_with_a_message(store_env):
    at = open_app("search")
    at.text_area(key="search_text").input("the weather at Bath " * 400).run()
    assert not at.exception
    warned = texts(at.warning)
    assert "only the first 2,000 are analysed" in warned and "not analysed" in warned  # chars, then tokens


def test_search_by_token(store_env):
    fs = FeatureStore.open(store_env["store"])
    token = fs.examples(3)[0]["tokens"][fs.examples(3)[0]["center"]]
    at = open_app("search")
    at.text_input(key="token_query").input(token).run()
    assert 3 in set(frame(at, "n_top_examples")["feature"])
    at.text_input(key="token_query").input("zzzz-not-a-token").run()
    assert "No feature has" in texts(at.info)


# ------------------------------------------------------------------ steer
def test_steer_url_coefficient_out_of_range_is_clamped(store_env):
    at = open_app("steer", features="3,5", coeff="500")
    assert "clamped to 100" in texts(at.warning)
    assert at.slider(key="coeff_f3").value == 100.0 and at.slider(key="coeff_f5").value == 100.0
    at = open_app("steer", features="3", coeff="-1e9")
    assert at.slider(key="coeff_f3").value == -100.0


def test_steer_generates_baseline_and_steered_side_by_side(store_env):
    at = open_app("steer", features="3", coeff="60")
    at.text_input(key="steer_prompt").input("She walked").run()
    at.slider(key="steer_tokens").set_value(8).run()
    at.button(key="steer_run").click().run()
    assert not at.exception and not at.error
    gens = [h.value for h in at.html if 'class="ss-gen"' in h.value]
    assert len(gens) == 2 and all("She walked" in g for g in gens)
    assert gens[0] != gens[1]  # a coefficient of 60 on a random 64-wide model changes the text
    at.button(key="steer_run").click().run()  # seeded: the same texts again
    assert [h.value for h in at.html if 'class="ss-gen"' in h.value] == gens


def test_steer_bad_feature_ids_are_reported(store_env):
    at = open_app("steer", features="3, 999, x")
    errors = texts(at.error)
    assert "feature 999 does not exist" in errors and "'x' is not a whole number" in errors
    assert at.slider(key="coeff_f3").value == 8.0


def _gens(at: AppTest) -> list[str]:
    import html as html_lib
    import re

    return [html_lib.unescape(re.sub(r"<[^>]+>", "", h.value)) for h in at.html if 'class="ss-gen"' in h.value]


def test_steer_with_a_saved_erasure_is_the_librarys_generation(store_env, tmp_path, monkeypatch):
    import torch

    from probe.models import load_model
    from steering import INLP, generate

    m = load_model(str(store_env["dense"]), device="cpu")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 16  # a 16-class planted concept: its class means span 15 of the 64 dimensions
    X = torch.randn(400, m.cfg.d_model, generator=g) + 4.0 * torch.randn(16, m.cfg.d_model, generator=g)[y]
    e = INLP.fit(X, y, n_iter=3, seed=0)
    e.provenance["site"] = "blocks.1.hook_resid_post"
    e.save(tmp_path / "vectors" / "planted")
    e.provenance.pop("site")
    e.save(tmp_path / "vectors" / "nosite")
    monkeypatch.setenv("STEERSCOPE_VECTORS", str(tmp_path / "vectors"))
    at = open_app("steer")
    assert "Choose at least one" in texts(at.info) and at.button(key="steer_run").disabled
    at.multiselect(key="steer_erase").select("planted").run()
    assert at.text_input(key="erase_site_planted").value == "blocks.1.hook_resid_post"
    at.slider(key="steer_tokens").set_value(8).run()
    at.button(key="steer_run").click().run()
    assert not at.exception and not at.error, [x.value for x in at.error]
    want = generate(m, "She walked into the room and", steer=[e.at("blocks.1.hook_resid_post")], mode="all",
                    max_new_tokens=8, do_sample=True, temperature=0.8, seed=0)
    base = generate(m, "She walked into the room and", max_new_tokens=8, do_sample=True, temperature=0.8, seed=0)
    assert want != base and _gens(at)[1] == "She walked into the room and" + want  # the page applies the projection
    assert "projection" in texts(at.code).lower() or "inlp" in texts(at.code).lower()
    at.multiselect(key="steer_erase").select("nosite").run()
    at.button(key="steer_run").click().run()
    assert "erasure nosite needs a site" in texts(at.error)


def test_steer_with_a_saved_controller_is_the_librarys_generation(store_env, tmp_path, monkeypatch):
    from probe.models import load_model
    from steering import generate
    from steering.controller import Controller

    m = load_model(str(store_env["dense"]), device="cpu")
    ctl = Controller.fit(m, ["She was very angry.", "He shouted in fury."], ["She smiled warmly.", "He laughed."],
                         alpha=20.0, hidden=8, epochs=50)
    ctl.save(tmp_path / "vectors" / "anger")
    monkeypatch.setenv("STEERSCOPE_VECTORS", str(tmp_path / "vectors"))
    at = open_app("steer")
    at.selectbox(key="steer_controller").select("anger").run()
    assert at.slider(key="steer_alpha").value == 20.0
    at.slider(key="steer_tokens").set_value(8).run()
    at.button(key="steer_run").click().run()
    assert not at.exception and not at.error, [x.value for x in at.error]
    prompt = "She walked into the room and"
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, seed=0)
    want = generate(m, prompt, steer=ctl.vectors_for(m, prompt), mode="all", **kw)
    base = generate(m, prompt, **kw)
    assert want != base and _gens(at) == [prompt + base, prompt + want]  # alpha 20 steers, and the page applies it
    at.slider(key="steer_alpha").set_value(0.0).run()
    at.button(key="steer_run").click().run()
    assert "identical to the baseline" in texts(at.info)


# ------------------------------------------------------------------ experts and patching
def test_experts_on_a_dense_model_is_a_friendly_message(store_env):
    at = open_app("experts")
    assert "is a dense model" in texts(at.info) and not at.get("plotly_chart")


def test_experts_score_switch_and_regenerate(store_env, monkeypatch):
    monkeypatch.setenv("STEERSCOPE_STORE", str(store_env["moe_store"]))
    at = open_app("experts")
    at.button(key="experts_score").click().run()
    assert not at.exception and len(at.get("plotly_chart")) == 1
    assert len(at.multiselect(key="experts_off").value) == 2  # the top two experts are suggested
    at.slider(key="experts_tokens").set_value(6).run()
    at.button(key="experts_generate").click().run()
    assert not at.exception and not at.error
    assert sum('class="ss-gen"' in h.value for h in at.html) == 2


def test_patching_with_a_feature_and_with_das(store_env):
    at = open_app("patching")
    assert at.selectbox(key="patch_site").value == "blocks.1.hook_resid_post"  # a residual site: nothing unread
    at.button(key="patch_run").click().run()
    assert not at.exception and not at.error, texts(at.error)
    labels = {m.label for m in at.metric}
    assert {"effect of patching v", "effect of the whole site"} <= labels
    assert "Illusion check not applicable at blocks.1.hook_resid_post" in texts(at.info)
    assert not at.success and not at.warning  # neither "No illusion flagged" nor "Illusion flagged"
    at.radio(key="patch_dir").set_value("DAS").run()
    at.slider(key="patch_steps").set_value(10).run()
    at.button(key="patch_run").click().run()
    assert not at.exception and "DAS rank 1, trained on the only pair" in texts(at.markdown)
    assert "nothing is held out" in texts(at.markdown)
    at.text_area(key="patch_base").input("Jane met Elizabeth and gave a letter to\nJane saw Elizabeth, then spoke to\n"
                                         "Jane wrote to\nWhen Jane came, she smiled at").run()
    at.text_area(key="patch_source").input("Elizabeth met Jane and gave a letter to\nElizabeth saw Jane, then spoke "
                                           "to\nElizabeth, tired, wrote to\nWhen Elizabeth came, she smiled at").run()
    at.button(key="patch_run").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert "trained on 3 pair(s)" in texts(at.markdown) and "on 1 held-out pair(s)" in texts(at.markdown)


def test_patching_needs_the_dictionary_only_for_feature_directions(store_env, monkeypatch, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(store_env["store"], bare)
    meta = json.loads((bare / "meta.json").read_text())
    for key in ("dictionary_path", "dictionary_path_abs"):
        meta.pop(key, None)
    (bare / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setenv("STEERSCOPE_STORE", str(bare))
    at = open_app("patching")
    assert not at.error, texts(at.error)
    assert "Feature directions need the dictionary" in texts(at.info) and at.button(key="patch_run").disabled
    at.button(key="patch_grid_run").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert any('"heatmap"' in c.proto.spec.lower() for c in at.get("plotly_chart"))
    at.radio(key="patch_dir").set_value("DAS").run()
    at.slider(key="patch_steps").set_value(10).run()
    assert not at.button(key="patch_run").disabled
    at.button(key="patch_run").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert "DAS rank 1" in texts(at.markdown)


def test_patching_grid_locates_the_information(store_env):
    at = open_app("patching")
    at.button(key="patch_grid_run").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert "recovered by copying that one residual-stream" in texts(at.caption)
    charts = at.get("plotly_chart")
    assert charts and any('"Heatmap"' in c.proto.spec or '"heatmap"' in c.proto.spec for c in charts)
    at.text_area(key="patch_source").input("a\nb").run()
    at.button(key="patch_grid_run").click().run()
    assert "as many source prompts as base prompts" in texts(at.error)


def test_patching_bad_inputs_are_one_line_errors(store_env):
    at = open_app("patching")
    at.text_area(key="patch_source").input("a\nb").run()
    at.button(key="patch_run").click().run()
    assert "as many source prompts as base prompts" in texts(at.error)
    at.text_area(key="patch_source").input("Short").run()  # another length: fine at the last token ...
    at.button(key="patch_run").click().run()
    assert not at.error, texts(at.error)
    at.radio(key="patch_pos").set_value("all positions").run()  # ... but not at every position
    at.button(key="patch_run").click().run()
    assert "as many tokens as its source" in texts(at.error)
    at.text_input(key="patch_good").input(" Jane Austen").run()
    at.button(key="patch_run").click().run()
    assert "give exactly one token" in texts(at.error)


# ------------------------------------------------------------------ bad stores
def test_missing_store_directory_is_a_friendly_page(store_env, monkeypatch, tmp_path):
    monkeypatch.setenv("STEERSCOPE_STORE", str(tmp_path / "nowhere"))
    at = open_app()
    assert "does not exist" in texts(at.error) and "steerscope features" in texts(at.markdown)


def test_no_store_given_is_a_friendly_page(store_env, monkeypatch):
    monkeypatch.delenv("STEERSCOPE_STORE")
    assert "no feature store given" in texts(open_app().error)


def test_corrupt_store_is_a_friendly_page(store_env, monkeypatch, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store_env["store"], bad)
    (bad / "examples.parquet").write_bytes(b"not parquet")
    monkeypatch.setenv("STEERSCOPE_STORE", str(bad))
    assert "examples.parquet is corrupt" in texts(open_app().error)
    (bad / "meta.json").write_text("{")
    assert "meta.json is corrupt" in texts(open_app().error)


def test_store_mixing_two_builds_is_refused(store_env, monkeypatch, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(store_env["store"], mixed)
    shutil.copy(store_env["moe_store"] / "logits.parquet", mixed / "logits.parquet")
    monkeypatch.setenv("STEERSCOPE_STORE", str(mixed))
    assert "belongs to another dictionary" in texts(open_app().error)


def test_store_from_another_dictionary_is_refused_on_live_pages(store_env, monkeypatch):
    monkeypatch.setenv("STEERSCOPE_DICTIONARY", str(store_env["other_sae"]))
    at = open_app("search")
    assert "built from another dictionary" in texts(at.error)
    at = open_app("feature", feature="1")  # the stored pages still work
    assert titles(at) == ["Feature 1"]


def test_meta_records_the_eval_history_and_dictionary(store_env):
    meta = json.loads((store_env["store"] / "meta.json").read_text())
    assert meta["eval"] == EVAL and len(meta["history"]) == 5
    assert meta["dictionary_path"] == "../sae"  # store and dictionary share one run directory: relative
    assert meta["dictionary_path_abs"] == str(store_env["sae"].resolve())


# ------------------------------------------------------------------ circuit
def test_circuit_page_without_transcoders_says_how_to_get_them(store_env):
    at = open_app("circuit")
    assert titles(at) == ["Circuit"]
    assert "steerscope transcoders" in texts(at.info)


@pytest.fixture
def transcoders_env(store_env, tmp_path, monkeypatch):
    import warnings

    from probe.models import load_model
    from saes.circuits import train_transcoders

    model = load_model(str(store_env["dense"]), device="cpu")
    texts_ = ["Elizabeth walked to Netherfield through the mud and arrived with her petticoat six inches deep."] * 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train_transcoders(model, texts_, tmp_path / "tc", n_tokens=512, d_sae=32, k=4, batch_size=128, n_ctx=16,
                          progress=False)
    monkeypatch.setenv("STEERSCOPE_TRANSCODERS", str(tmp_path / "tc"))
    return model, tmp_path / "tc"


def test_circuit_page_shows_the_graph_the_library_builds(transcoders_env):
    from saes.circuits import load_transcoders
    from saes.circuits.attribution import attribute

    model, path = transcoders_env
    at = open_app("circuit")
    g = attribute(model, load_transcoders(path), "Mr. Darcy bowed to Elizabeth and said that he", max_feature_nodes=1000)
    data = g.to_json(0.8, 0.98)
    shown = {m.label: m.value for m in at.metric}
    assert shown["replacement"] == f"{g.scores['replacement']:.3f}"
    assert shown["completeness"] == f"{g.scores['completeness']:.3f}"
    assert shown["nodes · links kept"] == f"{len(data['nodes'])} · {len(data['links'])}"
    table = frame(at, "influence")
    assert len(table) == sum(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
    assert at.selectbox(key="circuit_pick").value == table["node"].iloc[0]  # the most influential feature first
    at.text_input(key="circuit_prompt").set_value("   ")
    next(b for b in at.button if b.label == "Trace").click().run()
    assert "empty" in texts(at.error)  # one clear line, no traceback


@pytest.fixture
def layer_store(transcoders_env, store_env):
    """Layer 1's transcoder with a feature store where the app looks for it (layer_01/features)."""
    from saes.features import build_feature_store
    from tests.app.conftest import contexts

    model, path = transcoders_env
    build_feature_store(path / "layer_01", model, contexts(24, 16), path / "layer_01" / "features", progress=False,
                        model_ref=str(store_env["dense"]))
    return model, path


def test_a_transcoder_store_feature_page_lists_its_connections(layer_store):
    from saes.circuits import load_transcoders
    from saes.circuits.connections import de_embedding, upstream

    model, path = layer_store
    tcs = load_transcoders(path)
    at = open_app("feature", store="layer_01", feature="3")
    pick = at.selectbox(key="store_pick")
    assert pick.options == ["main store", "layer 1 transcoder"] and pick.value == "layer_01"
    assert titles(at) == ["Feature 3"]
    assert FeatureStore.open(path / "layer_01" / "features").meta["site"] in texts(at.caption)
    assert "Connections (weights-based, prompt-free)" in [h.value for h in at.subheader]
    de = frame(at, "score")
    assert de["token"].tolist() == [repr(r["token"]) for r in de_embedding(model, tcs, 1, 3)]
    # only layer 1 has a store: upstream (layer 0) features are listed, not linked
    shown = [m.value for m in at.markdown if m.value.startswith("`L")]
    assert shown == [f"`L{r['layer']} #{r['feature']}  ·  {r['weight']:+.4f}`" for r in upstream(tcs, 1, 3)]
    assert "last layer" in texts(at.caption)  # the tiny model has two layers: nothing downstream of layer 1
    pick.set_value("main").run()  # back to the main store: its own feature page, no connections
    assert titles(at) == ["Feature 0"] and "Connections (weights-based, prompt-free)" not in [h.value for h in at.subheader]


def test_an_unknown_store_in_the_url_is_a_warning_line(layer_store):
    at = open_app(store="layer_07")  # the warning shows on the page the link lands on (here the Overview)
    assert "no feature store 'layer_07'" in texts(at.warning) and "main, layer_01" in texts(at.warning)
    assert at.selectbox(key="store_pick").value == "main"


def test_circuit_page_links_a_feature_to_its_layer_store(layer_store):
    at = open_app("circuit")
    layer1 = [o for o in at.selectbox(key="circuit_pick").options if o.startswith("1_")]
    if not layer1:
        pytest.skip("no layer-1 feature survived pruning on this tiny model")
    at.selectbox(key="circuit_pick").set_value(layer1[0]).run()
    link = next(p for p in at.get("page_link") if "Open feature" in p.proto.label)
    assert "layer 1 store" in link.proto.label and "store=layer_01" in link.proto.query_string


def test_circuit_page_refuses_transcoders_of_another_model(store_env, tmp_path, monkeypatch):
    (tmp_path / "tc").mkdir()
    (tmp_path / "tc" / "transcoders.json").write_text("{broken")
    monkeypatch.setenv("STEERSCOPE_TRANSCODERS", str(tmp_path / "tc"))
    at = open_app("circuit")
    assert "unavailable" in texts(at.error) and "damaged" in texts(at.error)
