"""``SteeringVector``: one explicit intervention, "add ``coeff * tensor`` at ``site``".

A vector is ``[d]`` (added at every steered position) or ``[T, d]`` (ActAdd: row t is added at
position t of the user's prompt, BOS being position 0). Constructors:

>>> v = SteeringVector.actadd(model, "Love", "Hate", layer=2, coeff=5.0)     # Turner et al. [T, d]
>>> v = SteeringVector.mean_diff(model, pos, neg, "blocks.2.hook_resid_post")  # CAA [d]
>>> v = SteeringVector.pca(model, pos, neg, "blocks.2.hook_resid_post", coeff=8.0)  # unit [d]
>>> v = SteeringVector.from_feature(sae, 123, coeff=4.0)                     # unit decoder direction
>>> v = SteeringVector.from_direction(torch.randn(256), "blocks.1.hook_resid_post", 2.0)

On disk a vector is a directory: ``vector.json`` (site, coeff, shape, provenance) and
``vector.safetensors`` (one tensor, ``"tensor"``). ``load`` checks every key and shape.
Vectors are read from TransformerLens residual streams; a model loaded with TL's weight
processing (``fold_ln``, ``center_writing_weights``) has residuals that differ from the raw HF
ones by a per-position multiple of the all-ones vector, which LayerNorm ignores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from probe.errors import SteerscopeError
from probe.hooks import capture
from probe.sites import layer_of, resolve_one
from probe.tokens import encode, encode_all, first_real, pad, real_mask

FORMAT = "steerscope.steering_vector"
FORMAT_VERSION = 1
_JSON_KEYS = {"format", "format_version", "site", "coeff", "shape", "dtype", "provenance"}
Position = Literal["last", "mean"]


@dataclass
class SteeringVector:
    """Add ``coeff * tensor`` to the activation at ``site`` (a TransformerLens hook name)."""

    site: str  # TL hook name, e.g. "blocks.2.hook_resid_pre"
    tensor: Tensor  # [d], or [T, d] for ActAdd (row 0 lines up with BOS)
    coeff: float = 1.0  # scale applied when steering
    provenance: dict[str, Any] = field(default_factory=dict)  # how it was made (JSON-serialisable)

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise SteerscopeError(f"a steering vector needs a site name, got {self.site!r}")
        if not isinstance(self.tensor, Tensor):
            self.tensor = torch.as_tensor(self.tensor, dtype=torch.float32)
        t = self.tensor
        if t.ndim not in (1, 2) or t.numel() == 0:
            raise SteerscopeError(f"a steering vector is [d] or [T, d], got shape {tuple(t.shape)}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise SteerscopeError("a steering vector must be a finite floating-point tensor")
        if isinstance(self.coeff, bool) or not isinstance(self.coeff, int | float) or not math.isfinite(self.coeff):
            raise SteerscopeError(f"coeff must be a finite number, got {self.coeff!r}")
        self.coeff = float(self.coeff)
        self.tensor = t.detach()

    @property
    def positional(self) -> bool:
        """True for an ActAdd-style [T, d] vector (added at the first T prompt positions)."""
        return self.tensor.ndim == 2

    @property
    def d(self) -> int:
        return self.tensor.shape[-1]

    def scaled(self) -> Tensor:
        """``coeff * tensor`` in float32: what is added to the activation."""
        return self.coeff * self.tensor.float()

    def with_coeff(self, coeff: float) -> SteeringVector:
        return replace(self, coeff=coeff, provenance=dict(self.provenance))

    def __repr__(self) -> str:
        method = self.provenance.get("method", "direction")
        norm = float(self.tensor.float().norm())
        return (f"SteeringVector({method}, site={self.site!r}, shape={list(self.tensor.shape)}, "
                f"coeff={self.coeff:g}, norm={norm:.4g})")

    # --- artifacts ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``vector.json`` + ``vector.safetensors`` into the directory ``path``."""
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "site": self.site, "coeff": self.coeff,
                "shape": list(self.tensor.shape), "dtype": str(self.tensor.dtype).removeprefix("torch."),
                "provenance": self.provenance}
        try:
            text = json.dumps(meta, indent=2)
        except (TypeError, ValueError) as e:
            raise SteerscopeError(f"provenance must be JSON-serialisable: {e}") from e
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise SteerscopeError(f"{path} is a file; a steering vector is saved as a directory (vector.json + "
                                  "vector.safetensors): choose another path")
        path.mkdir(parents=True, exist_ok=True)
        save_file({"tensor": self.tensor.contiguous().cpu()}, str(path / "vector.safetensors"))
        (path / "vector.json").write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Strict load: valid JSON with exactly the known keys, one tensor whose shape matches."""
        path = Path(path)
        meta = _read_meta(path / "vector.json")
        tensor = _read_tensor(path / "vector.safetensors")
        if list(tensor.shape) != meta["shape"]:
            raise SteerscopeError(f"{path}: tensor has shape {list(tensor.shape)}, vector.json says {meta['shape']}")
        if str(tensor.dtype).removeprefix("torch.") != meta["dtype"]:
            raise SteerscopeError(f"{path}: tensor dtype {tensor.dtype} does not match vector.json ({meta['dtype']})")
        return cls(meta["site"], tensor, meta["coeff"], meta["provenance"])

    def to_gguf(self, path: str | Path, n_layers: int, model_hint: str | None = None) -> Path:
        """Export as a llama.cpp control vector (see :mod:`steering.gguf_export`)."""
        from steering.gguf_export import export_gguf

        return export_gguf([self], path, n_layers=n_layers, model_hint=model_hint)

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_direction(cls, direction, site: str, coeff: float = 1.0) -> SteeringVector:
        """Wrap a given direction ([d] or [T, d]) at ``site``."""
        t = torch.as_tensor(direction).detach().clone()
        return cls(site, t.float() if not t.is_floating_point() else t, coeff, {"method": "direction"})

    @classmethod
    def actadd(cls, model, prompt_add: str, prompt_sub: str, layer: int, coeff: float = 1.0,
               site: str | None = None) -> SteeringVector:
        """ActAdd (Turner et al.): per-position difference of two prompts' residual streams.

        Both prompts are tokenized as the model's prompts are (BOS at position 0 where the model has one); the
        shorter one is right-padded with the space token. The [T, d] tensor is H(prompt_add) - H(prompt_sub) at
        ``blocks.{layer}.hook_resid_pre`` (or ``site``); with a BOS its row 0 is exactly zero. Without one (SmolLM2),
        row 0 is the difference of two attention sinks (norm ~10x a normal row there) and lands on the user's sink.
        """
        _check_layer(model, layer)
        site = resolve_one(model, site or f"blocks.{layer}.hook_resid_pre")
        toks = [encode(model, p, allow_whitespace=True) for p in (prompt_add, prompt_sub)]  # " " is the paper's
        space = _space_token(model)
        T = max(len(t) for t in toks)
        batch = torch.stack([torch.cat([t, t.new_full((T - len(t),), space)]) for t in toks])
        acts = _run_site(model, batch, torch.ones_like(batch), site)
        prov = {"method": "actadd", "prompt_add": prompt_add, "prompt_sub": prompt_sub, "layer": layer,
                "pad_token_id": space, "tokens_add": model.to_str_tokens(batch[0]),
                "tokens_sub": model.to_str_tokens(batch[1]), "model": model.cfg.model_name}
        return cls(site, (acts[0] - acts[1]).float().cpu(), coeff, prov)

    @classmethod
    def mean_diff(cls, model, pos_prompts: list[str], neg_prompts: list[str], site: str,
                  position: Position = "last", coeff: float = 1.0, batch_size: int = 32) -> SteeringVector:
        """CAA / diff-in-means: mean activation over ``pos_prompts`` minus over ``neg_prompts``.

        ``position="last"`` reads the last real token of each prompt; ``"mean"`` averages its real
        tokens after BOS. Padding never enters either.
        """
        site = resolve_one(model, site)
        pos = read_activations(model, pos_prompts, site, position, batch_size)
        neg = read_activations(model, neg_prompts, site, position, batch_size)
        prov = {"method": "mean_diff", "position": position, "n_pos": len(pos_prompts), "n_neg": len(neg_prompts),
                "model": model.cfg.model_name}
        return cls(site, (pos.mean(0) - neg.mean(0)).float(), coeff, prov)

    @classmethod
    def pca(cls, model, pos_prompts: list[str], neg_prompts: list[str], site: str,
            position: Position = "last", coeff: float = 1.0, batch_size: int = 32) -> SteeringVector:
        """First principal component of the centred paired differences (unit norm).

        The sign is set so that most uncentred differences ``h(pos_i) - h(neg_i)`` project positively.
        """
        if len(pos_prompts) != len(neg_prompts):
            raise SteerscopeError(f"pca needs paired prompts: got {len(pos_prompts)} positive and {len(neg_prompts)} negative")
        if len(pos_prompts) < 2:
            raise SteerscopeError("pca needs at least 2 prompt pairs (the differences are centred)")
        site = resolve_one(model, site)
        diffs = (read_activations(model, pos_prompts, site, position, batch_size)
                 - read_activations(model, neg_prompts, site, position, batch_size)).double()
        u = principal_direction(diffs)
        prov = {"method": "pca", "position": position, "n_pairs": len(pos_prompts), "model": model.cfg.model_name}
        return cls(site, u.float(), coeff, prov)

    @classmethod
    def from_feature(cls, dictionary, feature: int, coeff: float = 1.0, model=None) -> SteeringVector:
        """A dictionary feature as a **unit** vector in the basis of the site it is added at.

        SAE / transcoder: the direction of the decoder row ``W_dec[feature]`` at ``cfg.target_site or cfg.site``.
        A dictionary on MLP neurons (``mlp.hook_post``, e.g. SNMF): the residual direction ``W_out^T z`` added
        at ``hook_mlp_out`` (pass ``model`` to read ``W_out``), which changes the model exactly as adding z
        at ``mlp.hook_post`` would. The direction is then divided by its norm, so ``coeff`` is a length in the
        residual stream whatever the dictionary: a decoder after ``fold_input_scale(s)`` (rows of norm 1/s), an
        SNMF factor or an unnormalised decoder all give a vector of norm ``coeff``. The norm before that is
        kept in ``provenance["direction_norm"]``.
        """
        from saes.base import Dictionary

        if not isinstance(dictionary, Dictionary) or not hasattr(dictionary, "W_dec"):
            raise SteerscopeError("from_feature needs a saes Dictionary with a decoder (W_dec)")
        n = dictionary.W_dec.shape[0]
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < n:
            raise SteerscopeError(f"feature {feature!r} out of range: this dictionary has {n} features (0 to {n - 1})")
        site = dictionary.cfg.target_site or dictionary.cfg.site
        if not site:
            raise SteerscopeError("the dictionary records no site; use SteeringVector.from_direction(row, site)")
        row = dictionary.W_dec[feature].detach().float().cpu()
        prov = {"method": "feature", "architecture": dictionary.architecture, "feature": feature,
                "dictionary_site": site, "model": dictionary.cfg.model}
        if site.endswith("mlp.hook_post"):
            row, site = _neurons_to_residual(row, site, model)
        norm = float(row.norm())
        if not norm > 0:
            raise SteerscopeError(f"feature {feature} has a zero decoder direction at {site}; it cannot steer")
        prov["direction_norm"] = norm
        return cls(site, row / norm, coeff, prov)


# --- helpers -----------------------------------------------------------------------------------

def principal_direction(diffs: Tensor) -> Tensor:
    """Unit first PC of the centred rows of ``diffs`` [N, d]; most rows project positively."""
    centred = diffs - diffs.mean(0, keepdim=True)
    u = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    proj = diffs @ u
    n_pos, n_neg = int((proj > 0).sum()), int((proj < 0).sum())
    if n_neg > n_pos or (n_neg == n_pos and float(proj.sum()) < 0):
        u = -u
    return u / u.norm()


def site_width(model, site: str) -> int | None:
    """The feature width TL gives ``site`` when it is known from the config, else None."""
    rest = site.split(".", 2)[2] if layer_of(site) is not None else site
    if rest in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                "hook_mlp_in", "hook_embed", "hook_pos_embed", "ln_final.hook_normalized"):
        return model.cfg.d_model
    if rest in ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear") and not model.cfg.num_experts:
        return model.cfg.d_mlp
    return None


def prompt_tokens(model, prompts: list[str]) -> list[Tensor]:
    """Each prompt as a 1-D token tensor, tokenized by the model's convention (:mod:`probe.tokens`)."""
    return encode_all(model, prompts)


