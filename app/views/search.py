"""Search: the features that fire on your text (the model and dictionary run live), or that belong to a token."""

from __future__ import annotations

import hashlib

import streamlit as st
import torch

from app.views import _ui
from probe.hooks import capture
from probe.sites import layer_of
from probe.tokens import encode, first_real, has_bos

MAX_CHARS = 2000
TOP = 8  # features kept per token
DEFAULT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"

store = _ui.open_store()
st.title("Search")
tab_text, tab_token = st.tabs(["By text", "By token"])


@st.cache_data(show_spinner="Running the model and the dictionary…", max_entries=64)
def analyse(_model, _dictionary, text: str, key: str) -> dict:
    """Top features per token of ``text`` (tokenized as the model does; a BOS is left out): token strings,
    values and feature ids [T, TOP]."""
    site = _dictionary.cfg.site
    toks = encode(_model, text)[None, : _model.cfg.n_ctx].to(_model.cfg.device)
    s = first_real(_model)
    layer = layer_of(site)
    with _ui.model_lock(), torch.no_grad(), capture(_model, [site]) as acts:
        if layer is None:
            _model(toks, return_type=None)
        else:
            _model(toks, stop_at_layer=layer + 1)
        x = acts[site][0, s:].reshape(toks.shape[1] - s, -1)
        codes = _dictionary.encode(x.to(next(_dictionary.parameters()).dtype)).float().cpu()
    vals, idx = codes.topk(min(TOP, codes.shape[1]), dim=-1)
    return {"tokens": [_model.tokenizer.decode([t]) for t in toks[0, s:].tolist()], "vals": vals.tolist(),
            "idx": idx.tolist()}


def feature_links(features: list[int]) -> None:
    cols = st.columns(min(len(features), 6) or 1)
    for k, j in enumerate(features[:6]):
        cols[k].page_link(_ui.FEATURE_PAGE, label=f"feature {j}", icon=":material/open_in_new:",
                          query_params={"feature": str(j)})


with tab_token:  # first in the code: it needs no model, so it works even if live loading fails below
    st.caption("Features whose top examples sit on a token, and features whose logit effect promotes it. "
               "Case and surrounding spaces are ignored.")
    q = st.text_input("Token", key="token_query", placeholder="e.g.  Darcy")
    if q.strip():
        found = store.search_token(q)
        a, b = st.columns(2)
        a.markdown(f"**Fires on {q.strip()!r}** (top examples)")
        a.dataframe(found["fires_on"], hide_index=True, key="token_fires")
        b.markdown(f"**Promotes {q.strip()!r}** (logit effect)")
        b.dataframe(found["promotes"], hide_index=True, key="token_promotes")
        if not found["fires_on"] and not found["promotes"]:
            st.info(f"No feature has {q.strip()!r} among its top examples or its top promoted tokens.")
        feature_links([r["feature"] for r in found["fires_on"] or found["promotes"]])

with tab_text:
    st.session_state.setdefault("search_text", st.query_params.get("q", DEFAULT))
    text = st.text_area("Text", key="search_text", height=110,
                        help=f"At most {MAX_CHARS:,} characters and the model's context are analysed.")
    if len(text) > MAX_CHARS:
        st.warning(f"The text has {len(text):,} characters; only the first {MAX_CHARS:,} are analysed (the limit "
                   "keeps the page responsive).", icon=":material/content_cut:")
        text = text[:MAX_CHARS]
    if not text.strip():
        st.info("Paste some text to see which features fire on each token.")
        st.stop()
    model, dictionary = _ui.live(store)
    n_tok, s = len(encode(model, text, truncate=False)), first_real(model)
    if n_tok > model.cfg.n_ctx:
        st.warning(f"The text is {n_tok - s:,} tokens; the model reads {model.cfg.n_ctx - s:,}, so the rest is not "
                   "analysed.", icon=":material/content_cut:")
    try:
        res = analyse(model, dictionary, text, f"{store.meta['fingerprint']}|{_ui.model_ref(store)}")
    except Exception as e:  # noqa: BLE001  (shown to the user; the page stays usable)
        _ui.fail(e)
        st.stop()
    toks, vals, idx = res["tokens"], res["vals"], res["idx"]
    maxes = store.stats(sorted({j for row in idx for j in row}))
    rel = [[v / (maxes.get(j, {}).get("max_act") or 1.0) if v > 0 else 0.0 for v, j in zip(vr, ir, strict=True)]
           for vr, ir in zip(vals, idx, strict=True)]
    tips = [f"{t!r}: " + ", ".join(f"#{j} {v:.2f} ({r:.0%} of max)" for v, j, r in zip(vr, ir, rr, strict=True) if v > 0)
            for t, vr, ir, rr in zip(toks, vals, idx, rel, strict=True)]
    # without a BOS the first token is the model's attention sink (activations ~10x the others'): it is shown and
    # selectable, but left out of the colours, the default token and the whole-text ranking (the store never
    # saw a sink: its contexts start with a fixed token that is excluded, see probe.tokens)
    sink = 0 if not has_bos(model) and len(toks) > 1 else None
    shade = [0.0 if i == sink else max(r, default=0.0) for i, r in enumerate(rel)]
    st.caption("Each token is coloured by its strongest feature's activation relative to that feature's maximum on "
               "the store (white = 0, orange = max). Hover a token for its top features."
               + (" This model reads no BOS, so the first token is its attention sink: left uncoloured and out of "
                  "the whole-text ranking." if sink is not None else ""))
    st.html(_ui.tokens_html(toks, shade, 1.0, tips=[t or "no feature fires" for t in tips]))

    best = max(range(len(toks)), key=lambda i: shade[i]) if toks else 0
    # the key follows the text: with the same options (0..n-1) Streamlit would keep the last text's labels
    pos = st.selectbox("Token", options=list(range(len(toks))), index=best,
                       key=f"search_pos_{hashlib.sha1(text.encode()).hexdigest()[:12]}",
                       format_func=lambda i: f"{i + 1}: {_ui.show_token(toks[i])!r}")
    rows = [{"feature": j, "activation": round(v, 4), "of max": round(r, 3),
             "density": maxes.get(j, {}).get("density")} for v, j, r in zip(vals[pos], idx[pos], rel[pos], strict=True)
            if v > 0]
    left, right = st.columns(2)
    left.markdown(f"**Top features at token {pos + 1}** ({_ui.show_token(toks[pos])!r})")
    if rows:
        left.dataframe(rows, hide_index=True, key="search_token_table",
                       column_config={"of max": st.column_config.ProgressColumn("of max", min_value=0, max_value=1)})
    else:
        left.info("No feature fires on this token.")
    overall: dict[int, float] = {}
    for i, (rr, ir) in enumerate(zip(rel, idx, strict=True)):
        if i == sink:
            continue
        for r, j in zip(rr, ir, strict=True):
            overall[j] = max(overall.get(j, 0.0), r)
    ranked = sorted((j for j in overall if overall[j] > 0), key=lambda j: -overall[j])[:12]
    right.markdown("**Strongest features over the whole text**")
    right.dataframe([{"feature": j, "max of max": round(overall[j], 3)} for j in ranked], hide_index=True,
                    key="search_overall")
    feature_links([r["feature"] for r in rows])
