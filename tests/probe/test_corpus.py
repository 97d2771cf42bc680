"""Corpora: the bundled Austen chapters and their splits, hf: datasets, local files, packing, bad inputs."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer

import probe.corpus as corpus
from probe.corpus import AUSTEN_BOOKS, austen_chapters, chapter_split, load_corpus, pack
from probe.errors import SteerscopeError
from probe.models import hf_tokenizer

CHAPTERS_PER_BOOK = {"sensesensibility": 50, "prideprejudice": 61, "mansfieldpark": 48,
                     "emma": 55, "northangerabbey": 31, "persuasion": 24}


# ---------------------------------------------------------------- austen
@pytest.fixture(scope="module")
def chapters():
    return austen_chapters()


def test_austen_has_six_books_and_269_chapters(chapters):
    assert len(chapters) == 269
    assert list(dict.fromkeys(c["book"] for c in chapters)) == list(AUSTEN_BOOKS)
    assert Counter(c["book"] for c in chapters) == CHAPTERS_PER_BOOK
    for book, n in CHAPTERS_PER_BOOK.items():
        assert [c["chapter"] for c in chapters if c["book"] == book] == list(range(1, n + 1))
    assert chapters[0]["text"].startswith("The family of Dashwood had long been settled in Sussex.")
    assert chapters[-1]["book"] == "persuasion"
    assert not any(corpus._CHAPTER.match(line) for c in chapters for line in c["text"].splitlines())


def test_austen_splits_are_disjoint_deterministic_and_cover_everything(chapters):
    splits = {s: load_corpus("austen", s) for s in ("train", "val", "test", "all")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 242, "val": 14, "test": 13, "all": 269}
    assert splits["all"] == [c["text"] for c in chapters]
    # each chapter lands in exactly one split (as a multiset of texts: no chapter is in two)
    assert Counter(splits["train"]) + Counter(splits["val"]) + Counter(splits["test"]) == Counter(splits["all"])
    assert set(splits["val"]).isdisjoint(splits["train"]) and set(splits["test"]).isdisjoint(splits["train"] + splits["val"])
    # the rule depends only on the chapter's position: the same every call
    assert [chapter_split(i) for i in range(40)] == [chapter_split(i) for i in range(40)]
    assert [i for i in range(40) if chapter_split(i) != "train"] == [7, 13, 27, 33]
    assert load_corpus("austen", "val") == splits["val"]


@pytest.mark.parametrize("missing", ["apt-get", "dpkg"])
def test_austen_without_apt_names_the_alternatives(tmp_path, monkeypatch, missing):
    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == missing else real_which(tool))
    with pytest.raises(SteerscopeError) as err:
        load_corpus("austen")
    msg = str(err.value)
    assert f"needs {missing}" in msg and "r-cran-janeaustenr" in msg
    assert "'path/*.txt'" in msg and "'file.jsonl'" in msg and "'hf:<dataset>'" in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written in the cache


def test_corrupt_austen_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path))
    (tmp_path / "austen-chapters.json").write_text("{not json")
    books = {name: ["CHAPTER 1", "", f"A line of {name}.", "wrapped here.", "", "Next paragraph."] for name in AUSTEN_BOOKS}
    monkeypatch.setattr(corpus, "_fetch_austen_books", lambda: books)
    got = austen_chapters()
    assert len(got) == 6 and got[0] == {"book": AUSTEN_BOOKS[0], "chapter": 1,
                                        "text": f"A line of {AUSTEN_BOOKS[0]}. wrapped here.\n\nNext paragraph."}
    assert json.loads((tmp_path / "austen-chapters.json").read_text()) == got


@pytest.mark.slow
def test_austen_fetch_from_debian_matches_the_cache(tmp_path, monkeypatch, chapters):
    """The real path: apt-get download + dpkg -x + rdata decoding, into an empty cache."""
    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path))
    assert austen_chapters() == chapters


# ---------------------------------------------------------------- hf: datasets saved to disk
def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    texts = ["First document.", "Second one.", "  ", "Third."]
    datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3, 4]}).save_to_disk(str(tmp_path / "ds"))
    assert load_corpus(f"hf:{tmp_path / 'ds'}") == ["First document.", "Second one.", "Third."]
    assert load_corpus(f"hf:{tmp_path / 'ds'}", split="all") == ["First document.", "Second one.", "Third."]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a train doc"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["a val doc", "another"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(f"hf:{tmp_path / 'dd'}") == ["a train doc"]
    assert load_corpus(f"hf:{tmp_path / 'dd'}:validation") == ["a val doc", "another"]
    with pytest.raises(SteerscopeError, match="has no split 'test' \\(splits: train, validation\\)"):
        load_corpus(f"hf:{tmp_path / 'dd'}:test")

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(SteerscopeError, match="has no 'text' column \\(columns: body\\)"):
        load_corpus(f"hf:{tmp_path / 'nt'}")


def test_hf_hub_name_offline_is_one_line_at_once(monkeypatch):
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("the hub client was called (26 s of retries offline)")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(SteerscopeError, match="offline: .*hf:no-such-user/no-such-dataset .*give a save_to_disk directory"):
        load_corpus("hf:no-such-user/no-such-dataset")


# ---------------------------------------------------------------- local files
def test_local_txt_jsonl_and_globs(tmp_path):
    (tmp_path / "b.txt").write_text("Book B.\nSecond line.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("Book A, naïve café.", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert load_corpus(str(tmp_path / "a.txt")) == ["Book A, naïve café."]
    assert load_corpus(str(tmp_path / "*.txt")) == ["Book A, naïve café.", "Book B.\nSecond line."]
    assert load_corpus(str(tmp_path / "c.jsonl")) == ["one", "two"]
    assert load_corpus(str(tmp_path / "[ac].*"), split="all") == ["Book A, naïve café.", "one", "two"]


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\n\t", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    for name in ("blank.txt", "empty.jsonl"):
        with pytest.raises(SteerscopeError, match="is empty: no non-blank documents"):
            load_corpus(str(tmp_path / name))


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Fanny Price, café".encode("latin-1"))
    with pytest.raises(SteerscopeError, match=r"latin1\.txt is not valid UTF-8 \(byte 16\); re-encode it as UTF-8"):
        load_corpus(str(tmp_path / "latin1.txt"))


def test_unknown_corpus_spec_names_the_alternatives(tmp_path):
    for spec in ("austin", str(tmp_path / "missing.txt"), str(tmp_path / "*.txt")):
        with pytest.raises(SteerscopeError, match=r"unknown corpus .*: not 'austen', not 'hf:<dataset>', and no file matches it"):
            load_corpus(spec)


def test_jsonl_without_text_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(SteerscopeError, match=r"d\.jsonl:2: expected a JSON object with a 'text' field"):
        load_corpus(str(tmp_path / "d.jsonl"))
    (tmp_path / "e.jsonl").write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(SteerscopeError, match=r"e\.jsonl:1: expected a JSON object"):
        load_corpus(str(tmp_path / "e.jsonl"))
    (tmp_path / "f.jsonl").write_text('{"text": "ok"\n', encoding="utf-8")
    with pytest.raises(SteerscopeError, match=r"f\.jsonl:1: expected a JSON object"):
        load_corpus(str(tmp_path / "f.jsonl"))


def test_bad_splits(tmp_path):
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(SteerscopeError, match="unknown split 'dev'; choose one of train, val, test, all"):
        load_corpus("austen", split="dev")
    # a held-out split of a local corpus would silently be its training text: refused, with what to do instead
    with pytest.raises(SteerscopeError, match=r"split 'val' exists only for 'austen'.*'hf:<dataset>:validation'"):
        load_corpus(str(tmp_path / "a.txt"), split="val")


# ---------------------------------------------------------------- packing
@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return Tokenizer.from_file(str(tokenizer_file))


def test_pack_rows_start_with_bos_and_carry_the_stream(tokenizer):
    texts = ["It is a truth universally acknowledged.", "Mr. Darcy", "She walked into the room, and sat down."]
    rows = pack(tokenizer, texts, n_ctx=8)
    stream = []
    for t in texts:
        stream += tokenizer.encode(t, add_special_tokens=False).ids + [1]  # EOS (id 1) after each document
    n = len(stream) // 7
    assert rows.dtype == torch.long and rows.shape == (n, 8) and n >= 2
    assert rows[:, 0].tolist() == [0] * n  # BOS is id 0
    assert rows[:, 1:].flatten().tolist() == stream[: n * 7]
    assert not (rows[:, 1:] == 0).any()


def test_pack_accepts_the_models_tokenizer(tokenizer, tokenizer_file):
    texts = ["My dear Emma,", "The weather at Bath"]
    torch.testing.assert_close(pack(hf_tokenizer(tokenizer_file), texts, 4), pack(tokenizer, texts, 4), rtol=0, atol=0)


def test_pack_errors(tokenizer):
    with pytest.raises(SteerscopeError, match="fewer than one context of 64"):
        pack(tokenizer, ["short"], n_ctx=64)
    with pytest.raises(SteerscopeError, match="n_ctx must be at least 2"):
        pack(tokenizer, ["short"], n_ctx=1)


def test_pack_ignores_truncation_left_in_the_shared_tokenizer(tiny_dense):
    """TransformerLens tokenization turns on truncation in model.tokenizer's backend; pack must not inherit it."""
    from probe.corpus import pack

    texts = ["word " * 2000]
    before = pack(tiny_dense.tokenizer, texts, 64)
    tiny_dense.to_tokens(["a", "a longer prompt"])  # pads a batch: sets truncation/padding on the backend
    after = pack(tiny_dense.tokenizer, texts, 64)
    assert torch.equal(before, after) and before.shape[0] > 20
