"""The one dictionary interface: configs, typed outputs, a registry, strict save/load.

A dictionary maps an input activation x [N, d_in] to sparse codes [N, d_sae] and back to a
reconstruction [N, d_out]. An SAE has d_out == d_in and reconstructs x; a transcoder is the general
case and predicts a *target* (e.g. the MLP output from the MLP input): ``forward(x, target)``.

On disk a dictionary is a directory: ``cfg.json`` (with an ``architecture`` key) and
``weights.safetensors``. Loading is strict: every key and every shape is checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from probe.errors import SteerscopeError, suggest
from probe.store_files import atomic_write

FORMAT_VERSION = 1
REGISTRY: dict[str, type[Dictionary]] = {}


class DictOutput(NamedTuple):
    """What every dictionary's forward returns."""

    recon: Tensor  # [N, d_out] reconstruction of x (SAE) or prediction of the target (transcoder)
    codes: Tensor  # [N, d_sae] feature activations (mostly zeros): dense, or sparse COO from fused TopK training
    aux: dict[str, Tensor]  # named loss terms of this forward pass ("mse", "l1", "auxk", ...); empty at eval


@dataclass
class DictionaryConfig:
    """Fields shared by all dictionaries. Subclasses add their own, each with a docstring comment."""

    d_in: int  # width of the input site
    d_sae: int  # number of latents (features)
    d_out: int | None = None  # width of the target; None means d_in (an autoencoder)
    site: str | None = None  # TransformerLens hook the input comes from
    target_site: str | None = None  # hook the target comes from (transcoders); None: the input site
    model: str | None = None  # model the dictionary was trained on
    apply_b_dec_to_input: bool = True  # subtract b_dec from x before encoding (SAEs; not transcoders)
    normalize_decoder: bool = True  # keep decoder rows at unit norm during training
    training: dict[str, Any] = field(default_factory=dict)  # summary written by the trainer

    architecture: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        for name in ("d_in", "d_sae", "d_out"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise SteerscopeError(f"{name} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DictionaryConfig:
        d = {k: v for k, v in d.items() if k not in ("architecture", "format_version")}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SteerscopeError(f"unknown {cls.architecture} config fields: {', '.join(unknown)}")
        return cls(**d)


def register(name: str):
    """Class decorator: register a Dictionary under ``name`` (duplicates are an error)."""

    def deco(cls: type[Dictionary]) -> type[Dictionary]:
        if name in REGISTRY:
            raise ValueError(f"dictionary architecture {name!r} registered twice")
        cls.architecture = name
        cls.Config.architecture = name
        REGISTRY[name] = cls
        return cls

    return deco


def get_architecture(name: str) -> type[Dictionary]:
    _import_all()
    if name not in REGISTRY:
        raise SteerscopeError(f"unknown architecture {name!r}.{suggest(name, REGISTRY)} Known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


class Dictionary(nn.Module):
    """Base class. Subclasses define parameters in ``__init__`` and implement encode/decode/forward."""

    architecture: ClassVar[str] = ""
    Config: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    #: What generic code (trainer, tests, app) may assume about this architecture:
    #:   "backprop"          trained by gradient descent on ``training_loss`` (else a fit of its own, e.g. SNMF)
    #:   "fold_input_scale"  after ``fold_input_scale(s)``, raw inputs give exactly (outputs on x*s) / s
    #:   "needs_target"      a transcoder: the config needs ``target_site`` and ``training_loss`` a ``target``
    #:   "needs_grad"        ``training_loss`` needs ``grad``, the LM-loss gradient at the input site (g-SAE)
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg

    def max_active(self) -> int | None:
        """The most nonzero codes ``encode`` gives per row, where the architecture guarantees a bound."""
        return None

    # --- the contract -------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, target: Tensor | None = None) -> DictOutput:
        codes = self.encode(x)
        return DictOutput(self.decode(codes), codes, {})

    def training_loss(self, x: Tensor, target: Tensor | None = None, **state: Any) -> tuple[Tensor, DictOutput]:
        """Loss for one training batch (scaled inputs); ``state`` carries trainer info (e.g. dead mask)."""
        raise NotImplementedError

    # --- shared helpers -----------------------------------------------------------------------
    def check_input(self, x: Tensor, target: Tensor | None = None) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise SteerscopeError(f"input has width {x.shape[-1]}, but this {self.architecture} expects d_in={self.cfg.d_in}"
                                  + (f" (site {self.cfg.site})" if self.cfg.site else ""))
        if target is not None and target.shape[-1] != self.cfg.d_out:
            raise SteerscopeError(f"target has width {target.shape[-1]}, expected d_out={self.cfg.d_out}")

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Fold a scalar input scaling (trained on x*scale, targets*scale) into the weights, in place.

        After folding, the dictionary takes raw activations and returns raw-scale reconstructions.
        Subclasses with other parameters extend this.
        """
        if hasattr(self, "W_enc"):
            self.W_enc.mul_(scale)
        if hasattr(self, "W_dec"):
            self.W_dec.div_(scale)
        if hasattr(self, "b_dec"):
            self.b_dec.div_(scale)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (and encoder columns inversely, keeping codes*W_dec fixed)."""
        if not hasattr(self, "W_dec"):
            return
        norms = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.div_(norms)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the component of W_dec's gradient parallel to each (unit) row."""
        if not hasattr(self, "W_dec") or self.W_dec.grad is None:
            return
        W, G = self.W_dec, self.W_dec.grad
        G.sub_((G * W).sum(1, keepdim=True) * W)

    # --- artifacts ----------------------------------------------------------------------------
    #: The directory this dictionary was last saved to or loaded from (None: never on disk). The weights
    #: may have changed in memory since; compare :func:`fingerprint` with the directory's to be sure.
    source_path: Path | None = None

    def save(self, path: str | Path) -> Path:
        """Write ``weights.safetensors`` and ``cfg.json`` (which records the weights' sha256), each through a
        temporary file and a rename, so a crash never leaves a half-written file; a crash between the two
        renames leaves weights that fail the old cfg.json's checksum on load, never a silent mix."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        data = st_save({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()})
        atomic_write(path / "weights.safetensors", data)
        cfg = {**self.cfg.to_dict(), "weights_sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(path / "cfg.json", json.dumps(cfg, indent=2).encode())
        self.source_path = path.resolve()
        return path

    @classmethod
    def from_config(cls, cfg: DictionaryConfig | dict) -> Dictionary:
        if isinstance(cfg, dict):
            cfg = cls.Config.from_dict(cfg)
        return cls(cfg)


def load_dictionary(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Dictionary:
    """Load any registered dictionary from ``path`` (strict: keys and shapes must match its config).

    ``verify``: check the weights' sha256 against ``cfg.json`` (about 0.1 s per 100 MB; dictionaries saved
    before checksums were recorded load unchecked). ``verify=False`` skips it for huge files.
    """
    path = Path(path)
    cfg_file, weights_file = path / "cfg.json", path / "weights.safetensors"
    if not cfg_file.exists() or not weights_file.exists():
        raise SteerscopeError(f"{path} is not a dictionary directory (needs cfg.json and weights.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SteerscopeError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise SteerscopeError(f"{cfg_file} must hold a JSON object (a dictionary config), not {type(cfg).__name__}")
    version = cfg.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SteerscopeError(f"{cfg_file} has format_version {version!r}; this steerscope reads up to "
                              f"{FORMAT_VERSION}: upgrade steerscope")
    expected_sha = cfg.pop("weights_sha256", None)
    cls = get_architecture(cfg.get("architecture", "?"))
    model = cls.from_config(cfg)
    try:
        data = weights_file.read_bytes()
    except OSError as e:
        raise SteerscopeError(f"cannot read {weights_file}: {e.strerror or e}") from e
    if verify and expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
        raise SteerscopeError(f"{weights_file} is corrupted or truncated (its sha256 differs from the one cfg.json "
                              "records); retrain or restore the dictionary (verify=False loads it anyway)")
    try:
        state = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise SteerscopeError(f"{weights_file} is corrupted or truncated ({str(e).splitlines()[0][:100]})") from e
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise SteerscopeError(f"{weights_file}: missing {missing} / unexpected {extra} for {cls.architecture}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise SteerscopeError(f"{weights_file}: {k} has shape {tuple(state[k].shape)}, config implies {tuple(v.shape)}")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise SteerscopeError(f"{weights_file}: {k} contains NaN or inf")
    model.load_state_dict(state, strict=True)
    model.source_path = path.resolve()
    return model.to(device).eval()  # a loaded dictionary is for use: inference paths (e.g. BatchTopK's threshold)


def fingerprint(dictionary: Dictionary) -> str:
    """sha256 over the architecture and every weight (float32 bytes), 32 hex digits: which dictionary an
    artifact (feature store, eval.json) belongs to."""
    h = hashlib.sha256(dictionary.architecture.encode())
    for name, t in sorted(dictionary.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _import_all() -> None:
    """Import every architecture module so the registry is complete."""
    import importlib

    for mod in ("relu", "topk", "batchtopk", "jumprelu", "gsae", "transcoder", "snmf", "codebook"):
        importlib.import_module(f"saes.{mod}")


class LinearDictionary(Dictionary):
    """Shared parameters of the SAE family: x -> act((x - b_dec) W_enc + b_enc) -> codes W_dec + b_dec.

    Subclasses implement ``activation(pre)`` and ``training_loss``. Weights: W_enc [d_in, d_sae],
    b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out] (the SAELens layout).
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"backprop", "fold_input_scale"})

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        W_dec = torch.randn(d_sae, d_out)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        W_enc = W_dec.T.clone() if d_in == d_out else torch.randn(d_in, d_sae) / d_in**0.5
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))

    def pre_acts(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.cfg.apply_b_dec_to_input and self.cfg.d_in == self.cfg.d_out:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_acts(x))

    def decode(self, codes: Tensor) -> Tensor:
        return codes @ self.W_dec + self.b_dec

    def mse(self, recon: Tensor, x: Tensor, target: Tensor | None) -> Tensor:
        """Sum of squares over features, mean over the batch (the SAELens convention)."""
        goal = x if target is None else target
        return (recon - goal).pow(2).sum(-1).mean()
