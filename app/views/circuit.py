"""Circuit: the attribution graph of a prompt through per-layer transcoders, laid out by layer x position.

Needs the app started with ``--transcoders DIR`` (``steerscope transcoders``; the demo trains them). Click a
feature in the graph to see its weights-based connections and de-embedding; when the feature store is the
one of that layer's transcoder, a link opens its Feature page.
"""

from __future__ import annotations

import json
import math

import plotly.graph_objects as go
import streamlit as st

from app.views import _ui
from probe.errors import SteerscopeError

DEFAULT = "Mr. Darcy bowed to Elizabeth and said that he"
MAX_DRAWN_LINKS = 400
COLORS = {"cross layer transcoder": _ui.ORANGE, "mlp reconstruction error": _ui.GREY, "embedding": _ui.BLUE,
          "logit": "#16a34a"}

store = _ui.open_store()
st.title("Circuit")
st.caption("Attribution graph (circuit-tracer's method): MLPs replaced by per-layer transcoders, attention patterns "
           "and LayerNorm scales frozen, so every edge is a direct linear effect a_s·W_dec[s]·J·W_enc[t]. Nodes are "
           "pruned by influence on the top logits; replacement = share of that influence reaching tokens rather than "
           "error nodes, completeness = share of node inputs not coming from errors.")

path = _ui.settings().transcoders
if not path:
    st.info("No transcoders: train a transcoder for every layer and start the app with them:\n\n"
            "```bash\nsteerscope transcoders --model austen-dense --out runs/tc --n-tokens 500000 --d-sae 4096 --k 32\n"
            "steerscope app --store runs/features --transcoders runs/tc\n```\n`steerscope demo` does both.",
            icon=":material/info:")
    st.stop()
try:
    tcs = _ui.load_transcoders(path, _ui.device())
    model = _ui.load_model(_ui.model_ref(store), _ui.device())  # the store's model, unless the transcoders' is another
    if tcs.model_name not in (None, model.cfg.model_name):
        model = _ui.load_model(tcs.model_name, _ui.device())
    tcs.check_model(model)
except SteerscopeError as e:
    st.error(f"The circuit page is unavailable: {e}", icon=":material/error:")
    st.stop()

with st.form("circuit_form"):
    prompt = st.text_input("Prompt (its next-token prediction is traced)", DEFAULT, key="circuit_prompt")
    c1, c2, c3 = st.columns(3)
    node_t = c1.slider("node threshold", 0.1, 1.0, 0.8, 0.05, key="circuit_node",
                       help="keep the smallest set of nodes holding this share of the influence on the logits")
    edge_t = c2.slider("edge threshold", 0.1, 1.0, 0.98, 0.01, key="circuit_edge",
                       help="keep the edges holding this share of the edge scores")
    cap = c3.number_input("max feature rows", 0, 100_000, 1000, 100, key="circuit_cap",
                          help="incoming edges are computed for at most this many features, most influential first")
    submitted = st.form_submit_button("Trace", icon=":material/account_tree:")

key = (prompt, int(cap))
if submitted or st.session_state.get("circuit_key") != key:
    try:
        with _ui.model_lock(), st.spinner("Tracing…"):
            from saes.circuits.attribution import attribute

            st.session_state.circuit_graph = attribute(model, tcs, prompt, max_feature_nodes=int(cap))
            st.session_state.circuit_key = key
    except SteerscopeError as e:
        _ui.fail(e)
        st.stop()
g = st.session_state.circuit_graph
data = g.to_json(node_t, edge_t)
scores = data["metadata"]["scores"]
cols = st.columns(5)
cols[0].metric("replacement", f"{scores['replacement']:.3f}")
cols[1].metric("completeness", f"{scores['completeness']:.3f}")
cols[2].metric("active features", f"{g.n_features:,}")
cols[3].metric("nodes · links kept", f"{len(data['nodes'])} · {len(data['links'])}")
cols[4].metric("traced in", f"{g.info['wall_time_s']:.1f} s")
st.caption("Top logits: " + ", ".join(f"`{w!r}` {p:.3f}" for w, p in zip(g.info["logit_strs"], g.logit_probs.tolist(),
                                                                          strict=True)))


