"""RAG on tinyworld's knowledge base: closed book vs BM25, dense, hybrid (and the gold document).

    .venv/bin/python benchmarks/bench_rag.py            # trains the cached run first if needed (~7 min)

The knowledge base holds facts about entities that never appear in the pretraining text, so
closed-book answers are guesses; retrieval has to bring the fact into the prompt, and the
model has to read it (the reading-comprehension skill tinyworld trains). Questions are split
in two (even/odd): the first half picks the dense layer and the abstention thresholds, the
second half is what the tables report. Printed:

1. dense recall@3 per hidden-state layer (calibration half);
2. the contrastive encoder's training (rag/contrastive.py: cloze pairs from the KB's own
   documents + questions about the *pretraining* world's people and their documents, never
   a KB question; InfoNCE with in-batch negatives, `--encoder-steps` steps in the Trainer);
3. per mode (mean-pooled dense, contrastive dense, and each fused with BM25): answer
   accuracy, recall@1/3/5 of the gold document, citation precision/recall, false abstentions
   on answerable questions, abstentions on unanswerable ones (same
   questions about invented names the index has never seen), ms per question;
4. FAISS: flat == exact top-k ids on the KB, and recall@10 of HNSW / IVF against exact over
   ~2k embedded tinyworld documents.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _tinyworld_run import ensure_run  # noqa: E402
from lmstack.infer import LLM  # noqa: E402
from lmstack.rag import (BM25Retriever, DenseEncoder, DenseRetriever, HybridRetriever, Index,  # noqa: E402
                         evaluate_rag, tinyworld_world_pairs, train_encoder, unanswerable_questions)
from lmstack.rag.retrieve import Hit  # noqa: E402
from lmstack.rag.vectors import FaissSearch, exact_search, recall_at_k  # noqa: E402


class GoldRetriever:
    """The upper bound: the chunks of the question's own document (reading skill alone)."""

    def __init__(self, index, questions):
        self.index, self.doc_of = index, {q["prompt"]: q["doc_id"] for q in questions}

    def search(self, query, k=3):
        rows = [i for i, c in enumerate(self.index.chunks) if c.doc_id == self.doc_of.get(query)]
        return [Hit(self.index.chunks[i], 1.0, r + 1, i) for r, i in enumerate(rows[:k])]


def best_threshold(pos: list[float], neg: list[float]) -> float:
    """The floor that keeps the most answerable top scores and rejects the most unanswerable,
    placed midway in the gap between two observed scores (not on one: a margin both ways)."""
    xs = sorted(set(pos) | set(neg))
    cands = [xs[0] - 1.0] + [(a + b) / 2 for a, b in zip(xs, xs[1:])] + [xs[-1] + 1.0]
    return max(cands, key=lambda t: sum(p >= t for p in pos) + sum(n < t for n in neg))


