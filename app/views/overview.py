"""Overview: the model, the dictionary, its evaluation and training curves, and how often features fire."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import streamlit as st

from app.views import _ui

store = _ui.open_store()
meta, cfg = store.meta, store.meta["dictionary"]

st.title("Overview")
st.caption(f"{meta['architecture']} dictionary at `{meta['site']}` of `{_ui.model_ref(store)}`, "
           f"feature store built from {meta['n_tokens']:,} tokens in {meta['n_contexts']:,} contexts "
           f"({meta.get('build', {}).get('tokens_per_s', 0):,.0f} tokens/s)")

m = meta.get("model_cfg", {})
cols = st.columns(6)
for col, (label, value) in zip(cols, [
    ("features", f"{store.n_features:,}"), ("d_in", cfg.get("d_in")), ("k (active)", cfg.get("k", "—")),
    ("layers", m.get("n_layers")), ("d_model", m.get("d_model")),
    ("experts", m.get("num_experts") or "dense")], strict=True):
    col.metric(label, value)

st.subheader("Evaluation")
ev = store.evaluation()
if ev:
    shown = [("L0", "l0", "{:.1f}"), ("FVU", "fvu", "{:.3f}"), ("explained var.", "explained_variance", "{:.3f}"),
             ("CE score", "ce_score", "{:.3f}"), ("KL score", "kl_score", "{:.3f}"),
             ("dead", "dead_frac", "{:.1%}"), ("dense", "dense_frac", "{:.1%}")]
    present = [(label, fmt.format(ev[key])) for label, key, fmt in shown if isinstance(ev.get(key), int | float)]
    for col, (label, value) in zip(st.columns(max(len(present), 1)), present, strict=False):
        col.metric(label, value)
    with st.expander("all metrics"):
        st.json(ev)
else:
    st.info(f"No evaluation yet: run `steerscope eval {store.dictionary_dir() or 'DICTIONARY_DIR'}`, which writes "
            "eval.json next to the dictionary; reload this page to see it.", icon=":material/info:")


def _series(history) -> dict[str, tuple[list, list]]:
    """{metric: (steps, values)} from a list of records or a dict of lists."""
    if isinstance(history, dict):
        steps = history.get("step") or list(range(len(next(iter(history.values()), []))))
        return {k: (steps, v) for k, v in history.items() if k != "step" and isinstance(v, list)}
    out: dict[str, tuple[list, list]] = {}
    for i, rec in enumerate(history if isinstance(history, list) else []):
        for k, v in rec.items() if isinstance(rec, dict) else ():
            if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                out.setdefault(k, ([], []))
                out[k][0].append(rec.get("step", i))
                out[k][1].append(v)
    return out


st.subheader("Training")
series = _series(store.history())
if series:
    names = [k for k in ("loss", "fvu", "l0", "dead_frac", "lr") if k in series] or list(series)[:4]
    for col, name in zip(st.columns(len(names)), names, strict=True):
        steps, values = series[name]
        fig = go.Figure(go.Scatter(x=steps, y=values, mode="lines", line=dict(color=_ui.ORANGE, width=2)))
        col.plotly_chart(_ui.style(fig, height=220, title=name).update_xaxes(title_text="step"), key=f"curve_{name}")
else:
    summary = {k: v for k, v in cfg.get("training", {}).items() if k not in ("config", "history")}
    st.caption("No training curves were recorded with this dictionary. Final training summary:")
    if summary:
        st.json(summary, expanded=False)

st.subheader("How often features fire")
hist = store.density_histogram()
left, right = st.columns([3, 2])
if hist["counts"]:
    e = hist["edges"]
    fig = go.Figure(go.Bar(x=[(a + b) / 2 for a, b in zip(e[:-1], e[1:], strict=True)], y=hist["counts"],
                           width=e[1] - e[0], marker_color=_ui.ORANGE,
                           hovertemplate="density 10^%{x:.2f}: %{y} features<extra></extra>"))
    left.plotly_chart(_ui.style(fig, height=280, title="feature density (log10 of the fraction of tokens)")
                      .update_xaxes(title_text="log10 density").update_yaxes(title_text="features"), key="density")
left.caption(f"{hist['dead']:,} of {store.n_features:,} features never fired on the store's tokens (dead).")
table = store.overview()
right.markdown("**Features by density**")
right.dataframe(table.sort_values("density", ascending=False), hide_index=True, height=300, key="overview_table",
                column_config={"density": st.column_config.NumberColumn(format="%.5f"),
                               "max_act": st.column_config.NumberColumn("max act", format="%.3f"),
                               "mean_act": st.column_config.NumberColumn("mean act", format="%.3f")})

with st.expander("dictionary config"):
    st.json({k: v for k, v in cfg.items() if k != "training"})
with st.expander("store build"):
    st.json({k: meta.get(k) for k in ("source", "n_tokens", "n_contexts", "n_ctx", "params", "build", "logits_note",
                                      "dictionary_path", "dictionary_path_abs", "fingerprint")})
