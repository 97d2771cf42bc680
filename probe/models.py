"""``load_model(name)``: a bundled zoo name, a TransformerLens official name, or a local HF directory.

Always returns a ``HookedTransformer`` with its tokenizer, in eval mode.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from probe.errors import SteerscopeError, suggest
from probe.zoo import ZOO_NAMES, zoo_path

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def _quiet_import():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    return HookedTransformer, HookedTransformerConfig


def resolve_device(device: str | torch.device | None) -> str:
    """``None`` -> the best available device; otherwise check the device exists here."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise SteerscopeError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise SteerscopeError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use 'cpu'")
    return str(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Parse a dtype name and check the device can compute in it."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise SteerscopeError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SteerscopeError(f"dtype {dtype!r} is not a floating-point type; choose one of {', '.join(sorted(_DTYPES))}")
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        raise SteerscopeError("float16 is not supported on CPU (slow or missing kernels); use float32 or bfloat16 on CPU")
    if torch.device(device).type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SteerscopeError("this GPU cannot do bfloat16; use float16 or float32")
    return dtype


def default_device() -> str:
    return resolve_device(None)


def hf_tokenizer(tokenizer_file: str | Path):
    """Wrap a ``tokenizers`` JSON file as a transformers fast tokenizer (what TransformerLens expects)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tok.padding_side = "right"
    # TransformerLens re-loads tokenizers by name to force BOS; ours has no name. Declaring BOS handled
    # keeps this object, and TL then prepends BOS itself (the tokenizer never adds it).
    tok.init_kwargs.update(name_or_path=str(tokenizer_file), add_bos_token=True)
    return tok


def build_model(cfg_dict: dict, tokenizer_file: str | Path | None = None, device: str = "cpu", dtype=torch.float32):
    """A fresh ``HookedTransformer`` from a config dict (randomly initialised)."""
    HookedTransformer, HookedTransformerConfig = _quiet_import()
    cfg = HookedTransformerConfig(**{**cfg_dict, "device": device, "dtype": dtype})
    tok = hf_tokenizer(tokenizer_file) if tokenizer_file else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    return model


def parameter_dict(model) -> dict[str, torch.Tensor]:
    """The model's parameters only (no buffers such as masks or rotary tables)."""
    return {k: v.detach() for k, v in model.named_parameters()}


def save_zoo_weights(model, path: str | Path, dtype=torch.float16) -> None:
    save_file({k: v.to(dtype).contiguous().cpu() for k, v in parameter_dict(model).items()}, str(path))


def load_zoo_weights(model, path: str | Path) -> None:
    """Strict load: every parameter present, no extras, shapes equal."""
    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise SteerscopeError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != state[k].shape:
                raise SteerscopeError(f"{path}: {k} has shape {tuple(state[k].shape)}, config expects {tuple(p.shape)}")
            p.copy_(state[k].to(p.dtype))


def prepends_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` itself puts BOS first when it encodes text (its own convention, which prompts follow)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def keep_own_tokenizer(model, tokenizer) -> None:
    """TL swaps in a copy of the tokenizer re-loaded with ``add_bos_token=True``; put the model's own back, so that
    ``model.tokenizer(text)`` and ``model.to_tokens(text)`` both give what the model's tokenizer gives."""
    padding_side = model.tokenizer.padding_side
    model.tokenizer = tokenizer
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def load_model(name: str | os.PathLike, device: str | None = None, dtype: str | torch.dtype | None = None):
    """Load a model by zoo name, packaged GGUF name (``smollm2-135m-instruct``), GGUF file, TransformerLens
    official name, or local Hugging Face directory."""
    from probe import gguf

    name = os.fspath(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if name in ZOO_NAMES:
        return _load_zoo(name, device, torch_dtype)
    if name.lower() in gguf.PACKAGED:
        return gguf.load_gguf(gguf.packaged_path(name.lower()), device, torch_dtype, name=name.lower())
    if gguf.is_gguf_path(name):
        return gguf.load_gguf(name, device, torch_dtype)
    if os.path.isdir(name):
        if (Path(name) / "model.safetensors").exists() and (Path(name) / "card.json").exists():
            return _load_zoo_dir(Path(name), device, torch_dtype)
        return _load_hf_dir(name, device, torch_dtype)
    return _load_official(name, device, torch_dtype)


def _load_zoo(name: str, device: str, dtype: torch.dtype):
    path = zoo_path(name)
    if not all((path / f).exists() for f in ("model.safetensors", "config.json", "tokenizer.json")):
        raise SteerscopeError(f"zoo model {name!r} has no complete weights yet (training unfinished?); "
                              f"train it with: steerscope zoo train {name}")
    return _load_zoo_dir(path, device, dtype)


def _load_zoo_dir(path: Path, device: str, dtype: torch.dtype):
    cfg = json.loads((path / "config.json").read_text())
    model = build_model(cfg, path / "tokenizer.json", device=device, dtype=dtype)
    load_zoo_weights(model, path / "model.safetensors")
    if (path / "codebooks.json").exists():  # a codebook fine-tune (saes.codebook): its bottlenecks go back on
        from probe.codebook import attach, load_codebooks

        attach(model, load_codebooks(path))
    return model.eval()


def _load_hf_dir(path: str, device: str, dtype: torch.dtype):
    """A local Hugging Face causal-LM directory, converted without weight processing (logits match HF's).

    TL's ``from_pretrained`` only accepts official names, so we call its config and weight converters
    directly. They guess the architecture from substrings of the name ("llama", "gemma") before
    reading config.json, so they see the directory through a neutrally named link.
    """
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    HookedTransformer, _ = _quiet_import()
    root = Path(path).resolve()
    if not (root / "config.json").exists():
        raise SteerscopeError(f"{path} is a directory but not a model (no config.json, no zoo card.json)")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            link = Path(tmp) / "model"
            link.symlink_to(root, target_is_directory=True)
            cfg = loading.get_pretrained_model_config(str(link), device=device, dtype=dtype)
            state = loading.get_pretrained_state_dict(str(link), cfg, hf_model, dtype=dtype)
    except (OSError, ValueError, KeyError, AttributeError, NotImplementedError) as e:
        raise SteerscopeError(f"cannot load {path} as a causal LM: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    has_tokenizer = any((root / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
    cfg.model_name, cfg.tokenizer_name = root.name, None
    tok = AutoTokenizer.from_pretrained(root) if has_tokenizer else None
    if tok is not None:
        cfg.default_prepend_bos = prepends_bos(tok)  # the model's own tokenizer decides, not TL's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tok)
        if tok is not None:
            keep_own_tokenizer(model, tok)
        model.load_and_process_state_dict(
            state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        )
    from probe.twin import attach

    attach(model, lambda: AutoModelForCausalLM.from_pretrained(root, dtype=dtype))  # the hot paths' twin
    return model.eval()


def _load_official(name: str, device: str, dtype: torch.dtype):
    HookedTransformer, _ = _quiet_import()
    from huggingface_hub import is_offline_mode
    from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES, make_model_alias_map

    if name.lower() not in make_model_alias_map():
        known = [*ZOO_NAMES, *OFFICIAL_MODEL_NAMES, *(a for aliases in MODEL_ALIASES.values() for a in aliases)]
        raise SteerscopeError(
            f"unknown model {name!r}: not a zoo model ({', '.join(ZOO_NAMES)}), not a directory, "
            f"not a TransformerLens name.{suggest(name, known)}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return HookedTransformer.from_pretrained(name, device=device, dtype=dtype).eval()
    except OSError as e:
        cause = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if is_offline_mode() else (
            f"the hub is unreachable or refused: {str(e).splitlines()[0][:120]}"
        )
        raise SteerscopeError(
            f"cannot load {name!r}: {cause}; use a zoo model ({', '.join(ZOO_NAMES)}) or a local directory"
        ) from e
