"""What every dashboard page shares: settings, the cached store and live model, token rendering, charts.

Settings come from the command line after ``--`` (``streamlit run app/dashboard.py -- --store DIR``)
or from the environment (``STEERSCOPE_STORE``, ``STEERSCOPE_DICTIONARY``, ``STEERSCOPE_MODEL``,
``STEERSCOPE_DEVICE``, ``STEERSCOPE_VECTORS``, ``STEERSCOPE_TRANSCODERS``); the command line wins.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from app.store import FeatureStore, StoreError
from probe.errors import SteerscopeError

ORANGE, BLUE, GREY = "#f97316", "#3b82f6", "#94a3b8"  # activations (white -> orange), negative effects, neutral
ACT_SCALE = [[0.0, "#ffffff"], [1.0, ORANGE]]
FEATURE_PAGE = "views/feature.py"
MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.86rem;"
OPTIONS = ("store", "dictionary", "model", "device", "vectors", "models", "transcoders")


@dataclass(frozen=True)
class Settings:
    store: str | None  # feature store directory
    dictionary: str | None  # dictionary directory (default: the one recorded in the store)
    model: str | None  # model for load_model (default: the one recorded in the store)
    device: str | None  # cpu or cuda (default: cuda when available)
    vectors: str | None  # a directory of saved steering vectors, offered on the Steer page
    models: str | None  # comma-separated extra model names a page may offer (the only models a browser can pick)
    transcoders: str | None  # a directory of per-layer transcoders (steerscope transcoders), for the Circuit page


def settings() -> Settings:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in OPTIONS:
        parser.add_argument(f"--{name}")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Settings(**{n: getattr(args, n) or os.environ.get(f"STEERSCOPE_{n.upper()}") for n in OPTIONS})


@st.cache_resource(show_spinner=False, max_entries=4)
def _open_store(path: str, stamp: float) -> FeatureStore:
    return FeatureStore.open(path)


MAIN = "main"
KEEP_ON_STORE_CHANGE = ("circuit", "store_", "experts")  # session keys that do not depend on the store


def stores() -> dict[str, str]:
    """The feature stores the app can show, key -> directory: ``main`` (``--store``) and ``layer_NN`` for every
    layer of ``--transcoders`` that has a store at ``TRANSCODERS/layer_NN/features``
    (``steerscope features TRANSCODERS/layer_NN``; the demo builds them)."""
    s = settings()
    out = {MAIN: s.store} if s.store else {}
    if s.transcoders:
        for d in sorted(Path(s.transcoders).expanduser().glob("layer_[0-9][0-9]*")):
            if (d / "features" / "meta.json").is_file():
                out[d.name] = str(d / "features")
    return out


def store_label(key: str) -> str:
    return "main store" if key == MAIN else f"layer {int(key.split('_')[1])} transcoder"


def store_key() -> str:
    """The store this session shows: the sidebar's choice (or the ``?store=`` of a link), else ``main``."""
    choices = stores()
    key = st.session_state.get("store_choice", MAIN)
    return key if key in choices else next(iter(choices), MAIN)


def switch_store(key: str, picked: bool = False) -> None:
    """Show another store: forget what the pages computed from the old one (feature ids, searches, results).
    ``picked`` (the sidebar): the URL's parameters belonged to the old store too, so they go, and ``?store=`` says
    the new one."""
    for k in list(st.session_state):
        if not k.startswith(KEEP_ON_STORE_CHANGE):
            del st.session_state[k]
    st.session_state.store_choice = key
    if picked:
        st.query_params.clear()
        st.query_params["store"] = st.session_state.store_url = key


def store_from_url() -> str | None:
    """Apply a ``?store=KEY`` that just arrived (a Circuit-page link); a warning line when KEY is unknown."""
    raw = st.query_params.get("store")
    if raw is None or raw == st.session_state.get("store_url"):
        return None
    st.session_state.store_url = raw
    choices = stores()
    if raw not in choices:
        return f"no feature store {raw!r} here (these are: {', '.join(choices)}); showing {store_key()}"
    if raw != store_key():
        switch_store(raw)  # keeps store_url (a "store_" key)
    return None


def get_store() -> FeatureStore:
    """The store this session shows (opened once per process and meta.json version); or StoreError."""
    path = stores().get(store_key())
    if not path:
        raise StoreError("no feature store given: start the app with `steerscope app --store DIR` (or set STEERSCOPE_STORE)")
    meta = Path(path).expanduser() / "meta.json"
    return _open_store(str(Path(path).expanduser().resolve()), meta.stat().st_mtime if meta.exists() else 0.0)


