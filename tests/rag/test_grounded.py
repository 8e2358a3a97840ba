"""Retrieval, fusion and grounded answers with citations, on the real engine with a scripted
model (it writes the byte at position p+1 of a script, so its answer is ours to choose)."""
from __future__ import annotations

import re

import pytest

from lmstack.infer import LLM
from lmstack.rag import (ABSTAIN, BM25Retriever, DenseEncoder, DenseRetriever, HybridRetriever, Index, answer,
                         answer_many, citation_scores, evaluate_rag, gold_fact, render_prompt, rrf,
                         unanswerable_questions)
from lmstack.rag.grounded import Answer
from lmstack.rag.retrieve import Hit
from lmstack.rag.chunking import Chunk
from lmstack.tokenizer import Tokenizer
from lmstack.utils import LmstackError
from tests.infer.conftest import ScriptedModel, tiny_model

DOCS = [("kb-0", "Velmora is a country. the capital of Velmora is Tinar."),
        ("kb-1", "Bolo lives in Tinar. Bolo's favourite colour is red."),
        ("kb-2", "Sami lives in Porak. Sami's pet is called Nuno.")]
Q = "Q: where does Bolo live?\nA: Bolo lives in"


@pytest.fixture(scope="module")
def tok():
    # one token per byte (ids = bytes), like the scripted model's vocabulary
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens={"<|endoftext|>": 256})


@pytest.fixture(scope="module")
def index(tok):
    return Index.build(DOCS, tok, chunk_tokens=256, overlap=0)


def scripted(tok, script: str, context_length: int = 512) -> LLM:
    return LLM(ScriptedModel(list(script.encode()), context_length=context_length), tok, block_size=16,
               kv_cache_tokens=2048, device="cpu")


def test_rrf_hand_computed():
    fused = rrf([[1, 2, 3], [3, 1]], k=60)
    want = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61}
    assert [i for i, _ in fused] == [1, 3, 2]
    assert all(s == pytest.approx(want[i]) for i, s in fused)
    assert [i for i, _ in rrf([[5], [4]])] == [4, 5]                    # tie: lower id first


