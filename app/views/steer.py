"""Steer: add dictionary features or saved steering vectors, project out saved INLP erasures, or let a saved
controller weight its per-layer directions, and compare steered with baseline generations.

URL: ``steer?features=3,17&coeff=8`` (one coefficient for all, or one per feature); coefficients outside
the sliders' range are clamped, with a warning.
"""

from __future__ import annotations

import math
from pathlib import Path

import streamlit as st

from app.views import _ui
from probe.errors import SteerscopeError

LIMIT = 100.0  # slider range [-LIMIT, LIMIT]
DEFAULT_COEFF = 8.0

store = _ui.open_store()
st.title("Steer")
st.caption("Each feature adds coefficient × its decoder direction at the site it writes to (MLP features mapped to "
           "the residual stream); saved vectors add coefficient × their tensor; a saved INLP erasure sets its concept's "
           "subspace to the mean at its site; a saved controller weights its per-layer directions for the prompt. "
           "Baseline and steered runs use the same seed, so any difference comes from the steering.")


def parse_ids(text: str) -> tuple[list[int], list[str]]:
    ids, bad = [], []
    for part in text.replace(";", ",").split(","):
        if part.strip():
            try:
                ids.append(store.check_id(part))
            except SteerscopeError as e:
                bad.append(str(e))
    return list(dict.fromkeys(ids)), bad


def url_coeffs(n: int) -> list[float | None]:
    """Coefficients from ``?coeff=``, clamped into the sliders' range (with a warning)."""
    raw = st.query_params.get("coeff")
    if raw is None or n == 0:
        return [None] * n
    out: list[float | None] = []
    for part in raw.split(","):
        try:
            c = float(part)
            if not math.isfinite(c):
                raise ValueError
        except ValueError:
            st.warning(f"Ignored coefficient {part!r} from the URL: not a finite number.", icon=":material/warning:")
            out.append(None)
            continue
        if abs(c) > LIMIT:
            st.warning(f"Coefficient {c:g} from the URL is outside the sliders' range [{-LIMIT:g}, {LIMIT:g}]; "
                       f"clamped to {math.copysign(LIMIT, c):g}.", icon=":material/warning:")
        out.append(max(-LIMIT, min(LIMIT, c)))
    return (out * n)[:n] if len(out) == 1 else (out + [None] * n)[:n]


def saved(marker: str) -> dict[str, Path]:
    """The directories in ``--vectors`` that hold ``marker`` (vector.json, inlp.json or controller.json)."""
    root = _ui.settings().vectors
    if not root or not Path(root).is_dir():
        return {}
    return {p.name: p for p in sorted(Path(root).iterdir()) if (p / marker).is_file()}


st.session_state.setdefault("steer_features", st.query_params.get("features", ""))
left, right = st.columns([2, 3], gap="large")
with left:
    st.text_input("Features (ids, comma separated)", key="steer_features", placeholder="e.g. 12, 40")
    feats, bad = parse_ids(st.session_state.steer_features)
    for msg in bad:
        st.error(msg, icon=":material/error:")
    library = saved("vector.json")
    chosen = st.multiselect("Saved steering vectors", list(library), key="steer_saved",
                            help="Vectors saved with SteeringVector.save in the --vectors directory.",
                            disabled=not library, placeholder="choose vectors" if library else
                            "none in the --vectors directory" if _ui.settings().vectors else
                            "none found (start the app with --vectors DIR)")
    if st.session_state.get("steer_url_done") is None:  # URL coefficients seed the sliders once per session
        for j, c in zip(feats, url_coeffs(len(feats)), strict=True):
            if c is not None:
                st.session_state[f"coeff_f{j}"] = c
        st.session_state.steer_url_done = True
    coeffs = {}
    for j in feats:
        st.session_state.setdefault(f"coeff_f{j}", DEFAULT_COEFF)
        coeffs[("feature", j)] = st.slider(f"feature {j}", -LIMIT, LIMIT, step=0.5, key=f"coeff_f{j}")
    vectors = {}
    for name in chosen:
        try:
            from steering import SteeringVector

            v = vectors[name] = SteeringVector.load(library[name])
        except SteerscopeError as e:
            _ui.fail(e)
            continue
        st.session_state.setdefault(f"coeff_v_{name}", max(-LIMIT, min(LIMIT, v.coeff)))
        coeffs[("vector", name)] = st.slider(f"vector {name} ({v.site})", -LIMIT, LIMIT, step=0.5, key=f"coeff_v_{name}")
    erasure_dirs, controller_dirs = saved("inlp.json"), saved("controller.json")
    projections = {}  # name -> (INLP, site)
    if erasure_dirs:
        for name in st.multiselect("Concept erasures (INLP)", list(erasure_dirs), key="steer_erase",
                                   help="Saved with INLP.save: the concept's subspace is set to its mean at the site."):
            from steering import INLP

            try:
                e = INLP.load(erasure_dirs[name])
            except SteerscopeError as err:
                _ui.fail(err)
                continue
            site = st.text_input(f"site for erasure {name} (rank {e.rank}, width {e.d})",
                                 value=e.provenance.get("site", ""), key=f"erase_site_{name}",
                                 placeholder="e.g. blocks.2.hook_resid_post")
            projections[name] = (e, site.strip())
    controller = None
    if controller_dirs:
        pick = st.selectbox("Controller", ["none", *controller_dirs], key="steer_controller",
                            help="Saved with Controller.save: it reads the prompt and sets a scale and per-layer "
                                 "weights for its directions (use positions 'all').")
        if pick != "none":
            from steering.controller import Controller

            try:
                controller = Controller.load(controller_dirs[pick])
                st.session_state.setdefault("steer_alpha", float(controller.alpha))
                controller.alpha = st.slider("controller strength (alpha)", 0.0, max(LIMIT, controller.alpha),
                                             step=0.1, key="steer_alpha")
            except SteerscopeError as err:
                _ui.fail(err)
                controller = None

