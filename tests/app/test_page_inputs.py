"""No page takes a model name or path typed in the browser: the Experts page offers an allow-list."""

from __future__ import annotations

from tests.app.test_pages import open_app


def test_experts_offers_only_the_store_model_the_zoo_and_the_allow_list(store_env, monkeypatch):
    at = open_app("experts")
    box = at.selectbox(key="experts_model")
    assert box.options == [str(store_env["dense"]), "austen-dense", "austen-moe"]
    assert not [t for t in at.text_input if t.key == "experts_model"]  # no free-text model field
    monkeypatch.setenv("STEERSCOPE_MODELS", "my-model, austen-moe")
    assert open_app("experts").selectbox(key="experts_model").options == [
        str(store_env["dense"]), "austen-dense", "austen-moe", "my-model"]
