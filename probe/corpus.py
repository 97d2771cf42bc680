"""Text sources: the bundled Jane Austen corpus, Hugging Face datasets, and local files.

``load_corpus(spec, split)`` returns a list of documents (strings). Specs:

- ``"austen"``: the six novels from Debian's ``r-cran-janeaustenr`` package, one document per
  chapter, split deterministically by chapter into train (90%), val (5%) and test (5%).
- ``"hf:<dataset>[:split]"``: a Hugging Face dataset (a hub name, or a directory written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``); the ``text`` column of that split
  (default ``train``).
- a path or glob of ``.txt`` files (one document per file) or ``.jsonl`` files (a ``text`` field
  per line).

The ``split`` argument chooses a part of "austen" only. Other sources are used whole (``split`` is
``"train"`` or ``"all"``); asking them for "val" or "test" is an error rather than a silent reuse
of the training text: name the held-out data in the spec instead.

``pack(tokenizer, texts, n_ctx)`` turns documents into fixed-length contexts, each starting with BOS.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import torch

from probe.errors import SteerscopeError

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
SPLITS = ("train", "val", "test", "all")
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlcdm]+)\.?\s*$", re.IGNORECASE)


def cache_dir() -> Path:
    """Where steerscope caches derived data (``$STEERSCOPE_CACHE`` or ``~/.cache/steerscope``)."""
    root = os.environ.get("STEERSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "steerscope"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_corpus(spec: str, split: str = "train") -> list[str]:
    """Load documents from ``spec`` (see module docstring). Raises SteerscopeError on bad input."""
    if split not in SPLITS:
        raise SteerscopeError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if spec != "austen" and split not in ("train", "all"):
        raise SteerscopeError(
            f"split {split!r} exists only for 'austen'; for {spec!r} name the held-out data in the spec "
            "('hf:<dataset>:validation', or a separate file or glob) and load it whole"
        )
    if spec == "austen":
        docs = austen_split(split)
    elif spec.startswith("hf:"):
        docs = _load_hf(spec[3:])
    else:
        docs = _load_files(spec)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SteerscopeError(f"corpus {spec!r} (split {split!r}) is empty: no non-blank documents")
    return docs


# ---------------------------------------------------------------- austen
def austen_chapters() -> list[dict]:
    """All chapters as ``{"book", "chapter", "text"}`` dicts, cached as JSON after the first call."""
    cached = cache_dir() / "austen-chapters.json"
    if cached.exists():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cached.unlink()
    books = _fetch_austen_books()
    chapters = [c for name in AUSTEN_BOOKS for c in _split_chapters(name, books[name])]
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(chapters), encoding="utf-8")
    tmp.replace(cached)
    return chapters


def chapter_split(index: int) -> str:
    """Deterministic split of the chapter with global ``index``: 18/20 train, 1/20 val, 1/20 test."""
    r = index % 20
    return "val" if r == 7 else "test" if r == 13 else "train"


def austen_split(split: str) -> list[str]:
    chapters = austen_chapters()
    return [c["text"] for i, c in enumerate(chapters) if split == "all" or chapter_split(i) == split]


def _split_chapters(book: str, lines: list[str]) -> list[dict]:
    chapters: list[dict] = []
    current: list[str] | None = None
    for line in lines:
        if _CHAPTER.match(line):
            if current is not None:
                chapters.append(current)
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        chapters.append(current)
    return [{"book": book, "chapter": i + 1, "text": _reflow(c)} for i, c in enumerate(chapters) if _reflow(c)]


def _reflow(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs separated by blank lines; drop VOLUME/END markers."""
    paras, cur = [], []
    for line in lines:
        s = line.strip()
        if not s or re.match(r"^(volume\s+[ivx0-9]+|the end|finis)\.?$", s, re.IGNORECASE):
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def _fetch_austen_books() -> dict[str, list[str]]:
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise SteerscopeError(
                f"the 'austen' corpus needs {tool} (Debian/Ubuntu) to fetch {AUSTEN_PACKAGE}; on other "
                "systems use a local corpus ('path/*.txt', 'file.jsonl') or 'hf:<dataset>'"
            )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", AUSTEN_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            reason = (proc.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise SteerscopeError(
                f"apt-get download {AUSTEN_PACKAGE} failed ({reason}); run 'apt-get update' first, "
                "or use a local corpus ('path/*.txt', 'file.jsonl') or 'hf:<dataset>'"
            )
        subprocess.run(["dpkg", "-x", str(debs[0]), os.path.join(tmp, "x")], check=True, capture_output=True)
        data = next(Path(tmp, "x").rglob("janeaustenr/data"), None)
        if data is None:
            raise SteerscopeError(f"{debs[0].name} has no janeaustenr/data directory; the package layout changed")
        return _read_r_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")