def top_scores(retriever, questions) -> list[float]:
    return [(h[0].score if h else float("-inf")) for h in (retriever.search(q["prompt"], 1) for q in questions)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=3, help="chunks in the prompt")
    ap.add_argument("--faiss-docs", type=int, default=2000, help="documents embedded for the FAISS recall row")
    ap.add_argument("--quick", action="store_true", help="a 20-step smoke-test model (numbers mean nothing)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (see _tinyworld_run.py)")
    ap.add_argument("--encoder-steps", type=int, default=300, help="contrastive encoder training steps")
    ap.add_argument("--encoder-lr", type=float, default=3e-3)
    ap.add_argument("--encoder-layer", type=int, default=1, help="blocks of the model the encoder keeps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_dir, corpus = ensure_run(quick=args.quick)
    llm = LLM(str(run_dir), max_num_seqs=64)
    tok, model = llm.tokenizer, llm.model
    docs = [(d["id"], d["text"]) for d in corpus.kb_docs]
    qs = corpus.kb_questions
    calib, test = qs[0::2], qs[1::2]
    names = corpus.world.names() | {d["title"] for d in corpus.kb_docs} | \
        {w for d in corpus.kb_docs for w in d["text"].replace(".", " ").split() if w[:1].isupper()}
    unans_calib = unanswerable_questions(calib, names, len(calib), seed=1)
    unans_test = unanswerable_questions(test, names, len(test), seed=2)

    print(f"run {run_dir.name}: {model.num_params() / 1e6:.1f}M params; KB {len(docs)} documents, "
          f"{len(qs)} questions ({len(calib)} calibration / {len(test)} reported), k={args.k}\n")
    print("dense recall@3 by layer (calibration half)")
    best_layer, best_r = -1, -1.0
    for layer in range(model.config.n_layer + 1):
        enc = DenseEncoder(model, tok, layer=layer)
        r = evaluate_recall(DenseRetriever(Index.build(docs, tok, encoder=enc), enc), calib)
        print(f"  layer {layer}: {r:.3f}")
        if r > best_r:
            best_layer, best_r = layer, r
    enc = DenseEncoder(model, tok, layer=best_layer)
    index = Index.build(docs, tok, chunk_tokens=128, overlap=32, encoder=enc)
    bm25_floor = best_threshold(top_scores(BM25Retriever(index), calib), top_scores(BM25Retriever(index), unans_calib))
    dense_floor = best_threshold(top_scores(DenseRetriever(index, enc), calib),
                                 top_scores(DenseRetriever(index, enc), unans_calib))
    print(f"layer {best_layer}; abstention floors from calibration: BM25 >= {bm25_floor:.2f}, "
          f"cosine >= {dense_floor:.3f}\n")
    bm25 = BM25Retriever(index, bm25_floor)
    dense = DenseRetriever(index, enc, dense_floor)

    pairs = tinyworld_world_pairs(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cenc, res = train_encoder(model, tok, docs, Path(tmp) / "encoder", pairs=pairs, steps=args.encoder_steps,
                                  lr=args.encoder_lr, layer=args.encoder_layer, batch_size=32)
    cindex = Index.build(docs, tok, chunk_tokens=128, overlap=32, encoder=cenc)
    print(f"contrastive encoder ({args.encoder_layer} block(s)): {len(docs)} KB documents (cloze) + {len(pairs)} "
          f"pretraining-world question pairs, "
          f"{res['steps']} steps in {time.perf_counter() - t0:.0f}s, final train loss {res['train_loss']:.3f}; "
          f"recall@3 (calibration half) {evaluate_recall(DenseRetriever(cindex, cenc), calib):.3f}")
    c_floor = best_threshold(top_scores(DenseRetriever(cindex, cenc), calib),
                             top_scores(DenseRetriever(cindex, cenc), unans_calib))
    contr = DenseRetriever(cindex, cenc, c_floor)
    print(f"abstention floor of the contrastive encoder: cosine >= {c_floor:.3f}\n")
    modes = {"closed book": None, "bm25": bm25, "dense": dense, "hybrid (rrf)": HybridRetriever([bm25, dense]),
             "contrastive": contr, "hybrid bm25+c": HybridRetriever([BM25Retriever(cindex, bm25_floor), contr]),
             "gold document": GoldRetriever(index, qs)}
    head = (f"{'mode':<14} {'acc':>6} {'R@1':>6} {'R@3':>6} {'R@5':>6} {'cite P':>7} {'cite R':>7} "
            f"{'false abst':>10} {'abst unans':>10} {'ms/q':>7}")
    print(head)
    print("-" * len(head))
    for name, retr in modes.items():
        t0 = time.perf_counter()
        r = evaluate_rag(llm, retr, test, k=args.k)
        ms = 1000 * (time.perf_counter() - t0) / len(test)
        abst = "" if retr is None or name == "gold document" else \
            f"{evaluate_rag(llm, retr, unans_test, k=args.k)['abstained'] / len(unans_test):.2f}"
        fmt = lambda key: f"{r[key]:.2f}" if r.get(key) is not None else "-"  # noqa: E731
        print(f"{name:<14} {r['accuracy']:>6.3f} {fmt('recall@1'):>6} {fmt('recall@3'):>6} {fmt('recall@5'):>6} "
              f"{fmt('citation_precision'):>7} {fmt('citation_recall'):>7} {r['abstained'] / len(test):>10.2f} "
              f"{abst:>10} {ms:>7.1f}")
    # the R@k columns above count hits that pass each retriever's floor (an abstention is a
    # miss); retrieval alone, without floors:
    plain = {"bm25": BM25Retriever(index), "dense (mean-pooled)": DenseRetriever(index, enc),
             "contrastive": DenseRetriever(cindex, cenc),
             "hybrid bm25+dense": HybridRetriever([BM25Retriever(index), DenseRetriever(index, enc)]),
             "hybrid bm25+contr.": HybridRetriever([BM25Retriever(cindex), DenseRetriever(cindex, cenc)])}
    print("\nretrieval alone (no relevance floor), reported half: recall@1 / @3 / @5")
    for name, retr in plain.items():
        print(f"  {name:<20} " + " / ".join(f"{evaluate_recall(retr, test, k):.3f}" for k in (1, 3, 5)))
    faiss_rows(index, enc, corpus, tok, model, args.faiss_docs)


def evaluate_recall(retriever, questions, k: int = 3) -> float:
    return float(np.mean([any(h.chunk.doc_id == q["doc_id"] for h in retriever.search(q["prompt"], k))
                          for q in questions]))


def faiss_rows(index, enc, corpus, tok, model, n_docs: int) -> None:
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("\nFAISS rows skipped: pip install 'lmstack[rag]'")
        return
    Q = enc.encode([q["prompt"] for q in corpus.kb_questions])
    ids, _ = exact_search(index.embeddings, Q, 5)
    same = (FaissSearch(index.embeddings, "flat").search(Q, 5)[0] == ids).mean()
    print(f"\nFAISS flat vs exact on the KB: {same:.3f} of top-5 ids equal")
    t0 = time.perf_counter()
    E = enc.encode(list(dict.fromkeys(corpus.docs))[:n_docs])        # distinct texts
    print(f"embedded {len(E)} distinct tinyworld documents in {time.perf_counter() - t0:.1f}s; recall@10 "
          f"against exact search, by id and counting ties (a hit as similar as the 10th exact one)")
    truth, truth_sims = exact_search(E, Q, 10)
    for kind, kw in [("flat", {}), ("hnsw", {}), ("ivf", {"nprobe": 8})]:
        t0 = time.perf_counter()
        s = FaissSearch(E, kind, **kw)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        found, _ = s.search(Q, 10)
        ms = 1000 * (time.perf_counter() - t0) / len(Q)
        # a found id whose exact similarity ties the 10th exact one is as good as the exact id
        sims = np.where(found >= 0, np.einsum("qd,qkd->qk", Q, E[np.maximum(found, 0)]), -np.inf)
        tied = float(np.mean((sims >= truth_sims[:, -1:] - 1e-5).sum(1) / 10))
        print(f"  {kind:<5} recall@10 {recall_at_k(found, truth):.3f} (ties counted {tied:.3f})  "
              f"build {build * 1000:.0f} ms  search {ms:.3f} ms/query")


if __name__ == "__main__":
    main()