def test_bm25_retrieval_and_relevance_floor(index):
    hits = BM25Retriever(index).search(Q, k=3)
    assert hits[0].chunk.doc_id == "kb-1" and [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert BM25Retriever(index, min_score=1e9).search(Q, k=3) == []
    assert BM25Retriever(index).search("xyzzy plugh", k=3) == []          # shares no word: no hit
    with pytest.raises(LmstackError, match="k"):
        BM25Retriever(index).search(Q, k=0)


def test_prompt_lists_numbered_chunks(index):
    hits = BM25Retriever(index).search(Q, k=2)
    assert render_prompt(Q, hits) == f"Context: [1] {hits[0].chunk.text} [2] {hits[1].chunk.text}\n{Q}"
    assert render_prompt("where is it?", []) == "Q: where is it?\nA:"


def test_answer_is_attributed_to_the_chunks_that_contain_it(tok, index):
    hits = BM25Retriever(index).search(Q, k=3)
    prompt = render_prompt(Q, hits)
    ans = answer(scripted(tok, prompt + " Tinar.\n"), BM25Retriever(index), Q, k=3)
    with_tinar = [i for i, h in enumerate(hits, start=1) if "Tinar" in h.chunk.text]
    assert ans.answer == "Tinar" and ans.attributed and ans.citations == with_tinar
    assert ans.text == "Tinar" + "".join(f" [{n}]" for n in with_tinar)
    # kb-1 states the fact; kb-0 only mentions Tinar as a capital: precision 1/2, recall 1
    assert len(with_tinar) == 2
    assert citation_scores(ans, gold_fact(Q, "Tinar")) == (0.5, 1.0)


def test_citations_written_by_the_model_are_taken_as_written(tok, index):
    hits = BM25Retriever(index).search(Q, k=3)
    right = [i for i, h in enumerate(hits, start=1) if h.chunk.doc_id == "kb-1"][0]
    ans = answer(scripted(tok, render_prompt(Q, hits) + f" Tinar [{right}] [7]\n"), BM25Retriever(index), Q, k=3)
    assert ans.citations == [right, 7] and not ans.attributed and ans.answer == "Tinar"
    assert citation_scores(ans, "Bolo lives in Tinar") == (0.5, 1.0)     # [7] points at nothing


def test_abstains_when_nothing_is_relevant_without_asking_the_model(tok, index):
    llm = scripted(tok, "never used")
    ans = answer(llm, BM25Retriever(index, min_score=1e9), Q)
    assert ans.abstained and ans.text == ABSTAIN and ans.generated_tokens == 0
    assert citation_scores(ans, "x") is None and llm.stats()["finished_requests"] == 0


def test_chunks_that_do_not_fit_are_dropped_and_a_too_long_question_fails_alone(tok, index):
    hits = BM25Retriever(index).search(Q, k=3)
    one = render_prompt(Q, hits[:1])
    llm = scripted(tok, one + " Tinar\n", context_length=len(one) + 20)      # room for 1 chunk only
    long_q = "Q: " + "where " * 200 + "\nA:"
    a, b = answer_many(llm, BM25Retriever(index), [long_q, Q], k=3, max_tokens=16)
    assert a.error is not None and "does not fit" in a.error
    assert b.error is None and len(b.hits) == 1 and b.answer == "Tinar"


def test_closed_book_has_no_context(tok):
    ans = answer(scripted(tok, Q + " Porak\n"), None, Q)
    assert ans.answer == "Porak" and ans.hits == [] and ans.citations == [] and not ans.abstained


def test_dense_and_hybrid_retrievers(tok, index):
    model = tiny_model(2, vocab_size=257, context_length=256)
    enc = DenseEncoder(model, tok)
    dense_index = Index.build(DOCS, tok, chunk_tokens=256, overlap=0, encoder=enc)
    dense = DenseRetriever(dense_index, enc)
    hits = dense.search(Q, k=3)
    sims = dense_index.embeddings @ enc.encode([Q])[0]
    assert [h.position for h in hits] == sorted(range(3), key=lambda i: -sims[i])
    assert [h.score for h in hits] == pytest.approx(sorted(sims, reverse=True), rel=1e-5)
    hybrid = HybridRetriever([BM25Retriever(dense_index), dense]).search(Q, k=3)
    bm = [h.position for h in BM25Retriever(dense_index).search(Q, k=50)]
    assert [h.position for h in hybrid] == [i for i, _ in rrf([bm, [h.position for h in hits]])][:3]
    # gated by BM25: the same fusion where BM25 finds something, nothing where it finds nothing
    bm25 = BM25Retriever(dense_index, min_score=0.5)
    gated = HybridRetriever([bm25, dense], gate=bm25)
    assert [h.position for h in gated.search(Q, k=3)] == \
        [h.position for h in HybridRetriever([bm25, dense]).search(Q, k=3)]
    assert bm25.search("zebra xylophone", k=3) == [] and gated.search("zebra xylophone", k=3) == []
    assert HybridRetriever([bm25, dense]).search("zebra xylophone", k=3)      # ungated: the cosine's nearest
    with pytest.raises(LmstackError, match="gate"):
        HybridRetriever([dense], gate=bm25)
    with pytest.raises(LmstackError, match="another model"):
        DenseRetriever(dense_index, DenseEncoder(tiny_model(3, vocab_size=257, context_length=256), tok))
    with pytest.raises(LmstackError, match="no embeddings"):
        DenseRetriever(index, enc)


def test_citation_scores_hand():
    c = [Chunk("a#0", "a", 0, 5, "Bolo lives in Tinar."), Chunk("b#0", "b", 0, 5, "Tinar is big.")]
    hits = [Hit(x, 1.0, i + 1, i) for i, x in enumerate(c)]
    fact = "Bolo lives in Tinar"
    assert citation_scores(Answer("q", "t", "Tinar", [2], hits), fact) == (0.0, 0.0)
    assert citation_scores(Answer("q", "t", "Tinar", [1], hits), fact) == (1.0, 1.0)
    assert citation_scores(Answer("q", "t", "Tinar", [], hits), fact) == (0.0, 0.0)


def test_gold_fact_and_unanswerable_questions():
    assert gold_fact(Q, "Tinar") == "Bolo lives in Tinar"
    qs = [{"prompt": Q, "answer": "Tinar", "doc_id": "kb-1"},
          {"prompt": "Q: what is the capital of Velmora?\nA: the capital of Velmora is", "answer": "Tinar",
           "doc_id": "kb-0"}]
    out = unanswerable_questions(qs, {"Bolo", "Bolo's", "Velmora", "Tinar"}, n=2)   # "Bolo's": not a name
    assert len(out) == 2
    for u in out:
        assert not any(name in u["prompt"] for name in ("Bolo", "Velmora")) and u["answer"] is None
        new = set(re.findall(r"[A-Z]\w+", u["prompt"]))          # the fresh subject, in question and prefix
        assert len(new) == 1 and u["prompt"].count(new.pop()) == 2


def test_evaluate_rag_counts(tok, index):
    hits = BM25Retriever(index).search(Q, k=3)
    llm = scripted(tok, render_prompt(Q, hits) + " Tinar\n")
    res = evaluate_rag(llm, BM25Retriever(index), [{"prompt": Q, "answer": "Tinar", "doc_id": "kb-1"}], k=3)
    assert res["accuracy"] == 1.0 and res["recall@1"] == 1.0 and res["citation_precision"] == 0.5
    assert res["citation_recall"] == 1.0 and res["abstained"] == 0 and res["failed"] == 0