def _read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, list[str]]:
    """Decode an R lazy-load database (index + zlib records) with the ``rdata`` package."""
    import warnings

    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(rdx.read_bytes())
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        out[str(name)] = [str(s) for s in parse(zlib.decompress(record[4:]))]
    return out


# ---------------------------------------------------------------- other sources
def _load_hf(rest: str) -> list[str]:
    name, _, split = rest.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise SteerscopeError("'hf:' corpora need the 'datasets' package: pip install datasets") from e
    try:
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise SteerscopeError(f"dataset {name!r} has no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            if not _hub_reachable():  # fail in one line now, not after the hub client's retries
                raise SteerscopeError(f"offline: the dataset hub is unreachable, so hf:{name} cannot be fetched; give a "
                                      "save_to_disk directory instead (hf:/path/to/dir[:split])")
            ds = datasets.load_dataset(name, split=split)
    except SteerscopeError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub can fail in many ways; one line for the user
        raise SteerscopeError(f"cannot load dataset {name!r} split {split!r}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if "text" not in ds.column_names:
        raise SteerscopeError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return [str(t) for t in ds["text"]]


def _hub_reachable(timeout: float = 2.0) -> bool:
    """False when the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or cannot be connected to."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; a missing, unreadable, binary or non-UTF-8 file is one SteerscopeError line.
    Every command that reads text a user gives (prompts, pairs, configs, corpora) reads it through here."""
    path = Path(path)
    if not path.is_file():
        raise SteerscopeError(f"{what} {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SteerscopeError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if b"\x00" in data:
        raise SteerscopeError(f"{what} {path} is a binary file, not text; give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SteerscopeError(f"{what} {path} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8") from e


def _load_files(spec: str) -> list[str]:
    paths = sorted(globlib.glob(spec)) if any(ch in spec for ch in "*?[") else [spec]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise SteerscopeError(
            f"unknown corpus {spec!r}: not 'austen', not 'hf:<dataset>', and no file matches it"
        )
    docs: list[str] = []
    for p in paths:
        text = read_text_file(p)
        if p.endswith(".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise SteerscopeError(f"{p}:{n}: expected a JSON object with a 'text' field") from e
        else:
            docs.append(text)
    return docs


# ---------------------------------------------------------------- packing
def _plain(tokenizer):
    """A copy without truncation or padding (transformers switches both on in the shared backend tokenizer
    whenever it pads a batch, which would silently cut every document to the model's context)."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def pack(tokenizer, texts: list[str], n_ctx: int, bos_id: int | None = None, eos_id: int | None = None) -> torch.Tensor:
    """Tokenize ``texts``, join them (EOS between documents), and cut into rows of ``n_ctx`` tokens.

    Every row starts with BOS followed by ``n_ctx - 1`` stream tokens; the ragged tail is dropped.
    ``tokenizer`` is a ``tokenizers.Tokenizer`` (or a transformers fast tokenizer, e.g. ``model.tokenizer``).
    Returns a LongTensor ``[n_rows, n_ctx]``.
    """
    tokenizer = _plain(getattr(tokenizer, "backend_tokenizer", tokenizer))
    bos_id = tokenizer.token_to_id("<|bos|>") if bos_id is None else bos_id
    eos_id = tokenizer.token_to_id("<|eos|>") if eos_id is None else eos_id
    if bos_id is None or eos_id is None:
        raise SteerscopeError("the tokenizer has no <|bos|>/<|eos|> tokens; pass bos_id and eos_id")
    if n_ctx < 2:
        raise SteerscopeError(f"n_ctx must be at least 2 (BOS + one token), got {n_ctx}")
    stream: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eos_id)
    body = n_ctx - 1
    n_rows = len(stream) // body
    if n_rows == 0:
        raise SteerscopeError(f"corpus has {len(stream)} tokens, fewer than one context of {n_ctx}")
    ids = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    return torch.cat([torch.full((n_rows, 1), bos_id, dtype=torch.long), ids], dim=1)