def read_activations(model, prompts: list[str], site: str, position: Position = "last",
                     batch_size: int = 32) -> Tensor:
    """[N, d] activations at ``site``: the last real token, or the mean of the prompt's own tokens (BOS left out)."""
    if position not in ("last", "mean"):
        raise SteerscopeError(f"position must be 'last' or 'mean', got {position!r}")
    toks = prompt_tokens(model, prompts)
    out = []
    for i in range(0, len(toks), batch_size):
        batch, lens = pad(model, toks[i:i + batch_size], "right")
        mask = real_mask(lens, batch.shape[1])
        acts = _run_site(model, batch, mask, site).float().cpu()  # [B, T, d]
        if position == "last":
            out.append(acts[torch.arange(len(lens)), lens - 1])
        else:
            keep = mask.clone()
            keep[:, : first_real(model)] = 0  # BOS is shared by every prompt and dominates the norm; leave it out
            out.append((acts * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
    return torch.cat(out)


def _run_site(model, tokens: Tensor, mask: Tensor, site: str) -> Tensor:
    """Activations at ``site`` for a [B, T] batch (explicit attention mask), shape [B, T, d]."""
    device = model.cfg.device
    with torch.no_grad(), capture(model, [site]) as acts:
        model(tokens.to(device), attention_mask=mask.to(device), return_type=None)
    a = acts[site]
    if a.ndim != 3:
        raise SteerscopeError(f"site {site} has activations of shape {tuple(a.shape)}; steering needs [batch, pos, d]")
    return a


def _space_token(model) -> int:
    try:
        return int(model.to_single_token(" "))
    except (AssertionError, ValueError) as e:
        raise SteerscopeError("ActAdd pads with the space token, but ' ' is not a single token here") from e


def _check_layer(model, layer: int) -> None:
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise SteerscopeError(f"layer {layer!r} out of range: the model has {n} layers (0 to {n - 1})")


def _neurons_to_residual(z: Tensor, site: str, model) -> tuple[Tensor, str]:
    """Map an MLP-neuron feature z [d_mlp] (SNMF, or any dictionary on mlp.hook_post) to the residual
    direction W_out^T z at hook_mlp_out."""
    if model is None:
        raise SteerscopeError(f"this feature lives in MLP-neuron space ({site}); pass model= to map it through W_out "
                              "into the residual stream")
    layer = layer_of(site)
    mlp = model.blocks[layer].mlp
    if not hasattr(mlp, "W_out"):
        raise SteerscopeError(f"blocks.{layer}.mlp has no single W_out (a mixture of experts?); "
                              "steer the feature at mlp.hook_post with from_direction instead")
    W_out = mlp.W_out.detach().float().cpu()  # [d_mlp, d_model]
    if W_out.shape[0] != z.shape[0]:
        raise SteerscopeError(f"the feature has width {z.shape[0]}, blocks.{layer} has d_mlp={W_out.shape[0]}")
    return z @ W_out, f"blocks.{layer}.hook_mlp_out"


def read_meta(file: Path, keys: set[str], fmt: str, version: int, directory: str, kind: str) -> dict[str, Any]:
    """An artifact's JSON: exactly ``keys``, the right format and version; else one line naming ``directory``
    (e.g. "a steering-vector directory") or ``kind`` (e.g. "steering vector")."""
    if not file.exists():
        raise SteerscopeError(f"{file.parent} is not {directory} (no {file.name})")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SteerscopeError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or set(meta) != keys:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise SteerscopeError(f"{file}: expected keys {sorted(keys)}, got {got}")
    if meta["format"] != fmt or meta["format_version"] != version:
        raise SteerscopeError(f"{file}: not a steerscope {kind} (format {meta['format']!r} "
                              f"version {meta['format_version']!r})")
    return meta


def _read_meta(file: Path) -> dict[str, Any]:
    meta = read_meta(file, _JSON_KEYS, FORMAT, FORMAT_VERSION, "a steering-vector directory", "steering vector")
    shape_ok = isinstance(meta["shape"], list) and all(isinstance(s, int) and s > 0 for s in meta["shape"])
    if not shape_ok or not isinstance(meta["provenance"], dict) or not isinstance(meta["site"], str):
        raise SteerscopeError(f"{file}: malformed shape, site or provenance")
    return meta


def _read_tensor(file: Path) -> Tensor:
    if not file.exists():
        raise SteerscopeError(f"{file.parent}: vector.safetensors is missing")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise SteerscopeError(f"{file} is corrupted or truncated ({str(e).splitlines()[0][:100]})") from e
    if set(state) != {"tensor"}:
        raise SteerscopeError(f"{file}: expected one tensor named 'tensor', found {sorted(state)}")
    return state["tensor"]
