"""Feature: statistics, activation histogram, logit effects, neighbours and example contexts of one feature.

The feature id lives in the URL (``feature?feature=12``); prev / next / random move through features.
"""

from __future__ import annotations

import random

import streamlit as st

from app.store import StoreError
from app.views import _ui
from probe.errors import SteerscopeError

store = _ui.open_store()
n = store.n_features


def go(i: int) -> None:
    """Show feature ``i`` (wrapping around) and put it in the URL."""
    i %= n
    st.session_state.feature_id = i
    st.session_state.feature_url = str(i)
    st.query_params["feature"] = str(i)


def on_input() -> None:
    go(int(st.session_state.feature_id))


url_error = None
raw = st.query_params.get("feature")
if raw is not None and raw != st.session_state.get("feature_url"):  # a new id arrived through the URL
    st.session_state.feature_url = raw
    try:
        st.session_state.feature_id = store.check_id(raw)
    except StoreError as e:
        url_error = e
st.session_state.setdefault("feature_id", 0)

nav = st.columns([2, 1.1, 1.1, 1.3, 4], vertical_alignment="bottom")
nav[0].number_input("feature id", min_value=0, max_value=n - 1, step=1, key="feature_id", on_change=on_input)
fid = int(st.session_state.feature_id)
nav[1].button("Prev", key="feature_prev", icon=":material/chevron_left:", on_click=go, args=(fid - 1,),
              width="stretch")
nav[2].button("Next", key="feature_next", icon=":material/chevron_right:", on_click=go, args=(fid + 1,),
              width="stretch")
nav[3].button("Random", key="feature_random", icon=":material/casino:", on_click=lambda: go(random.randrange(n)),
              width="stretch")
if url_error is not None:
    st.warning(f"{url_error}. Showing feature {fid} instead.", icon=":material/warning:")

f = store.feature(fid)
st.title(f"Feature {fid}")
st.caption(f"{store.meta['architecture']} · `{store.meta['site']}` · {f['n_fired']:,} of {store.meta['n_tokens']:,} "
           "store tokens fire it")
cols = st.columns(4)
cols[0].metric("density", f"{f['density']:.4%}")
cols[1].metric("max activation", f"{f['max_act']:.3f}")
cols[2].metric("mean activation (when firing)", f"{f['mean_act']:.3f}")
cols[3].page_link("views/steer.py", label="Steer with this feature", icon=":material/tune:",
                  query_params={"features": str(fid)})

if f["n_fired"] == 0:
    st.info(f"Feature {fid} never fired on the {store.meta['n_tokens']:,} tokens of this store (a dead feature): "
            "no examples or histogram. Its logit effects and neighbours come from its decoder row.",
            icon=":material/info:")

left, right = st.columns([2, 3], gap="large")
with left:
    if f["n_fired"]:
        st.plotly_chart(_ui.histogram(list(f["hist_counts"]), f["hist_width"], "activations when firing",
                                      "activation"), key="feature_hist")
    logits = store.logits(fid)
    if logits["top"]:
        st.plotly_chart(_ui.logit_bars(logits["top"], _ui.ORANGE, "promoted tokens (logit effect)"), key="logits_top")
        st.plotly_chart(_ui.logit_bars(logits["bottom"], _ui.BLUE, "suppressed tokens"), key="logits_bottom")
    else:
        st.caption(store.meta.get("logits_note", "no logit effects for this site"))
    with st.popover("How logit effects are computed", icon=":material/help:"):
        st.markdown(f"{store.meta.get('logits_note')}. The direction is centred (LayerNorm models), scaled by the final "
                    "norm's gain and multiplied by W_U; the final norm's division by the residual scale is ignored, "
                    "which changes magnitudes, not the ranking.")
    st.markdown("**Nearest features** (decoder cosine)")
    grid = st.columns(2)
    for k, nb in enumerate(store.neighbours(fid)):
        grid[k % 2].page_link("views/feature.py", label=f"#{nb['neighbour']}  cos {nb['cosine']:.2f}",
                              query_params={"feature": str(nb["neighbour"])}, help=f"density {nb['density']:.3%}")

with right:
    examples = store.examples(fid)
    scale = f["max_act"] or 1.0
    top = [r for r in examples if r["kind"] == "top"]
    if top:
        st.subheader("Top activations")
        st.caption("Token background: activation relative to the feature's maximum (white = 0, orange = max). "
                   "Hover a token for its activation; the bold token is the example's.")
        st.html(_ui.examples_html(top, scale))
        st.subheader("Activation intervals")
        st.caption("Random examples from equal-width activation intervals (SAEDashboard style), highest first.")
        intervals: dict[str, list] = {}
        for r in examples:
            if r["kind"] != "top":
                intervals.setdefault(r["kind"], []).append(r)
        for rows in intervals.values():
            r0 = rows[0]
            st.markdown(f"<small>**{r0['interval_lo']:.2f} – {r0['interval_hi']:.2f}** · "
                        f"{r0['interval_frac']:.1%} of firing tokens</small>", unsafe_allow_html=True)
            st.html(_ui.examples_html(rows, scale))

key = _ui.store_key()
if key != _ui.MAIN and _ui.settings().transcoders:  # the store of one layer's transcoder: its circuit connections
    layer = int(key.split("_")[1])
    st.subheader("Connections (weights-based, prompt-free)")
    try:
        tcs = _ui.load_transcoders(_ui.settings().transcoders, _ui.device())
        model = _ui.live_model(store)
        tcs.check_model(model)
        if store.meta.get("fingerprint") != _ui.fingerprint_of(tcs[layer]):
            raise StoreError(f"this store was built from another dictionary than the layer-{layer} transcoder in "
                             f"{tcs.path}; rebuild it with `steerscope features {tcs.path}/layer_{layer:02d}`")
    except (SteerscopeError, StoreError) as e:
        st.warning(f"No connections: {e}", icon=":material/warning:")
    else:
        st.caption("Through the residual stream an earlier feature i′ writes W_dec[i′] and this one reads W_enc[:, i], "
                   "so W_dec[i′] · W_enc[:, i] is how strongly one drives the other on every input (attention and "
                   "LayerNorm ignored; Dunefsky et al.). Click a connected feature to open it in its layer's store.")
        _ui.connections_panel(model, tcs, layer, fid)
