"""A retrieval index: chunks, their BM25 statistics and (optionally) their dense embeddings.

    index = Index.build([("doc-1", text), ...], tokenizer, encoder=DenseEncoder(model, tok))
    index.save("idx/");  index = Index.load("idx/")

On disk (the folder is written under a temporary name and renamed into place, so a crash
never leaves half an index):
    IDX/index.json              format, version, sizes, chunking and BM25 settings, the
                                encoder's fingerprint, and every chunk {id, doc_id, start, end, text}
    IDX/embeddings.safetensors  {"embeddings": (n_chunks, dim) float32}, only with an encoder

Loading uses JSON and safetensors only (no pickle, so an index from elsewhere cannot run
code), and checks what the JSON declares against what is there: the chunk count, the
embedding shape and dtype, finite values. BM25 statistics are not stored: they are rebuilt
from the chunk texts with the recorded analyzer, which takes milliseconds and cannot drift.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmstack.rag.bm25 import BM25, words
from lmstack.rag.chunking import Chunk, check_window, chunk_documents
from lmstack.utils import LmstackError, atomic_dir

FORMAT, VERSION = "lmstack-rag-index", 1
META, EMBEDDINGS = "index.json", "embeddings.safetensors"
ANALYZERS = {"words": words}


class Index:
    def __init__(self, chunks: list[Chunk], embeddings: np.ndarray | None = None, *, chunk_tokens: int = 128,
                 overlap: int = 32, k1: float = 1.5, b: float = 0.75, analyzer: str = "words",
                 encoder: dict | None = None):
        if not chunks:
            raise LmstackError("the index is empty: no document produced a chunk; give at least one "
                               "non-empty document")
        if analyzer not in ANALYZERS:
            raise LmstackError(f"unknown analyzer {analyzer!r}; valid: {', '.join(ANALYZERS)}")
        if embeddings is not None and (embeddings.ndim != 2 or embeddings.shape[0] != len(chunks)):
            raise LmstackError(f"embeddings of shape {tuple(embeddings.shape)} do not match {len(chunks)} chunks")
        self.chunks = chunks
        self.embeddings = embeddings
        self.chunk_tokens, self.overlap = chunk_tokens, overlap
        self.analyzer = analyzer
        self.encoder = encoder            # {"fingerprint", "layer", "dim", "kind"} of the model that embedded
        self.bm25 = BM25(k1, b).fit(ANALYZERS[analyzer](c.text) for c in chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def analyze(self, text: str) -> list[str]:
        return ANALYZERS[self.analyzer](text)

    @classmethod
    def build(cls, docs, tokenizer, *, chunk_tokens: int = 128, overlap: int = 32, encoder=None,
              k1: float = 1.5, b: float = 0.75) -> "Index":
        """Chunk (doc_id, text) pairs with `tokenizer`; embed the chunks if an encoder is given."""
        check_window(chunk_tokens, overlap)
        chunks = chunk_documents(docs, tokenizer, chunk_tokens, overlap)
        if not chunks:
            raise LmstackError("the index would be empty: no documents, or only empty ones")
        emb, info = None, None
        if encoder is not None:
            emb = encoder.encode([c.text for c in chunks])
            info = {"fingerprint": encoder.fingerprint, "layer": encoder.layer, "dim": encoder.dim,
                    "kind": getattr(encoder, "kind", "hidden_states")}
        return cls(chunks, emb, chunk_tokens=chunk_tokens, overlap=overlap, k1=k1, b=b, encoder=info)

    # ---- persistence -------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save

        path = Path(path)
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / META).is_file())):
            raise LmstackError(f"{path} exists and is not an index folder; choose another output path")
        meta = {"format": FORMAT, "version": VERSION, "n_chunks": len(self.chunks),
                "dim": None if self.embeddings is None else int(self.embeddings.shape[1]),
                "chunk_tokens": self.chunk_tokens, "overlap": self.overlap, "analyzer": self.analyzer,
                "bm25": {"k1": self.bm25.k1, "b": self.bm25.b}, "encoder": self.encoder,
                "chunks": [c.to_dict() for c in self.chunks]}
        with atomic_dir(path) as tmp:
            (tmp / META).write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
            if self.embeddings is not None:
                (tmp / EMBEDDINGS).write_bytes(save({"embeddings": np.ascontiguousarray(self.embeddings,
                                                                                       dtype=np.float32)}))

    @classmethod
    def load(cls, path: str | Path) -> "Index":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / META).is_file():
            raise LmstackError(f"{path} is not an index folder (no {META}); build one with `lmstack rag index`")
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmstackError(f"{path / META} is not valid JSON ({e}); rebuild the index") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LmstackError(f"{path / META} is not an lmstack RAG index (format {FORMAT!r} expected)")
        if meta.get("version") != VERSION:
            raise LmstackError(f"{path} has index version {meta.get('version')!r}; this lmstack reads "
                               f"version {VERSION}; rebuild the index")
        rows, n = meta.get("chunks"), meta.get("n_chunks")
        if not isinstance(rows, list) or not isinstance(n, int) or len(rows) != n:
            raise LmstackError(f"{path / META} declares n_chunks={n!r} but holds "
                               f"{len(rows) if isinstance(rows, list) else 'no'} chunks; the index is damaged")
        try:
            chunks = [Chunk(str(r["id"]), str(r["doc_id"]), int(r["start"]), int(r["end"]), str(r["text"]))
                      for r in rows]
        except (KeyError, TypeError, ValueError) as e:
            raise LmstackError(f"{path / META}: a chunk lacks a field or has a bad value ({e!r}); the index "
                               f"is damaged") from None
        emb, dim = None, meta.get("dim")
        if dim is not None:
            try:
                tensors = load_file(str(path / EMBEDDINGS))
            except (FileNotFoundError, SafetensorError, OSError) as e:
                raise LmstackError(f"{path / EMBEDDINGS} could not be read ({e}); the index declares "
                                   f"dim={dim}") from None
            emb = tensors.get("embeddings")
            if emb is None or emb.dtype != np.float32 or emb.shape != (n, dim):
                got = "no 'embeddings' tensor" if emb is None else f"{emb.dtype} {tuple(emb.shape)}"
                raise LmstackError(f"{path / EMBEDDINGS} holds {got}; {META} declares float32 ({n}, {dim})")
            if not np.isfinite(emb).all():
                raise LmstackError(f"{path / EMBEDDINGS} holds non-finite values; rebuild the index")
        bm = meta.get("bm25") or {}
        return cls(chunks, emb, chunk_tokens=meta.get("chunk_tokens", 0), overlap=meta.get("overlap", 0),
                   k1=bm.get("k1", 1.5), b=bm.get("b", 0.75), analyzer=meta.get("analyzer", "words"),
                   encoder=meta.get("encoder"))
