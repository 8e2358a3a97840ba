"""Token shards: documents -> token ids in flat binary files, read back as numpy memmaps.

    info = write_shards(DIR, tokenizer, splits=("train", "val"))
    ds = ShardSet(DIR / "shards", "train")
    ds.tokens          # 1-D np.uint16/uint32 array of every token id of the split
    len(ds), ds.eot_token, ds.vocab_size

Layout: DIR/shards/<split>_NNNN.bin hold raw little-endian ids (uint16 when the vocabulary
fits in 16 bits, else uint32), with no header, so `np.memmap` reads them without copying.
Each document is preceded by the `<|endoftext|>` id, so documents are separated by it and
the first token of a split is always EOT (the model sees EOT -> start of a document).
DIR/shards/meta.json records the dtype, token and document counts per file, the vocabulary
size, the EOT id and a fingerprint of the tokenizer, and is checked on every open: a
truncated file, a file from another build or a tokenizer mismatch is a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from lmstack.utils.errors import LmstackError
from lmstack.utils.io import atomic_dir
from lmstack.utils.progress import progress

FORMAT = "lmstack-shards"
SHARD_TOKENS = 1 << 28           # at most 256M tokens (512 MB of uint16) per file
_PROBE = "The quick brown fox: 3+4=7. Ünïcödé, 日本語, tabs\tand\nnewlines!  "


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of how `tokenizer` encodes a fixed probe text, plus its size and EOT id:
    two tokenizers that differ in any way that matters here get different fingerprints."""
    ids = tokenizer.encode_ordinary(_PROBE)
    blob = json.dumps([list(map(int, ids)), int(tokenizer.n_vocab), tokenizer.eot_token]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _dtype_for(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode documents as plain text: a literal "<|endoftext|>" inside a document stays text."""
    if hasattr(tokenizer, "encode_ordinary_batch"):
        return tokenizer.encode_ordinary_batch(texts)
    if hasattr(tokenizer, "encode_batch") and not any("<|" in t for t in texts):
        return tokenizer.encode_batch(texts)       # no special-token text, so batch == ordinary
    return [tokenizer.encode_ordinary(t) for t in texts]


def write_shards(data_dir: str | os.PathLike, tokenizer, splits=("train", "val"),
                 batch_docs: int = 1024) -> dict:
    """Tokenize the documents of `splits` into DIR/shards/ (replacing it); returns meta.json's dict.

    `tokenizer` is any object with `encode_ordinary(text)` (or `encode_ordinary_batch`),
    `n_vocab` and `eot_token` (the id of "<|endoftext|>")."""
    from lmstack.data.build import iter_texts  # noqa: PLC0415  (build imports nothing from here)

    data_dir = Path(data_dir)
    eot = getattr(tokenizer, "eot_token", None)
    if eot is None:
        raise LmstackError("tokenizer has no <|endoftext|> token; train or load it with "
                           "special_tokens=['<|endoftext|>']")
    n_vocab = int(tokenizer.n_vocab)
    dtype = _dtype_for(n_vocab)
    # check space first: a token takes at least one byte of text, so bytes * itemsize bounds it
    docs_bytes = sum((data_dir / "docs" / f"{s}.jsonl").stat().st_size
                     for s in splits if (data_dir / "docs" / f"{s}.jsonl").is_file())
    free = shutil.disk_usage(data_dir if data_dir.exists() else data_dir.parent).free
    if free < docs_bytes * dtype.itemsize // 2:
        raise LmstackError(f"not enough disk space for shards in {data_dir}: need about "
                           f"{docs_bytes * dtype.itemsize // 2 / 1e6:.0f} MB, {free / 1e6:.0f} MB free; "
                           f"free space or build a smaller corpus")
    meta = {"format": FORMAT, "version": 1, "dtype": dtype.name, "vocab_size": n_vocab, "eot_token": int(eot),
            "tokenizer": tokenizer_fingerprint(tokenizer), "splits": {}}
    with atomic_dir(data_dir / "shards") as tmp:
        for split in splits:
            texts = iter_texts(data_dir, split)      # raises if the split file is missing
            files, buf, n_docs, n_tok, pending = [], [], 0, 0, 0

            def flush():
                arr = np.concatenate(buf) if buf else np.zeros(0, dtype=np.int64)
                name = f"{split}_{len(files):04d}.bin"
                arr.astype(dtype.newbyteorder("<")).tofile(tmp / name)
                files.append({"name": name, "tokens": int(arr.size)})
                buf.clear()

            chunk: list[str] = []
            bar = progress(desc=f"tokenizing {split}", unit="doc")
            for text in [*texts, None]:
                if text is not None:
                    chunk.append(text)
                if chunk and (text is None or len(chunk) == batch_docs):
                    for ids in _encode(tokenizer, chunk):
                        a = np.empty(len(ids) + 1, dtype=np.int64)
                        a[0] = eot
                        a[1:] = ids
                        buf.append(a)
                        n_tok += a.size
                        pending += a.size
                        if pending >= SHARD_TOKENS:
                            flush()
                            pending = 0
                    bar.update(len(chunk))
                    n_docs += len(chunk)
                    chunk = []
            bar.close()
            if buf or not files:
                flush()
            top = max((int(np.fromfile(tmp / f["name"], dtype=dtype).max(initial=0)) for f in files), default=0)
            if top >= n_vocab:
                raise LmstackError(f"tokenizer produced id {top} >= n_vocab {n_vocab}; the tokenizer is broken")
            meta["splits"][split] = {"files": files, "tokens": n_tok, "documents": n_docs}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


class ShardSet:
    """Read-only memmap view of one split's shards, validated against shards/meta.json."""

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train"):
        shard_dir = Path(shard_dir)
        if (shard_dir / "shards" / "meta.json").is_file():
            shard_dir = shard_dir / "shards"         # a data DIR works too
        meta_path = shard_dir / "meta.json"
        if not meta_path.is_file():
            raise LmstackError(f"{meta_path} not found; write shards first (`lmstack data build` "
                               f"or lmstack.data.write_shards)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise LmstackError(f"{meta_path} is not valid JSON; rebuild the shards") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LmstackError(f"{meta_path} is not an lmstack shard index (format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r}); rebuild the shards")
        if split not in meta["splits"]:
            raise LmstackError(f"split {split!r} has no shards in {shard_dir} (have: "
                               f"{', '.join(meta['splits'])}); write_shards(..., splits=(..., {split!r}))")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise LmstackError(f"{meta_path}: unsupported dtype {meta['dtype']!r}; rebuild the shards")
        self.meta = meta
        self.split = split
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.eot_token: int = meta["eot_token"]
        self.vocab_size: int = meta["vocab_size"]
        self.tokenizer_fingerprint: str = meta["tokenizer"]
        self.shards: list[np.ndarray] = []
        for f in meta["splits"][split]["files"]:
            path = shard_dir / f["name"]
            if not path.is_file():
                raise LmstackError(f"shard {path} is missing; rebuild the shards")
            size = path.stat().st_size
            if size % self.dtype.itemsize or size // self.dtype.itemsize != f["tokens"]:
                raise LmstackError(f"shard {path} is truncated or foreign: {size} bytes, meta.json expects "
                                   f"{f['tokens']} {meta['dtype']} tokens ({f['tokens'] * self.dtype.itemsize} "
                                   f"bytes); rebuild the shards")
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r") if size else
                               np.zeros(0, dtype=self.dtype))
        # cumulative starts of each shard in the split's token stream
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        if len(self) == 0:
            raise LmstackError(f"split {split!r} in {shard_dir} has no tokens; build a bigger corpus")
        if self.shards[0][0] != self.eot_token:
            raise LmstackError(f"shard {meta['splits'][split]['files'][0]['name']} does not start with the "
                               f"EOT id {self.eot_token}; it was not written by write_shards, rebuild it")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens(self) -> np.ndarray:
        """The split's ids as one 1-D array (a zero-copy memmap when there is one shard)."""
        return self.shards[0] if len(self.shards) == 1 else np.concatenate(self.shards)

    def window(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start+length] as a fresh int64 array, crossing shard boundaries if needed."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[k])
            take = min(length - filled, len(self.shards[k]) - local)
            out[filled:filled + take] = self.shards[k][local:local + take]
            filled += take
            pos += take
        return out

    def check_tokenizer(self, tokenizer) -> None:
        """Raise unless `tokenizer` is the one these shards were written with."""
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.tokenizer_fingerprint:
            raise LmstackError(f"tokenizer (fingerprint {fp}) differs from the one the shards were written "
                               f"with ({self.tokenizer_fingerprint}); use DIR/tokenizer.json or rebuild the shards")


def tokenize_corpus(data_dir: str | os.PathLike, vocab_size: int = 4096, tokenizer: str | os.PathLike | None = None,
                    splits=("train", "val", "test")) -> dict:
    """Train a BPE tokenizer on DIR's train documents (or load `tokenizer`, a tokenizer.json),
    save it as DIR/tokenizer.json and write the shards of `splits`; returns shards/meta.json."""
    from lmstack.data.build import iter_texts  # noqa: PLC0415
    from lmstack.tokenizer import Tokenizer    # noqa: PLC0415

    data_dir = Path(data_dir)
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise LmstackError(f"tokenizer {tokenizer} not found; pass a tokenizer.json or omit --tokenizer")
        tok = Tokenizer.load(tokenizer)
    else:
        tok = Tokenizer.train(list(iter_texts(data_dir, "train")), vocab_size=vocab_size)
    tok.save(data_dir / "tokenizer.json")
    return write_shards(data_dir, tok, splits=splits)
