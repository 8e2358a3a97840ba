"""Retrievers over an Index: BM25, dense, and their fusion by reciprocal rank.

    hits = BM25Retriever(index, min_score=2.0).search("where does Bolo live?", k=3)
    hits = DenseRetriever(index, encoder).search(question, k=3)
    hits = HybridRetriever([bm25, dense]).search(question, k=3)
    hits[0].chunk.text, hits[0].score, hits[0].rank            # rank 1 = best

`min_score` is the relevance floor of a retriever: hits scoring below it are dropped, and a
search that keeps nothing means "nothing relevant here", which grounded generation turns
into an abstention. It is in the retriever's own units (a BM25 score, a cosine).

Reciprocal rank fusion (Cormack et al., SIGIR 2009) ranks a chunk by
    RRF(d) = sum over retrievers r that returned d of 1 / (k + rank_r(d)),   k = 60,
using ranks only, so a BM25 score and a cosine never have to be put on one scale. Each
retriever contributes its top `depth` hits (after its own min_score, so a chunk no
retriever finds relevant is not fused back in); ties go to the chunk with the lower index.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmstack.rag.chunking import Chunk
from lmstack.rag.index import Index
from lmstack.rag.vectors import FAISS_KINDS, FaissSearch, exact_search, top_k
from lmstack.utils import LmstackError

RRF_K = 60


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float
    rank: int          # 1-based
    position: int      # the chunk's index in Index.chunks


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise LmstackError(f"k (chunks to retrieve) must be an integer >= 1, got {k!r}")


def _hits(index: Index, ids, scores, min_score: float | None) -> list[Hit]:
    keep = [(int(i), float(s)) for i, s in zip(ids, scores) if min_score is None or s >= min_score]
    return [Hit(index.chunks[i], s, r + 1, i) for r, (i, s) in enumerate(keep)]


class BM25Retriever:
    name = "bm25"

    def __init__(self, index: Index, min_score: float | None = None):
        self.index, self.min_score = index, min_score

    def search(self, query: str, k: int = 3) -> list[Hit]:
        _check_k(k)
        scores = self.index.bm25.scores(self.index.analyze(query))
        ids = top_k(scores, k)
        # a chunk sharing no word with the query has score 0: never a hit
        return [h for h in _hits(self.index, ids, scores[ids], self.min_score) if h.score > 0]


class DenseRetriever:
    """Cosine similarity of the query's embedding with the chunks'; exact unless `backend`
    names a FAISS index kind (flat, hnsw, ivf)."""
    name = "dense"

    def __init__(self, index: Index, encoder, min_score: float | None = None, backend: str = "exact"):
        if index.embeddings is None:
            raise LmstackError("this index has no embeddings; rebuild it with a model (lmstack rag index "
                               "DOCS --out IDX --run RUN) to search it densely")
        recorded = (index.encoder or {}).get("fingerprint")
        if recorded is not None and recorded != encoder.fingerprint:
            raise LmstackError(f"the index was embedded by another model or layer (fingerprint {recorded}, "
                               f"this encoder {encoder.fingerprint}); use the run it was built with or rebuild it")
        if index.embeddings.shape[1] != encoder.dim:
            raise LmstackError(f"index embeddings have dim {index.embeddings.shape[1]} but the encoder gives "
                               f"{encoder.dim}")
        if backend != "exact" and backend not in FAISS_KINDS:
            raise LmstackError(f"unknown backend {backend!r}; valid: exact, {', '.join(FAISS_KINDS)}")
        self.index, self.encoder, self.min_score = index, encoder, min_score
        self.faiss = FaissSearch(index.embeddings, backend) if backend != "exact" else None

    def search(self, query: str, k: int = 3) -> list[Hit]:
        _check_k(k)
        q = self.encoder.encode([query])                                   # (1, dim)
        if self.faiss is not None:
            ids, sims = self.faiss.search(q, k)
        else:
            ids, sims = exact_search(self.index.embeddings, q, k)
        valid = ids[0] >= 0                                                 # FAISS pads with -1
        return _hits(self.index, ids[0][valid], sims[0][valid], self.min_score)


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse rankings (lists of item ids, best first) into [(id, RRF score)], best first."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, start=1):
            score[i] = score.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))


class HybridRetriever:
    """RRF of several retrievers. `gate`: one of them whose finding nothing means nothing is
    relevant (the search returns no hit, so grounded generation abstains), for a fusion with
    a retriever that has no calibrated floor: a cosine always has a nearest chunk."""
    name = "hybrid"

    def __init__(self, retrievers: list, k_rrf: int = RRF_K, depth: int = 50, gate=None):
        if not retrievers:
            raise LmstackError("HybridRetriever needs at least one retriever")
        if len({id(r.index) for r in retrievers}) != 1:
            raise LmstackError("the retrievers of a HybridRetriever must search the same index")
        if gate is not None and not any(r is gate for r in retrievers):
            raise LmstackError("the gate of a HybridRetriever must be one of its retrievers")
        self.retrievers, self.k_rrf, self.depth, self.gate = retrievers, k_rrf, depth, gate
        self.index = retrievers[0].index

    def search(self, query: str, k: int = 3) -> list[Hit]:
        _check_k(k)
        rankings = [[h.position for h in r.search(query, max(k, self.depth))] for r in self.retrievers]
        if self.gate is not None and not rankings[next(i for i, r in enumerate(self.retrievers) if r is self.gate)]:
            return []
        fused = rrf(rankings, self.k_rrf)[:k]
        return [Hit(self.index.chunks[i], s, r + 1, i) for r, (i, s) in enumerate(fused)]


def recall_at_k(hits: list[Hit], gold_doc_id: str, k: int) -> float:
    """1 if a chunk of the gold document is among the first k hits, else 0."""
    return float(any(h.chunk.doc_id == gold_doc_id for h in hits[:k]))

