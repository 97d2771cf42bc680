"""Patching: patch a direction (a dictionary feature, or one learned by DAS) from source runs into base runs,
measure the effect on a logit difference, and check it for the subspace-patching illusion.

Only the "feature" direction needs the dictionary; Locate (the layer x position grid) and DAS need the model only.
Prompts may differ in length: the metric is read at each prompt's own last token (``steering.padding``)."""

from __future__ import annotations

import streamlit as st
import torch

from app.views import _ui
from probe.errors import SteerscopeError

BASE = "When Elizabeth and Jane walked to the village, Jane gave a letter to"
SOURCE = "When Elizabeth and Jane walked to the village, Elizabeth gave a letter to"

store = _ui.open_store()
st.title("Patching")
st.caption("Runs each base prompt with the activation at a site moved toward its source prompt along one direction "
           "v (h' = h_b + (v·(h_s − h_b)/|v|²) v), and reports the change in logit(source answer) − logit(base answer) "
           "as a fraction of the source − base gap (1 = behaves like the source). The illusion check (Makelov et al.) "
           "splits v into the part later layers read and the part they cannot see.")
model = _ui.live_model(store)
has_dictionary = bool(_ui.dictionary_dir(store))

a, b = st.columns(2)
base_text = a.text_area("Base prompts (one per line)", BASE, key="patch_base", height=100)
source_text = b.text_area("Source prompts (one per line, paired with the base lines)", SOURCE, key="patch_source",
                          height=100)
c1, c2 = st.columns(2)
good = c1.text_input("Source answer (one token)", " Jane", key="patch_good")
bad = c2.text_input("Base answer (one token)", " Elizabeth", key="patch_bad")

