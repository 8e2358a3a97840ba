"""BM25 with Lucene's scoring, over any tokens (words, or token ids).

    bm25 = BM25(k1=1.5, b=0.75).fit([["the", "cat"], ["a", "dog", "dog"]])
    bm25.scores(["dog"])          # numpy (n_docs,) float64

For a query q and a document d of length |d| (tokens), with N documents of mean length L:

    score(q, d) = sum over query tokens t (repeats count) of
                  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / L))
    idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

This is Lucene's variant (Kamphuis et al., ECIR 2020): its idf is never negative (a word in
every document still scores a little, instead of the Robertson idf's negative weight), and
the numerator drops the constant (k1 + 1), which does not change the ranking. The test
suite checks the scores against `bm25s.BM25(method="lucene")` on the same tokens. Tokens
absent from the corpus contribute nothing.

`words(text)` is the default analyzer for retrieval: lowercase runs of letters and digits
("Bolo's pet" -> ["bolo", "s", "pet"]). Whole words suit invented names better than BPE
pieces, which two different names may share.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Iterable, Sequence

import numpy as np

from lmstack.utils import LmstackError

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    def __init__(self, k1: float = 1.5, b: float = 0.75):
        if not (isinstance(k1, (int, float)) and k1 >= 0):
            raise LmstackError(f"BM25 k1 must be a number >= 0, got {k1!r}")
        if not (isinstance(b, (int, float)) and 0 <= b <= 1):
            raise LmstackError(f"BM25 b must be a number in [0, 1], got {b!r}")
        self.k1, self.b = float(k1), float(b)
        self.n_docs = 0
        self.doc_len = np.zeros(0)
        # token -> (doc indices (n,) int64, term frequencies (n,) float64): an inverted index
        self.postings: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
        self.idf: dict[Hashable, float] = {}

    def fit(self, tokenized_docs: Iterable[Sequence[Hashable]]) -> "BM25":
        docs = [list(d) for d in tokenized_docs]
        if not docs:
            raise LmstackError("BM25.fit got no documents; an index needs at least one")
        self.n_docs = len(docs)
        self.doc_len = np.array([len(d) for d in docs], dtype=np.float64)
        rows: dict[Hashable, tuple[list[int], list[int]]] = {}
        for i, d in enumerate(docs):
            for tok, tf in Counter(d).items():
                ids, tfs = rows.setdefault(tok, ([], []))
                ids.append(i)
                tfs.append(tf)
        self.postings = {t: (np.array(ids, dtype=np.int64), np.array(tfs, dtype=np.float64))
                         for t, (ids, tfs) in rows.items()}
        N = self.n_docs
        self.idf = {t: math.log(1.0 + (N - len(ids) + 0.5) / (len(ids) + 0.5)) for t, (ids, _) in
                    self.postings.items()}
        return self

    @property
    def avg_doc_len(self) -> float:
        return float(self.doc_len.mean()) if self.n_docs else 0.0

    def scores(self, query_tokens: Sequence[Hashable]) -> np.ndarray:
        """BM25 score of every document for the query: (n_docs,) float64."""
        if self.n_docs == 0:
            raise LmstackError("BM25.scores called before fit(); fit it on the documents first")
        out = np.zeros(self.n_docs, dtype=np.float64)
        # an all-empty corpus has L = 0; no token can match then, so any positive L will do
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / (self.avg_doc_len or 1.0))   # (n_docs,)
        for t in query_tokens:
            post = self.postings.get(t)
            if post is None:
                continue
            ids, tf = post
            out[ids] += self.idf[t] * tf / (tf + norm[ids])
        return out
