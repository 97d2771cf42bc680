"""The bundled model zoo: small models trained by ``steerscope zoo train`` on Jane Austen.

Each model is a directory ``probe/zoo/<name>/`` with ``config.json`` (a TransformerLens
``HookedTransformerConfig`` as a dict), ``model.safetensors`` (parameters, fp16),
``tokenizer.json`` (a ``tokenizers`` byte-level BPE) and ``card.json`` (how it was trained, what it scores).
"""

from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
ZOO_NAMES = ("austen-dense", "austen-moe")


def zoo_path(name: str) -> Path:
    return ZOO_DIR / name


def available() -> list[str]:
    """Zoo names whose weights are present on disk."""
    return [n for n in ZOO_NAMES if all((zoo_path(n) / f).exists() for f in ("model.safetensors", "card.json"))]


def card(name: str) -> dict:
    return json.loads((zoo_path(name) / "card.json").read_text())