def store_error(e: Exception) -> None:
    """The friendly page shown instead of the app when the store cannot be used."""
    st.title("steerscope")
    st.error(str(e), icon=":material/error:")
    st.markdown("A feature store is built from a trained dictionary, its model and a corpus sample:\n\n"
                "```bash\nsteerscope features runs/sae --model austen-dense --corpus austen --out runs/features\n"
                "steerscope app --store runs/features\n```\n`steerscope demo` does every step on the bundled model.")


def open_store() -> FeatureStore:
    """For pages: the store, or the friendly page and a stop."""
    try:
        return get_store()
    except StoreError as e:
        store_error(e)
        st.stop()


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_model(ref: str, device: str | None):
    from probe.models import load_model as _load

    return _load(ref, device=device)


@st.cache_resource(show_spinner="Loading the dictionary…", max_entries=2)
def _load_dictionary(path: str, device: str | None, store_path: str):
    from saes.base import load_dictionary

    d = load_dictionary(path, device=device or "cpu")
    FeatureStore.open(store_path).check_dictionary(d)
    return d


@st.cache_resource(show_spinner="Loading the transcoders…", max_entries=2)
def load_transcoders(path: str, device: str | None):
    from saes.circuits import load_transcoders as _load

    return _load(path).to(device or "cpu")


def fingerprint_of(dictionary) -> str:
    from saes.base import fingerprint

    return fingerprint(dictionary)


@st.cache_resource(show_spinner=False)
def model_lock() -> threading.RLock:
    """One lock per process around live model use: steering and patching add hooks to the shared cached model."""
    return threading.RLock()


def model_ref(store: FeatureStore) -> str:
    return settings().model or store.meta.get("model") or ""


def model_choices(store: FeatureStore) -> list[str]:
    """The models a page may offer: the store's own, the bundled zoo, and the ``--models`` allow-list. A page never
    takes a free-text model name or path (that would let a browser probe the server's files or start downloads)."""
    from probe.zoo import available

    extra = [m.strip() for m in (settings().models or "").split(",") if m.strip()]
    return list(dict.fromkeys([model_ref(store), *available(), *extra]))


def device() -> str:
    from probe.models import resolve_device

    return resolve_device(settings().device)


def live_model(store: FeatureStore):
    """The store's model for live pages that need no dictionary, loaded once per process; a friendly error
    stops the page."""
    try:
        return load_model(model_ref(store), device())
    except SteerscopeError as e:
        st.error(f"Live analysis is unavailable: {e}", icon=":material/error:")
        st.stop()


def dictionary_dir(store: FeatureStore):
    """The dictionary behind ``store``: ``--dictionary`` overrides the main store's, a transcoder store's is its layer."""
    return (settings().dictionary if store_key() == MAIN else None) or store.dictionary_dir()


def live(store: FeatureStore):
    """(model, dictionary) for live pages, loaded once per process; a friendly error stops the page."""
    path = dictionary_dir(store)
    try:
        if not path:
            raise StoreError(f"the dictionary this store was built from is not at {store.meta.get('dictionary_path_abs') or '?'} "
                             "any more; start the app with --dictionary DIR")
        model = load_model(model_ref(store), device())
        return model, _load_dictionary(str(path), device(), str(store.path))
    except SteerscopeError as e:
        st.error(f"Live analysis is unavailable: {e}", icon=":material/error:")
        st.stop()


def token_difference(base: list[int], other: list[int]) -> dict:
    """Where two generations' token ids first differ (``first``: None when identical), how many positions
    differ (``n_diff``) out of ``n``."""
    n = max(len(base), len(other))
    differ = [i for i in range(n) if i >= len(base) or i >= len(other) or base[i] != other[i]]
    return {"first": differ[0] if differ else None, "n_diff": len(differ), "n": n}


def fail(e: Exception) -> None:
    st.error(str(e) if isinstance(e, SteerscopeError) else f"{type(e).__name__}: {e}", icon=":material/error:")


# ------------------------------------------------------------------ token text
def act_color(frac: float) -> str:
    """White (0) to orange (1): the one colour scale for activations across the app."""
    f = min(max(frac, 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * f) for c in (249, 115, 22))
    return f"rgb({r},{g},{b})"


def show_token(tok: str) -> str:
    return tok.replace("\n", "↵").replace("\t", "⇥") or "∅"


