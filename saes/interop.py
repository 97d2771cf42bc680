"""SAELens interop: export to and import from its on-disk format, ``cfg.json`` + ``sae_weights.safetensors``.

The two agree on the weight layout (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec), so
the mapping is per architecture (ours -> SAELens inference class):

    relu             -> standard          z = ReLU((x - b_dec) W_enc + b_enc)
    topk, gsae       -> topk              z = ReLU(TopK_k(P)); exported with rescale_acts_by_decoder_norm=False.
                                          A g-SAE exports its gradient-free path (plain TopK).
    jumprelu         -> jumprelu          threshold = exp(log_threshold)
    batchtopk        -> jumprelu          threshold = max(theta, 0) for every latent (SAELens does the same)
    transcoder       -> transcoder        ReLU transcoders only: SAELens has no TopK transcoder class
    skip_transcoder  -> skip_transcoder   W_skip is stored transposed, [d_out, d_in]

Import reverses the table (standard -> relu, topk -> topk, jumprelu -> jumprelu, transcoder and
skip_transcoder -> ReLU transcoders). A SAELens TopK SAE trained with rescale_acts_by_decoder_norm
selects on P * ||W_dec,i|| and decodes z / ||W_dec,i||; importing folds n_i = ||W_dec,i|| into the
weights (W_enc *= n, b_enc *= n, W_dec /= n), which gives the same codes and outputs. A JumpReLU
threshold of 0 becomes the smallest positive float (log 0 does not exist).

Runtime input normalisation other than "none" cannot be represented and is refused, except
"expected_average_only_in", which SAELens also leaves to the caller when loading from disk (a
warning says so). Our full config travels in ``metadata["steerscope_cfg"]``, so an exported
dictionary re-imports with its training summary and loss coefficients.
"""

from __future__ import annotations

import json
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from probe.errors import SteerscopeError
from saes.base import Dictionary, get_architecture

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
EXPORTS = {"relu": "standard", "topk": "topk", "gsae": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
           "transcoder": "transcoder", "skip_transcoder": "skip_transcoder"}
IMPORTS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
           "transcoder": "transcoder", "skip_transcoder": "skip_transcoder"}
_TRANSCODERS = ("transcoder", "skip_transcoder")


