"""The data half of a recipe: corpus -> tokenizer -> token shards, into one data directory.

    meta = build_corpus_dir(opts, "runs/x/data")        # docs/, tasks/, eval/, kb/, meta.json
    tok = train_tokenizer(opts, "runs/x/data")          # + tokenizer.json
    write_token_shards("runs/x/data", tok)              # + shards/
    ensure_data_dir(opts, "runs/t/data")                # all three, or reuse a matching dir

The first three stages of `lmstack run`, `lmstack train` without --data and `lmstack data
build` all go through these functions with a `RunOptions`, so one recipe makes the same data
directory whichever command builds it (same documents, same tokenizer, same shards).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from lmstack.pipeline.options import DATA_KEYS, SPECIAL_TOKENS, RunOptions, corpus_options_for
from lmstack.utils import LmstackError, atomic_write_json

RECORD = "recipe.json"      # DATA_DIR/recipe.json: the data keys it was built with


def build_corpus_dir(opts: RunOptions, data_dir: str | Path) -> dict:
    """Build (replace) the corpus part of `data_dir`; returns its meta.json."""
    from lmstack.data import build_corpus

    return build_corpus(corpus_options_for(opts, str(data_dir)))


def train_tokenizer(opts: RunOptions, data_dir: str | Path):
    """Train the byte-level BPE on the train documents; saved as DATA_DIR/tokenizer.json."""
    from lmstack.data import iter_texts
    from lmstack.tokenizer import Tokenizer

    texts = list(iter_texts(data_dir, "train"))
    tok = Tokenizer.train(texts, vocab_size=opts.vocab_size, pattern=opts.tokenizer_pattern,
                          special_tokens=SPECIAL_TOKENS)
    tok.save(Path(data_dir) / "tokenizer.json")
    return tok


def write_token_shards(data_dir: str | Path, tok, splits=("train", "val")) -> dict:
    """Tokenize the documents of `splits` into DATA_DIR/shards; returns shards/meta.json."""
    from lmstack.data import write_shards

    return write_shards(data_dir, tok, splits=splits)


def data_record(opts: RunOptions) -> dict:
    return {k: getattr(opts, k) for k in DATA_KEYS}


def build_data_dir(opts: RunOptions, data_dir: str | Path, splits=("train", "val"), tokenizer: str | None = None,
                   log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Corpus, tokenizer (trained, or the tokenizer.json `tokenizer`), shards of `splits`;
    returns (meta.json, shards/meta.json)."""
    data_dir = Path(data_dir)
    log(f"building {data_dir}: corpus {opts.corpus} ...")
    meta = build_corpus_dir(opts, data_dir)
    if tokenizer is not None:
        from lmstack.tokenizer import Tokenizer

        if not Path(tokenizer).is_file():
            raise LmstackError(f"tokenizer {tokenizer} not found; pass a tokenizer.json or omit --tokenizer")
        tok = Tokenizer.load(tokenizer)
        tok.save(data_dir / "tokenizer.json")
    else:
        log(f"training a {opts.vocab_size}-token BPE tokenizer ...")
        tok = train_tokenizer(opts, data_dir)
    shards = write_token_shards(data_dir, tok, splits)
    atomic_write_json(data_dir / RECORD, {**data_record(opts), "tokenizer": tokenizer})
    return meta, shards


def ensure_data_dir(opts: RunOptions, data_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """`data_dir` built from the recipe's data keys, reused when an earlier build used the
    same keys; an existing directory built otherwise is an error, not a silent rebuild."""
    data_dir = Path(data_dir)
    record = data_dir / RECORD
    if record.is_file() and (data_dir / "shards" / "meta.json").is_file() and (data_dir / "tokenizer.json").is_file():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        want = {**data_record(opts), "tokenizer": None}
        if old == want:
            return data_dir
        if isinstance(old, dict):
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in want.items() if old.get(k) != v)
            raise LmstackError(f"{data_dir} was built with other data settings ({diff}); delete it to rebuild, "
                               f"or pass --data {data_dir} to train on it as it is")
    build_data_dir(opts, data_dir, log=log)
    return data_dir