def tokens_html(tokens: list[str], acts: list[float], scale: float, center: int | None = None,
                tips: list[str] | None = None) -> str:
    """Monospace tokens, background by act / scale, the activation (or ``tips``) in a tooltip."""
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts, strict=True)):
        tip = tips[i] if tips else f"{tok!r}  activation {a:.3f}"
        extra = "font-weight:700;border-bottom:2px solid #9a3412;" if i == center else ""
        cls = "ss-tok ss-center" if i == center else "ss-tok"
        spans.append(f'<span class="{cls}" title="{html.escape(tip)}" style="background:{act_color(a / scale if scale > 0 else 0)};'
                     f'display:inline-block;white-space:pre;padding:0 1px;margin:1px 0;border-radius:3px;{extra}">{html.escape(show_token(tok))}</span>')
    return f'<div class="ss-text" style="{MONO}line-height:1.9;margin:2px 0;flex:1;min-width:0">{"".join(spans)}</div>'


def examples_html(rows: list[dict], scale: float) -> str:
    """Example windows, one per line, with the activation at the centre token on the left."""
    lines = []
    for r in rows:
        body = tokens_html(list(r["tokens"]), list(r["acts"]), scale, r["center"],
                           [f"{t!r}  activation {a:.3f}  (context {r['context']}, position {r['position'] - r['center'] + k})"
                            for k, (t, a) in enumerate(zip(r["tokens"], r["acts"], strict=True))])
        lines.append(f'<div class="ss-example" style="display:flex;gap:0.6rem;align-items:baseline;border-bottom:1px solid #f1f5f9">'
                     f'<span class="ss-act" style="{MONO}color:#64748b;min-width:3.6rem;text-align:right">{r["act"]:.2f}</span>'
                     f"{body}</div>")
    return "".join(lines)


# ------------------------------------------------------------------ charts
def style(fig: go.Figure, height: int = 260, title: str | None = None) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=8, r=8, t=36 if title else 8, b=8), title=title,
                      plot_bgcolor="white", paper_bgcolor="white", showlegend=False, bargap=0.05)
    fig.update_xaxes(gridcolor="#f1f5f9", zeroline=False)
    fig.update_yaxes(gridcolor="#f1f5f9", zeroline=False)
    return fig


def histogram(counts: list[int], width: float, title: str, xlabel: str) -> go.Figure:
    xs = [(k + 0.5) * width for k in range(len(counts))]
    fig = go.Figure(go.Bar(x=xs, y=counts, width=[width] * len(counts), marker_color=ORANGE,
                           hovertemplate="%{x:.3g}: %{y} tokens<extra></extra>"))
    return style(fig, title=title).update_xaxes(title_text=xlabel).update_yaxes(title_text="tokens")


def logit_bars(rows: list[dict], color: str, title: str) -> go.Figure:
    labels = [f"{show_token(r['token'])!r}" for r in rows][::-1]
    fig = go.Figure(go.Bar(x=[r["value"] for r in rows][::-1], y=labels, orientation="h", marker_color=color,
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    return style(fig, height=40 + 22 * max(len(rows), 1), title=title).update_yaxes(tickfont=dict(family="monospace"))


def side_by_side(left_title: str, left: str, right_title: str, right: str) -> None:
    a, b = st.columns(2)
    for col, title, text, bg in ((a, left_title, left, "#f8fafc"), (b, right_title, right, "#fff7ed")):
        col.markdown(f"**{title}**")
        col.html(f'<div class="ss-gen" style="{MONO}white-space:pre-wrap;background:{bg};border:1px solid #e2e8f0;'
                 f'border-radius:6px;padding:0.6rem;min-height:4rem">{html.escape(text)}</div>')


def connections_panel(model, tcs, layer: int, feature: int) -> None:
    """A transcoder feature's prompt-free connections (Dunefsky et al.): de-embedding, strongest upstream and
    downstream virtual weights; each connected feature links to its layer's Feature page when that store exists."""
    from saes.circuits.connections import de_embedding, downstream, upstream

    have = stores()
    c1, c2, c3 = st.columns(3)
    c1.markdown("**De-embedding** (tokens whose embedding drives it most, W_E · W_enc)")
    c1.dataframe([{"token": repr(r["token"]), "score": round(r["score"], 3)}
                  for r in de_embedding(model, tcs, layer, feature)], hide_index=True, width="stretch")
    for col, title, rows, none in ((c2, "**Upstream** (W_dec[l′] · W_enc, earlier layers)",
                                    upstream(tcs, layer, feature), "the first layer: no earlier transcoder writes to it"),
                                   (c3, "**Downstream** (W_dec · W_enc[l′], later layers)",
                                    downstream(tcs, layer, feature), "the last layer: no later transcoder reads it")):
        col.markdown(title)
        if not rows:
            col.caption(none)
        for r in rows:
            label = f"L{r['layer']} #{r['feature']}  ·  {r['weight']:+.4f}"
            target = f"layer_{r['layer']:02d}"
            if target in have:
                col.page_link(FEATURE_PAGE, label=label, query_params={"store": target, "feature": str(r["feature"])})
            else:
                col.markdown(f"`{label}`")