def _tensors(d: Dictionary) -> dict[str, Tensor]:
    """SAELens state dict of ``d`` (float32, CPU)."""
    arch = d.architecture
    out = {k: getattr(d, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "jumprelu":
        out["threshold"] = d.threshold.detach()
    elif arch == "batchtopk":
        out["threshold"] = d.threshold.detach().clamp_min(0).float().expand(d.cfg.d_sae)
    elif arch == "skip_transcoder":
        out["W_skip"] = d.W_skip.detach().T
    return {k: v.float().cpu().contiguous() for k, v in out.items()}


def export_saelens(d: Dictionary, path: str | Path) -> Path:
    """Write ``d`` as a SAELens directory that ``sae_lens.SAE.load_from_disk(path)`` loads with equal outputs."""
    arch = d.architecture
    if arch not in EXPORTS:
        raise SteerscopeError(f"SAELens has no class for {arch!r}; exportable: {', '.join(sorted(EXPORTS))}")
    if arch in _TRANSCODERS and d.cfg.activation != "relu":
        raise SteerscopeError(f"SAELens' {arch} class is ReLU-only and it has no TopK transcoder: only a "
                              f"{arch} with activation='relu' can be exported (this one uses {d.cfg.activation!r})")
    c = d.cfg
    meta = {"model_name": c.model, "hook_name": c.site, "sae_lens_version": version("sae-lens"),
            "sae_lens_training_version": None, "steerscope_cfg": c.to_dict()}
    cfg: dict[str, Any] = {"architecture": EXPORTS[arch], "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32",
                           "device": "cpu", "apply_b_dec_to_input": bool(c.apply_b_dec_to_input),
                           "normalize_activations": "none", "reshape_activations": "none", "metadata": meta}
    if EXPORTS[arch] == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if arch in _TRANSCODERS:
        cfg["d_out"] = c.d_out
        meta["hook_name_out"] = c.target_site
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(d), str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_file.exists() or not weights_file.exists():
        raise SteerscopeError(f"{path} is not a SAELens directory (needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SteerscopeError(f"{cfg_file} is not valid JSON: {e}") from e
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise SteerscopeError(f"{weights_file} is corrupted or truncated ({str(e).splitlines()[0][:100]})") from e
    return cfg, {k: v.float() for k, v in state.items()}


def _check_supported(cfg: dict[str, Any], state: dict[str, Tensor], path: Path) -> str:
    arch = cfg.get("architecture", "standard")
    if arch not in IMPORTS:
        raise SteerscopeError(f"{path}: SAELens architecture {arch!r} cannot be imported; supported: {', '.join(sorted(IMPORTS))}")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm == "expected_average_only_in":
        warnings.warn(f"{path} was trained on inputs scaled to an expected norm; scale them the same way before use",
                      stacklevel=3)
    elif norm != "none":
        raise SteerscopeError(f"{path}: normalize_activations={norm!r} is a runtime normalisation steerscope cannot represent")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise SteerscopeError(f"{path}: reshape_activations={cfg['reshape_activations']!r} (hook_z SAEs) is not supported")
    scale = state.pop("scaling_factor", None)
    if scale is not None and not torch.equal(scale, torch.ones_like(scale)):
        raise SteerscopeError(f"{path}: a finetuning scaling_factor other than 1 is not supported")
    return IMPORTS[arch]


def _our_state(arch: str, sl_arch: str, cfg: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens tensors -> our state dict for ``arch``."""
    out = {k: state.pop(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k in state}
    if sl_arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        n = out["W_dec"].norm(dim=1).clamp_min(1e-8)
        out["W_enc"], out["b_enc"], out["W_dec"] = out["W_enc"] * n, out["b_enc"] * n, out["W_dec"] / n[:, None]
    if arch == "jumprelu" and "threshold" in state:
        out["log_threshold"] = state.pop("threshold").clamp_min(torch.finfo(torch.float32).tiny).log()
    if arch == "skip_transcoder" and "W_skip" in state:
        out["W_skip"] = state.pop("W_skip").T.contiguous()
    return {**out, **state}  # leftovers surface as "unexpected" in the strict check


def import_saelens(path: str | Path, target_site: str | None = None) -> Dictionary:
    """Load a SAELens directory as one of our dictionaries (strict: every key and shape checked).

    ``target_site`` names a transcoder's output site when the SAELens metadata has no ``hook_name_out``.
    """
    path = Path(path)
    cfg, state = _read(path)
    arch = _check_supported(cfg, state, path)
    meta = cfg.get("metadata") or {}
    ours = meta.get("steerscope_cfg") if isinstance(meta.get("steerscope_cfg"), dict) else {}
    base = dict(ours) if ours.get("architecture") == arch else {}
    fields: dict[str, Any] = {**base, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "site": meta.get("hook_name"),
                              "model": meta.get("model_name")}
    if arch in _TRANSCODERS:
        tsite = target_site or meta.get("hook_name_out") or base.get("target_site")
        if not tsite:
            raise SteerscopeError(f"{path} is a SAELens {arch} without metadata.hook_name_out: pass target_site=")
        fields.update(d_out=cfg["d_out"], target_site=tsite, activation="relu", apply_b_dec_to_input=False)
    else:
        fields.update(d_out=cfg["d_in"], apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    if arch == "topk":
        fields["k"] = int(cfg["k"])
    cls = get_architecture(arch)
    model = cls.from_config(cls.Config.from_dict(fields))
    new = _our_state(arch, cfg.get("architecture", "standard"), cfg, state)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(new)), sorted(set(new) - set(expected))
    if missing or extra:
        raise SteerscopeError(f"{path}: missing {missing} / unexpected {extra} for SAELens {cfg.get('architecture')}")
    for k, v in expected.items():
        if v.shape != new[k].shape:
            raise SteerscopeError(f"{path}: {k} has shape {tuple(new[k].shape)}, cfg.json implies {tuple(v.shape)}")
        if not torch.isfinite(new[k]).all():
            raise SteerscopeError(f"{path}: {k} contains NaN or inf")
    model.load_state_dict(new, strict=True)
    return model.eval()

