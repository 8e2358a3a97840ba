"""Floor 5: retrieval-augmented generation. Chunk documents by tokens, index them (BM25 and
dense embeddings from a model's hidden states or from a small encoder trained contrastively
on the corpus), retrieve (exact, FAISS, or fused by reciprocal rank), and answer from the
retrieved chunks with numbered citations, or abstain.

    from lmstack.rag import BM25, DenseEncoder, Index, BM25Retriever, DenseRetriever, HybridRetriever, answer
    index = Index.build(load_documents("tinyworld"), tok, encoder=DenseEncoder(model, tok))
    ans = answer(llm, HybridRetriever([BM25Retriever(index), DenseRetriever(index, enc)]), question)

Files, one job each: chunking (token windows with char spans), bm25 (Lucene BM25), dense
(hidden-state embeddings), contrastive (the trained encoder), vectors (exact and FAISS
nearest neighbours), index (the on-disk index), retrieve (retrievers, RRF), grounded
(prompt, citations, abstention), documents (folders, JSONL, tinyworld), evaluate (accuracy,
recall@k, citation precision/recall), serving (a retriever as `lmstack serve --rag-index` takes it).
"""
from lmstack.rag.bm25 import BM25, words
from lmstack.rag.chunking import Chunk, chunk_documents, chunk_text
from lmstack.rag.dense import DenseEncoder
from lmstack.rag.contrastive import ContrastiveEncoder, train_encoder
from lmstack.rag.documents import load_documents, tinyworld_kb, tinyworld_world_pairs
from lmstack.rag.evaluate import evaluate_rag, gold_fact, unanswerable_questions
from lmstack.rag.grounded import ABSTAIN, Answer, answer, answer_many, citation_scores, render_prompt
from lmstack.rag.index import Index
from lmstack.rag.retrieve import BM25Retriever, DenseRetriever, Hit, HybridRetriever, recall_at_k, rrf
from lmstack.rag.serving import ServerRetrieval
from lmstack.rag.vectors import FaissSearch, exact_search, top_k

__all__ = ["BM25", "words", "Chunk", "chunk_documents", "chunk_text", "DenseEncoder", "ContrastiveEncoder",
           "train_encoder", "load_documents", "tinyworld_kb", "tinyworld_world_pairs", "evaluate_rag", "gold_fact",
           "unanswerable_questions", "ABSTAIN", "Answer", "answer", "answer_many", "citation_scores", "render_prompt", "Index", "BM25Retriever", "DenseRetriever", "Hit",
           "HybridRetriever", "recall_at_k", "rrf", "ServerRetrieval", "FaissSearch", "exact_search", "top_k"]
