"""Nearest-neighbour search over unit vectors: exact by default, FAISS when asked.

    ids, sims = exact_search(E, Q, k)                     # (nq, k) each, best first
    index = FaissSearch(E, kind="hnsw"); ids, sims = index.search(Q, k)
    recall_at_k(approx_ids, exact_ids)                    # share of the exact top-k found

Similarity is the inner product, which for the L2-normalised embeddings of dense.py is the
cosine. `exact_search` scores every vector (a matrix product) and breaks ties by the lower
id, so it is deterministic. FAISS (`pip install lmstack[rag]`, faiss-cpu) offers the same
exact search (`kind="flat"`, IndexFlatIP: same top-k ids) and two approximate ones that
trade recall for speed on large collections: `hnsw` (a navigable small-world graph, M
neighbours per node) and `ivf` (k-means cells, `nprobe` of them searched).
"""
from __future__ import annotations

import numpy as np

from lmstack.utils import LmstackError

FAISS_KINDS = ("flat", "hnsw", "ivf")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first, ties by lower index. scores (n,)."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(scores.shape[0]), -scores))   # last key sorts first
    return order[:k].astype(np.int64)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vectors (n, d), queries (nq, d) -> ids (nq, k'), similarities (nq, k') with k' = min(k, n)."""
    if vectors.ndim != 2 or queries.ndim != 2 or vectors.shape[1] != queries.shape[1]:
        raise LmstackError(f"vectors {vectors.shape} and queries {queries.shape} must be 2-D with the same "
                           f"dimension")
    sims = queries.astype(np.float32) @ vectors.astype(np.float32).T                  # (nq, n)
    ids = np.stack([top_k(row, k) for row in sims]) if len(sims) else np.zeros((0, 0), np.int64)
    return ids, np.take_along_axis(sims, ids, axis=1) if ids.size else np.zeros(ids.shape, np.float32)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| (ids (nq, k); -1 = no result)."""
    if truth.size == 0:
        return 1.0
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def _faiss():
    try:
        import faiss
    except ImportError:
        raise LmstackError("the FAISS backend needs faiss-cpu: pip install 'lmstack[rag]'") from None
    return faiss


class FaissSearch:
    """A FAISS inner-product index over `vectors`; `search` answers like exact_search."""

    def __init__(self, vectors: np.ndarray, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 64,
                 n_lists: int | None = None, nprobe: int = 8, seed: int = 0):
        if kind not in FAISS_KINDS:
            raise LmstackError(f"unknown FAISS index kind {kind!r}; valid: {', '.join(FAISS_KINDS)}")
        faiss = _faiss()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        if n == 0:
            raise LmstackError("cannot build a FAISS index over 0 vectors")
        self.kind = kind
        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        else:
            # ~sqrt(n) cells is the usual rule; k-means needs a few dozen points per cell
            n_lists = n_lists or max(1, min(int(np.sqrt(n)), n // 39))
            self.quantizer = faiss.IndexFlatIP(d)          # kept alive: the IVF index points at it
            self.index = faiss.IndexIVFFlat(self.quantizer, d, n_lists, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            self.index.train(x)
            self.index.nprobe = min(nprobe, n_lists)
        self.index.add(x)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        sims, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids.astype(np.int64), sims