write_site = store.meta.get("write_site") or store.meta["site"]
sites = [write_site] + [s for layer in range(model.cfg.n_layers) for s in
                        (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post") if s != write_site]
c1, c2, c3 = st.columns(3)
site = c1.selectbox("Site", sites, key="patch_site", help="feature directions live at the site the dictionary writes to")
where = c2.radio("Positions", ["last token", "all positions"], key="patch_pos", horizontal=True)
kind = c3.radio("Direction", ["feature", "DAS"], key="patch_dir", horizontal=True,
                help="a dictionary feature's decoder row, or a rank-1 direction trained by distributed alignment search")
c1, c2 = st.columns([1, 2])
if kind == "feature":
    feature = c1.number_input("feature", 0, store.n_features - 1, 0, key="patch_feature")
    if not has_dictionary:
        c2.info("Feature directions need the dictionary, and this store records none that is still on disk: start "
                "the app with `--dictionary DIR`. Locate and DAS work without it.", icon=":material/info:")
else:
    steps = c1.slider("DAS training steps", 10, 300, 100, step=10, key="patch_steps")
    c2.caption("DAS trains on about three quarters of the pairs and reports interchange accuracy on the others "
               "(held out); with a single pair nothing is held out.")


def answer_id(text: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        raise SteerscopeError(f"the answer {text!r} is {len(ids)} tokens; give exactly one token (mind the leading space)")
    return ids[0]


def prompts(text: str) -> list[str]:
    return [p for p in text.splitlines() if p.strip()]


def paired():
    """Base and source batches (right-padded; a base and its source may differ in length) and the answer ids."""
    from steering.patching import paired_tokens

    base, source = prompts(base_text), prompts(source_text)
    if not base or len(base) != len(source):
        raise SteerscopeError(f"give as many source prompts as base prompts ({len(base)} vs {len(source)}), at least one")
    base_t, source_t = paired_tokens(model, base, source)
    return base_t, source_t, answer_id(good), answer_id(bad)


def grid():
    """Activation patching of the whole residual stream, one (layer, position) at a time."""
    from steering.padding import position_labels
    from steering.patching import logit_diff, patching_grid

    base_t, source_t, g, b = paired()
    n = model.cfg.n_layers
    sites = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    found = patching_grid(model, base_t, source_t, sites, logit_diff(g, b))
    return found, position_labels(model, base_t, source_t, found.positions)


def das_direction(base_t, source_t, g: int) -> tuple[torch.Tensor, str]:
    """A rank-1 DAS direction trained on some pairs, with its interchange accuracy on the held-out others."""
    from steering import split_pairs, train_das

    expected = torch.full((len(base_t),), g)
    train, test = split_pairs(len(base_t), test_frac=0.25, seed=0)
    held = (base_t[test], source_t[test], expected[test]) if len(test) else None
    das = train_das(model, base_t[train], source_t[train], expected[train], site, position=-1, rank=1,
                    steps=int(steps), test=held)
    if das.test_iia is None:
        what = (f"DAS rank 1, trained on the only pair (interchange accuracy {das.iia:.2f} on it; with one pair "
                "nothing is held out, so this says nothing about other prompts — add pairs to test it)")
    else:
        what = (f"DAS rank 1, trained on {das.n_train} pair(s): interchange accuracy {das.iia:.2f} on them, "
                f"{das.test_iia:.2f} on {das.n_test} held-out pair(s)")
    return das.basis[:, 0].to(model.cfg.device), what


def run() -> dict:
    from steering import illusion_diagnostics
    from steering.illusion import default_reader
    from steering.patching import cache_site, logit_diff

    base_t, source_t, g, b = paired()
    width = cache_site(model, base_t[:1], site).shape[-1]
    out = {}
    if kind == "feature":
        _, dictionary = _ui.live(store)  # a friendly error and a stop when it cannot be loaded
        v = dictionary.W_dec[int(feature)].detach().float().to(model.cfg.device)
        if v.shape[0] != width:
            raise SteerscopeError(f"feature directions are {v.shape[0]} wide, {site} is {width}; patch at {write_site}")
        out["direction"] = f"feature {int(feature)} decoder row"
    else:
        v, out["direction"] = das_direction(base_t, source_t, g)
    reader = default_reader(model, site) if site.endswith("mlp.hook_post") else torch.eye(width)
    out["report"] = illusion_diagnostics(model, base_t, source_t, site, v, logit_diff(g, b), reader=reader,
                                         positions=-1 if where == "last token" else None)
    out["reader"] = "W_out (MLP neurons are read only through it)" if reader.shape[0] != reader.shape[1] else \
        "the identity: the residual stream is read in full, so v has no invisible part"
    return out


def act(key: str, message: str, compute) -> None:
    """Run ``compute`` under the model lock into ``st.session_state[key]``; a user error clears it and shows one line."""
    with st.spinner(message):
        try:
            with _ui.model_lock():
                st.session_state[key] = compute()
        except SteerscopeError as e:
            st.session_state.pop(key, None)
            _ui.fail(e)


left, right = st.columns([1, 3])
if right.button("Locate: patch the residual stream position by position", key="patch_grid_run",
                icon=":material/grid_on:", help="activation patching of every (layer, position) of the residual stream"):
    act("patch_grid", "Patching every layer and position…", grid)
found = st.session_state.get("patch_grid")
if found:
    fig = found[0].figure(found[1])
    st.plotly_chart(_ui.style(fig, height=fig.layout.height, title=fig.layout.title.text), key="patch_grid_fig")
    st.caption("Each cell: the fraction of the source − base gap recovered by copying that one residual-stream "
               "vector from the source run. Where the information sits tells you which site and positions to patch.")

if left.button("Patch", key="patch_run", type="primary", icon=":material/play_arrow:",
               disabled=kind == "feature" and not has_dictionary):
    act("patch_result", "Patching…", run)
res = st.session_state.get("patch_result")
if res:
    r = res["report"]
    pos = "all" if r.positions is None else ", ".join("last token" if p == -1 else str(p) for p in r.positions)
    st.markdown(f"**{res['direction']}** at `{r.site}`, positions: {pos}")
    cols = st.columns(4)
    cols[0].metric("metric on base", f"{r.metric_base:.3f}")
    cols[1].metric("metric on source", f"{r.metric_source:.3f}")
    cols[2].metric("effect of patching v", f"{r.effect_v:.2f}")
    cols[3].metric("effect of the whole site", f"{r.effect_full:.2f}")
    fig = r.figure()
    st.plotly_chart(_ui.style(fig, height=320, title=fig.layout.title.text), key="patch_effects")
    if not r.applicable:
        st.info(f"Illusion check not applicable at {r.site}: its reader sees the whole site, so no part of v is "
                "invisible downstream and there is no dormant pathway to look for (the check applies to MLP neurons, "
                "blocks.L.mlp.hook_post).", icon=":material/info:")
    elif r.illusion:
        st.warning("Illusion flagged: the effect is driven by the part of v later layers cannot read (null share "
                   f"{r.null_share:.2f}), while the readable part alone does little; v may be activating a dormant "
                   "pathway rather than the variable.", icon=":material/warning:")
    else:
        st.success(f"No illusion flagged (null share {r.null_share:.2f}, |v_row|/|v| = {r.row_norm:.2f}).",
                   icon=":material/check:")
    st.caption(f"Reader of {r.site}: {res['reader']}.")