def layout(nodes: list[dict]) -> dict[str, tuple[float, float]]:
    """x: position (features of one cell spread across it), y: E below layer 0, logits above the last layer."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for n in nodes:
        cells.setdefault((n["layer"], n["ctx_idx"]), []).append(n)
    xy = {}
    for (layer, pos), group in cells.items():
        y = -1.0 if layer == "E" else float(layer)
        group.sort(key=lambda n: -(n["influence"] or 0))
        for i, n in enumerate(group):
            spread = 0.0 if len(group) == 1 else (i / (len(group) - 1) - 0.5) * 0.7
            xy[n["node_id"]] = (pos + spread, y)
    return xy


def figure(data: dict) -> go.Figure:
    nodes, links = data["nodes"], data["links"]
    xy = layout(nodes)
    fig = go.Figure()
    top = sorted(links, key=lambda x: -abs(x["weight"]))[:MAX_DRAWN_LINKS]
    for sign, color in ((1, "rgba(59,130,246,0.35)"), (-1, "rgba(220,38,38,0.35)")):
        xs, ys = [], []
        for x in top:
            if (x["weight"] > 0) == (sign > 0) and x["source"] in xy and x["target"] in xy:
                (x0, y0), (x1, y1) = xy[x["source"]], xy[x["target"]]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": color, "width": 1.2}, hoverinfo="skip",
                                 name="positive edges" if sign > 0 else "negative edges"))
    for kind, color in COLORS.items():
        group = [n for n in nodes if n["feature_type"] == kind]
        if not group:
            continue
        infl = [max(n["influence"] or 0.0, 0.0) for n in group]
        size = [8 + 22 * math.sqrt(v / max(max(infl), 1e-12)) for v in infl] if kind != "embedding" else 12
        text = [f"{n['node_id']}<br>{kind}<br>token {g.token_strs[n['ctx_idx']]!r}<br>"
                + (f"activation {n['activation']:.3f}<br>" if n.get("activation") is not None else "")
                + f"influence {n['influence'] or 0:.4f}" + (f"<br>{n['clerp']}" if n["clerp"] else "") for n in group]
        fig.add_trace(go.Scatter(x=[xy[n["node_id"]][0] for n in group], y=[xy[n["node_id"]][1] for n in group],
                                 mode="markers", name=kind, customdata=[n["node_id"] for n in group],
                                 marker={"color": color, "size": size, "line": {"color": "white", "width": 0.5},
                                         "symbol": "square" if kind == "mlp reconstruction error" else "circle"},
                                 hovertext=text, hoverinfo="text"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(g.n_pos)), ticktext=[repr(t)[1:-1] for t in g.token_strs],
                     tickangle=-45)
    fig.update_yaxes(tickmode="array", tickvals=[-1, *range(g.n_layers), g.n_layers + 1],
                     ticktext=["embed", *[f"L{i}" for i in range(g.n_layers)], "logits"])
    return _ui.style(fig, height=520).update_layout(legend={"orientation": "h", "y": -0.25}, clickmode="event+select")


event = st.plotly_chart(figure(data), key="circuit_plot", on_select="rerun", selection_mode="points",
                        width="stretch")
st.download_button("Download graph JSON (circuit-tracer schema)", json.dumps(data), file_name="graph.json",
                   mime="application/json", icon=":material/download:", key="circuit_download")

features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
chosen = [p.get("customdata") for p in (event.selection.points if event and event.selection else [])]
chosen = [c for c in chosen if isinstance(c, str) and c.count("_") == 2 and not c.startswith("E_")]
st.subheader("Features in the pruned graph")
st.dataframe([{"node": n["node_id"], "layer": int(n["layer"]), "position": n["ctx_idx"],
               "token": g.token_strs[n["ctx_idx"]], "feature": n["feature"], "activation": round(n["activation"], 4),
               "influence": round(n["influence"], 5)} for n in sorted(features, key=lambda n: -n["influence"])],
             width="stretch", hide_index=True, height=240)
options = [n["node_id"] for n in sorted(features, key=lambda n: -n["influence"])]
if chosen and chosen[0] in options:
    st.session_state.circuit_pick = chosen[0]
if options:
    node_id = st.selectbox("Feature (or click one in the graph)", options, key="circuit_pick")
    layer, feat, pos = (int(v) for v in node_id.split("_"))
    st.markdown(f"**Layer {layer}, feature {feat}** at position {pos} (`{g.token_strs[pos]!r}`)")
    tc = tcs[layer]
    layer_store = f"layer_{layer:02d}"
    if layer_store in _ui.stores():
        st.page_link(_ui.FEATURE_PAGE, label=f"Open feature {feat} on the Feature page (layer {layer} store)",
                     icon=":material/bubble_chart:", query_params={"store": layer_store, "feature": str(feat)})
    elif store.meta.get("site") == tc.cfg.site and store.meta.get("d_sae") == tc.cfg.d_sae and \
            store.meta.get("fingerprint") == _ui.fingerprint_of(tc):
        st.page_link(_ui.FEATURE_PAGE, label=f"Open feature {feat} on the Feature page", icon=":material/bubble_chart:",
                     query_params={"feature": str(feat)})
    else:
        st.caption(f"No feature store of this layer's transcoder ({tc.cfg.site}); build one with "
                   f"`steerscope features {tcs.path}/layer_{layer:02d}` (it goes to layer_{layer:02d}/features, "
                   "where the app finds it) to browse its examples.")
    _ui.connections_panel(model, tcs, layer, feat)
