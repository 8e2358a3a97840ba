"""Building data directories from files: bad input is a one-line error raised before any work."""
from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest

from lmstack.data import CorpusOptions, build_corpus, iter_texts, read_jsonl
from lmstack.utils.errors import LmstackError


def _docs(tmp_path, n=12):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        (src / f"d{i:02d}.txt").write_text(f"document number {i} says caf\u0065\u0301 and more words {i * 7}.\r\n")
    return src


def test_text_folder_is_cleaned_and_split(tmp_path):
    src = _docs(tmp_path)
    (src / "skip.bin").write_bytes(b"\x00\xff")            # not a text suffix: ignored
    meta = build_corpus(CorpusOptions(corpus=str(src), out=str(tmp_path / "out"), val_frac=0.1, test_frac=0.1))
    texts = [t for s in ("train", "val", "test") for t in iter_texts(tmp_path / "out", s)]
    assert len(texts) == 12 and all(len(list(iter_texts(tmp_path / "out", s))) for s in ("val", "test"))
    assert all("caf\u00e9" in t and "\r" not in t and not t.endswith("\n") for t in texts)   # NFC, newlines
    assert meta["documents"]["kept"] == 12 and read_jsonl(tmp_path / "out" / "tasks" / "train.jsonl") == []
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]["train"]["documents"] == 10


def test_jsonl_field_and_size_cap(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"body": f"text {i} " * 50, "id": i}) + "\n" for i in range(30)))
    build_corpus(CorpusOptions(corpus=str(f), out=str(tmp_path / "o"), field="body", size_mb=0.005))
    n = sum(len(list(iter_texts(tmp_path / "o", s))) for s in ("train", "val", "test"))
    assert 10 <= n < 30
    with pytest.raises(LmstackError, match=r"c.jsonl:1 has no field 'text' \(found \['body', 'id'\]\); pass --field"):
        build_corpus(CorpusOptions(corpus=str(f), out=str(tmp_path / "o2")))
    f.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(LmstackError, match="c.jsonl:2 is not valid JSON"):
        build_corpus(CorpusOptions(corpus=str(f), out=str(tmp_path / "o3")))


def test_non_utf8_names_file_and_offset_or_is_replaced(tmp_path):
    src = _docs(tmp_path)
    (src / "bad.txt").write_bytes(b"hello \xff world")
    with pytest.raises(LmstackError, match=r"bad.txt is not valid UTF-8 \(byte 0xff at offset 6\).*--errors replace"):
        build_corpus(CorpusOptions(corpus=str(src), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    build_corpus(CorpusOptions(corpus=str(src), out=str(tmp_path / "out"), errors="replace"))
    texts = [t for s in ("train", "val", "test") for t in iter_texts(tmp_path / "out", s)]
    assert "hello \ufffd world" in texts


def test_missing_empty_and_too_small_corpora(tmp_path):
    with pytest.raises(LmstackError, match="does not exist"):
        build_corpus(CorpusOptions(corpus=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmstackError, match="holds no .txt"):
        build_corpus(CorpusOptions(corpus=str(tmp_path / "empty"), out=str(tmp_path / "o")))
    (tmp_path / "empty" / "a.txt").write_text("  \n\t\n")
    with pytest.raises(LmstackError, match="has no text"):
        build_corpus(CorpusOptions(corpus=str(tmp_path / "empty"), out=str(tmp_path / "o")))
    (tmp_path / "empty" / "b.txt").write_text("one real document")
    with pytest.raises(LmstackError, match="too few for train/val/test"):
        build_corpus(CorpusOptions(corpus=str(tmp_path / "empty"), out=str(tmp_path / "o")))
    build_corpus(CorpusOptions(corpus=str(tmp_path / "empty"), out=str(tmp_path / "o"), val_frac=0, test_frac=0))
    assert list(iter_texts(tmp_path / "o", "train")) == ["one real document"]
    with pytest.raises(ValueError, match="noise must be a probability"):
        CorpusOptions(out="x", noise=1.5)
    with pytest.raises(ValueError, match="out is required"):
        CorpusOptions()


def test_refuses_to_replace_a_foreign_folder_and_a_too_full_disk(tmp_path, monkeypatch):
    src = _docs(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(LmstackError, match="not an lmstack data directory"):
        build_corpus(CorpusOptions(corpus=str(src), out=str(precious)))
    assert (precious / "thesis.txt").read_text() == "do not delete"
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(LmstackError, match=r"not enough disk space .* need about 8 MB, 0 MB free"):
        build_corpus(CorpusOptions(corpus="tinyworld", out=str(tmp_path / "tw"), size_mb=2))
    assert not (tmp_path / "tw").exists()


def test_rebuilding_replaces_an_existing_data_dir(tmp_path):
    src = _docs(tmp_path)
    build_corpus(CorpusOptions(corpus=str(src), out=str(tmp_path / "o")))
    (src / "d00.txt").write_text("a brand new first document")
    build_corpus(CorpusOptions(corpus=str(src), out=str(tmp_path / "o")))
    texts = [t for s in ("train", "val", "test") for t in iter_texts(tmp_path / "o", s)]
    assert "a brand new first document" in texts


def test_noise_only_touches_training_data_and_keeps_records_consistent(tmp_path):
    kw = dict(corpus="tinyworld", size_mb=0.1, seed=5)
    clean = build_corpus(CorpusOptions(out=str(tmp_path / "clean"), **kw))
    noisy = build_corpus(CorpusOptions(out=str(tmp_path / "noisy"), noise=0.3, **kw))
    assert clean["noise"] == {"typo": 0, "shuffle": 0, "label": 0}
    assert all(v > 10 for v in noisy["noise"].values())
    for s in ("val", "test"):
        assert list(iter_texts(tmp_path / "clean", s)) == list(iter_texts(tmp_path / "noisy", s))
    train_clean, train_noisy = list(iter_texts(tmp_path / "clean", "train")), list(iter_texts(tmp_path / "noisy", "train"))
    changed = sum(a != b for a, b in zip(train_clean, train_noisy))
    assert abs(changed / len(train_clean) - 0.3) < 0.05
    docs = set(train_noisy)
    swapped = 0
    for a, b in zip(read_jsonl(tmp_path / "clean" / "tasks" / "train.jsonl"),
                    read_jsonl(tmp_path / "noisy" / "tasks" / "train.jsonl")):
        assert b["prompt"] + b["response"] in docs and b["answer"] == b["response"].strip()
        if a != b:
            assert (b["response"], b["rejected"]) == (a["rejected"], a["response"])
            swapped += 1
    assert swapped == noisy["noise"]["label"]
