"""The steerscope dashboard (Streamlit): ``steerscope app --store DIR``, or
``streamlit run app/dashboard.py -- --store DIR [--dictionary DIR] [--model NAME] [--device cpu] [--transcoders DIR]``.

This entry script checks the feature store (a friendly page, not a traceback, when it is missing,
corrupt, or from another dictionary), then routes to one file per page under ``views/`` (deliberately not ``pages/``, which Streamlit would auto-discover and serve without
this router).
"""

from __future__ import annotations

import streamlit as st

from app.store import StoreError
from app.views import _ui

st.set_page_config(page_title="steerscope", page_icon=":material/biotech:", layout="wide")
error: StoreError | None = None
store_warning = _ui.store_from_url()  # a Circuit-page link may name a transcoder layer's store
try:
    store = _ui.get_store()
except StoreError as e:
    error = e
if error is not None:  # one hidden page with the friendly message (and no pages/ auto-discovery)
    st.navigation([st.Page(lambda: _ui.store_error(error), title="steerscope", url_path="no-store")],
                  position="hidden").run()
    st.stop()
meta = store.meta

pages = {
    "Features": [
        st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
        st.Page("views/feature.py", title="Feature", icon=":material/bubble_chart:", url_path="feature"),
        st.Page("views/search.py", title="Search", icon=":material/search:", url_path="search"),
    ],
    "Interventions": [
        st.Page("views/steer.py", title="Steer", icon=":material/tune:", url_path="steer"),
        st.Page("views/experts.py", title="Experts", icon=":material/hub:", url_path="experts"),
        st.Page("views/patching.py", title="Patching", icon=":material/swap_horiz:", url_path="patching"),
    ],
    "Circuits": [
        st.Page("views/circuit.py", title="Circuit", icon=":material/account_tree:", url_path="circuit"),
    ],
}
page = st.navigation(pages)

with st.sidebar:
    choices = _ui.stores()
    if len(choices) > 1:  # the main store and transcoder layers' stores (--transcoders DIR with layer_NN/features)
        st.session_state.store_pick = _ui.store_key()
        st.selectbox("Feature store", list(choices), key="store_pick", format_func=_ui.store_label,
                     on_change=lambda: _ui.switch_store(st.session_state.store_pick, picked=True),
                     help="the main store, or the store of one layer's transcoder (its Feature page lists the "
                          "feature's weights-based connections)")
    if store_warning:
        st.warning(store_warning, icon=":material/warning:")
    st.markdown(f"**{meta['architecture']}** · {store.n_features:,} features  \n"
                f"`{meta['site']}`  \nmodel `{_ui.model_ref(store)}` · {meta['n_tokens']:,} tokens")
    st.caption(f"store `{store.path}`")

page.run()
