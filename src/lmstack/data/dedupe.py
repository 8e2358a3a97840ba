"""Exact and near-duplicate detection: MinHash signatures and LSH banding, by hand with numpy.

    result = find_duplicates(texts, threshold=0.7)
    result.cluster[i]      # index of the first document of i's duplicate cluster (i itself if first)
    keep = result.keep()   # indices of the first document of every cluster

Exact duplicates: identical text after collapsing whitespace. Near duplicates: the Jaccard
similarity of two documents' sets of word 3-grams ("shingles") is at least `threshold`.
MinHash estimates it: for a random hash function h, P[min h(A) == min h(B)] = J(A, B), so
the fraction of equal entries in two `num_perm`-long signatures estimates J. LSH banding
finds candidate pairs without comparing all pairs: the signature is cut into `bands` bands
of `rows` rows; two documents become candidates when any band matches exactly, which
happens with probability 1 - (1 - J**rows)**bands (about 0.61 at J=0.7 and 0.998 at J=0.8
for 20 x 6). Every candidate is then checked against its bucket's first member with the
full signature before the two are joined (union-find), so clusters chain only through
verified links. Everything is seeded: the same texts give the same clusters.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64)
_CHUNK = 1 << 15           # shingles hashed per numpy step: (32768, num_perm) uint64 = 31 MB at 120


@dataclass
class DedupeResult:
    cluster: np.ndarray     # (N,) int64: first index of each document's cluster
    n_exact: int            # documents identical to an earlier one
    n_near: int             # further documents that are near duplicates of an earlier one

    def keep(self) -> np.ndarray:
        return np.flatnonzero(self.cluster == np.arange(len(self.cluster)))


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


class _UnionFind:
    """Disjoint sets whose root is always the smallest index (the first document)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:          # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def shingles(text: str, k: int = 3, cache: dict[str, int] | None = None) -> np.ndarray:
    """Hashes (uint64) of the distinct word k-grams of `text` (case-folded; punctuation are words)."""
    cache = {} if cache is None else cache
    words = _TOKEN.findall(text.casefold())
    ids = np.fromiter((cache.get(w) or cache.setdefault(w, zlib.crc32(w.encode()) + 1) for w in words),
                      dtype=np.uint64, count=len(words))
    if len(ids) < k:           # a very short text is one shingle
        ids = np.concatenate([ids, np.zeros(k - len(ids), dtype=np.uint64)])
    n = len(ids) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):         # uint64 arithmetic wraps: a cheap polynomial hash of the k ids
        h = h * _MIX[j % 3] + ids[j: j + n]
    return np.unique(h)


class MinHasher:
    """`num_perm` multiply-shift hash functions h(x) = (a*x + b) >> 32 over uint64 (a odd)."""

    def __init__(self, num_perm: int = 120, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(0, 2**63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signatures(self, sets: list[np.ndarray]) -> np.ndarray:
        """(N, num_perm) uint32 MinHash signatures of N non-empty shingle sets."""
        out = np.empty((len(sets), self.num_perm), dtype=np.uint32)
        i = 0
        while i < len(sets):
            j, size = i, 0                     # take documents until the chunk is full
            while j < len(sets) and (size == 0 or size + len(sets[j]) <= _CHUNK):
                size += len(sets[j])
                j += 1
            x = np.concatenate(sets[i:j])                               # (S,)
            h = (x[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)  # (S, P)
            starts = np.cumsum([0] + [len(s) for s in sets[i:j - 1]])
            out[i:j] = np.minimum.reduceat(h, starts, axis=0).astype(np.uint32)
            i = j
        return out


def _band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """(N, bands) uint64: each band's rows mixed into one key (collisions are re-checked)."""
    n, p = sig.shape
    rows = p // bands
    s = sig[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    key = np.zeros((n, bands), dtype=np.uint64)
    for r in range(rows):
        key = key * np.uint64(0x100000001B3) + s[:, :, r] + np.uint64(r + 1)
    return key


def find_duplicates(texts: list[str], threshold: float = 0.7, near: bool = True, num_perm: int = 120,
                    bands: int = 20, min_words: int = 25, seed: int = 0) -> DedupeResult:
    """Cluster `texts` into exact and (if `near`) near-duplicate groups.

    Texts under `min_words` words are matched exactly only: in a short templated text one
    word is the whole content ("what is 3+4?" vs "what is 3+5?"), yet it barely moves J."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm % bands:
        raise ValueError(f"num_perm={num_perm} must be a multiple of bands={bands}")
    n = len(texts)
    uf = _UnionFind(n)
    first: dict[bytes, int] = {}
    for i, t in enumerate(texts):
        uf.union(first.setdefault(exact_key(t), i), i)
    n_exact = n - sum(1 for i in range(n) if uf.parent[i] == i)
    # first copy of every distinct text long enough for near matching
    reps = [i for i in range(n) if uf.parent[i] == i and len(_TOKEN.findall(texts[i])) >= min_words]
    if near and len(reps) > 1:
        cache: dict[str, int] = {}
        sig = MinHasher(num_perm, seed).signatures([shingles(texts[i], cache=cache) for i in reps])
        keys = _band_keys(sig, bands)
        for b in range(bands):
            order = np.argsort(keys[:, b], kind="stable")
            k = keys[order, b]
            # runs of equal keys: [starts[r], ends[r]) in `order`
            edges = np.flatnonzero(k[1:] != k[:-1]) + 1
            starts, ends = np.r_[0, edges], np.r_[edges, len(k)]
            for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
                members = order[s:e]
                est = (sig[members[1:]] == sig[members[0]]).mean(axis=1)   # estimated Jaccard
                for m in members[1:][est >= threshold]:
                    uf.union(reps[members[0]], reps[m])
    cluster = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    n_dup = n - int((cluster == np.arange(n)).sum())
    return DedupeResult(cluster=cluster, n_exact=n_exact, n_near=n_dup - n_exact)