with right:
    st.text_input("Prompt", key="steer_prompt", value="She walked into the room and")
    c1, c2, c3, c4 = st.columns(4)
    n_new = c1.slider("new tokens", 1, 64, 24, key="steer_tokens")
    seed = c2.number_input("seed", 0, 2**31 - 1, 0, key="steer_seed")
    mode = c3.selectbox("positions", ["all", "prompt", "generated", "last"], key="steer_mode",
                        help="where the vectors are added: prompt tokens, generated tokens, both, or the last prompt token only")
    sample = c4.toggle("sample", value=True, key="steer_sample", help="sample at temperature 0.8 (off: greedy)")
    run = st.button("Generate", key="steer_run", type="primary", icon=":material/play_arrow:",
                    disabled=not (coeffs or projections or controller is not None) or not st.session_state.steer_prompt.strip())
    if not (coeffs or projections or controller is not None):
        st.info("Choose at least one feature, saved vector, erasure or controller to steer with.")
    if run:
        from steering import SteeringVector, generate

        # saved vectors need only the model; the dictionary is loaded only to steer with its features
        model, dictionary = _ui.live(store) if feats else (_ui.live_model(store), None)
        try:
            steer = [SteeringVector.from_feature(dictionary, j, c, model=model) if kind == "feature"
                     else vectors[j].with_coeff(c) for (kind, j), c in coeffs.items()]
            for name, (e, site) in projections.items():
                if not site:
                    raise SteerscopeError(f"erasure {name} needs a site (its provenance records none)")
                steer.append(e.at(site))
            kw = dict(max_new_tokens=int(n_new), do_sample=bool(sample), temperature=0.8, seed=int(seed))
            with _ui.model_lock():  # the controller's read pass too: hooks live on the shared model
                if controller is not None:
                    steer += controller.vectors_for(model, st.session_state.steer_prompt)
                base = generate(model, st.session_state.steer_prompt, **kw)
                steered = generate(model, st.session_state.steer_prompt, steer=steer, mode=mode, **kw)
            ids = [model.to_tokens(t, prepend_bos=False)[0].tolist() for t in (base, steered)]
            st.session_state.steer_result = (base, steered, [repr(v) for v in steer], _ui.token_difference(*ids))
        except SteerscopeError as e:
            st.session_state.pop("steer_result", None)
            _ui.fail(e)
    if "steer_result" in st.session_state:
        base, steered, reprs, diff = st.session_state.steer_result
        prompt = st.session_state.steer_prompt
        _ui.side_by_side("Baseline", prompt + base, "Steered", prompt + steered)
        if diff["first"] is None:
            st.info("The steered text is identical to the baseline: the steering did not change any generated token "
                    "(try a larger coefficient or other positions).", icon=":material/info:")
        else:
            st.markdown(f'<div class="ss-diff">The steered text departs from the baseline at generated token '
                        f'<b>{diff["first"] + 1}</b>; <b>{diff["n_diff"]}</b> of {diff["n"]} token positions differ.</div>',
                        unsafe_allow_html=True)
        with st.expander("steering vectors"):
            st.code("\n".join(reprs), language=None)
