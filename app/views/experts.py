"""Experts (mixture-of-experts models): score experts on a behaviour/control contrast, switch them off or
force them on, and compare generations."""

from __future__ import annotations

import streamlit as st

from app.views import _ui
from probe.errors import SteerscopeError

BEHAVIOUR = "My dearest Elizabeth, I love you most ardently\nShe felt her heart beat with affection\nHe adored her"
CONTROL = "The carriage arrived at noon\nThe estate lies in Derbyshire\nThey walked to the village"

store = _ui.open_store()
st.title("Experts")
st.caption("Scores each (layer, expert) by how much more the router sends behaviour tokens than control tokens to it "
           "(fTRI-style, MoTE), then switches experts off (never routed to) or forces them on, and regenerates.")

choices = _ui.model_choices(store)
ref = st.selectbox("Model", choices, index=0, key="experts_model",
                   help="the store's model, the bundled models, and any the app was started with (--models)")
try:
    model = _ui.load_model(ref, _ui.device())
except SteerscopeError as e:
    _ui.fail(e)
    st.stop()
if not getattr(model.cfg, "num_experts", None):
    st.info(f"`{ref}` is a dense model: it has no experts to score or switch. Expert switching needs a "
            "mixture-of-experts model such as the bundled `austen-moe`; choose it above, or open a feature store "
            "built from one.", icon=":material/info:")
    st.stop()

n_layers, n_experts = model.cfg.n_layers, model.cfg.num_experts
labels = [f"L{layer}E{e}" for layer in range(n_layers) for e in range(n_experts)]
a, b = st.columns(2)
behaviour = a.text_area("Behaviour prompts (one per line)", BEHAVIOUR, key="experts_behaviour", height=110)
control = b.text_area("Control prompts (one per line)", CONTROL, key="experts_control", height=110)
by = st.radio("Score by", ["weight", "selection"], horizontal=True, key="experts_by",
              help="weight: mean routing probability; selection: how often the expert is in the top-k")
if st.button("Score experts", key="experts_score", type="primary", icon=":material/analytics:"):
    from steering import ExpertScores

    lines = [[p for p in t.splitlines() if p.strip()] for t in (behaviour, control)]
    try:
        with _ui.model_lock():
            st.session_state.experts_scores = (ref, ExpertScores.score(model, lines[0], lines[1]))
    except SteerscopeError as e:
        _ui.fail(e)
scored = st.session_state.get("experts_scores")
if scored and scored[0] == ref:
    scores = scored[1]
    fig = scores.heatmap(by)
    st.plotly_chart(_ui.style(fig, height=120 + 36 * n_layers, title=fig.layout.title.text).update_layout(showlegend=False),
                    key="experts_heatmap")
    st.caption(repr(scores))
    top = [f"L{layer}E{e}" for layer, e in scores.top(min(2, len(labels)), by)]
    if st.session_state.get("experts_seeded") != (ref, by):  # suggest the top experts once per scoring
        st.session_state.experts_off, st.session_state.experts_seeded = top, (ref, by)
else:
    st.info("Score the experts to see the layer × expert map, or pick experts to switch by hand below.")

st.subheader("Switch and regenerate")
c1, c2 = st.columns(2)
off = c1.multiselect("Switch off", labels, key="experts_off")
force = c2.multiselect("Force on", labels, key="experts_force")
prompt = st.text_input("Prompt", "She looked at him and", key="experts_prompt")
n_new = st.slider("new tokens", 1, 64, 24, key="experts_tokens")
if st.button("Generate", key="experts_generate", icon=":material/play_arrow:", disabled=not (off or force)):
    from steering import ExpertSwitch, generate

    def pairs(xs: list[str]) -> list[tuple[int, int]]:
        return [(int(x[1:x.index("E")]), int(x[x.index("E") + 1:])) for x in xs]

    try:
        switch = ExpertSwitch(off=pairs(off), force=pairs(force))
        switch.validate(model)
        kw = dict(max_new_tokens=int(n_new), do_sample=True, temperature=0.8, seed=0)
        with _ui.model_lock():
            base = generate(model, prompt, **kw)
            with switch.apply(model):
                switched = generate(model, prompt, **kw)
        st.session_state.experts_result = (prompt + base, prompt + switched, repr(switch))
    except SteerscopeError as e:
        st.session_state.pop("experts_result", None)
        _ui.fail(e)
if not (off or force):
    st.caption("Choose experts to switch off or force on.")
if "experts_result" in st.session_state:
    base, switched, desc = st.session_state.experts_result
    _ui.side_by_side("Baseline", base, desc, switched)
