"""Chat answers from a retrieval index (`lmstack serve RUN --rag-index IDX`), on the tiny run.

The index is built by the real command with a contrastively trained encoder
(`lmstack rag index DOCS --run RUN --encoder-steps N`); the server is given the retriever the
CLI builds for it. Checked against references assembled here from the library's parts: the
chunks and scores equal a hybrid of BM25 and that encoder (IDX/encoder: its cosine, not the
mean-pooled hidden states'), the answer equals the one the model gives to the grounded turn
sent by hand, chunks that do not fit the context are dropped from the lowest rank, nothing
relevant is an abstention without generating, and streaming gives the same."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from lmstack.rag.grounded import render_context

CHAT = "/v1/chat/completions"
DOCS = [
    ("cat", "Once upon a time there was a little cat who liked to sit on a warm mat. The cat sat on the mat "
            "all day and the mat was warm."),
    ("fox", "The quick brown fox jumps over the lazy dog. The fox said hello to the dog and the dog said "
            "hello back to the fox."),
    ("alice", "Alice counted: one, two, three, four, five. Then Alice counted to five again, one, two, three."),
    ("bob", "Bob said hello to the world and the world said hello back. Bob liked the world."),
]
QUESTION = "where did the little cat sit?"


@pytest.fixture(scope="module")
def index_dir(run_dir, tmp_path_factory):
    from lmstack.cli.main import main

    root = tmp_path_factory.mktemp("serve_rag")
    docs = root / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in DOCS))
    assert main(["rag", "index", str(docs), "--out", str(root / "idx"), "--run", str(run_dir),
                 "--encoder-steps", "3", "--chunk-tokens", "48", "--overlap", "8", "--device", "cpu"]) == 0
    return root / "idx"


@pytest.fixture(scope="module")
def rag_server(run_dir, index_dir, launch):
    from lmstack.cli.serve import ServeOptions, _retrieval
    from lmstack.infer import AsyncLLM
    from lmstack.serve.app import create_app

    engine = AsyncLLM(str(run_dir), kv_cache_tokens=4096)
    app = create_app(engine, retrieval=_retrieval(ServeOptions(rag_index=str(index_dir)), engine))
    url, stop = launch(app)
    yield url, app
    stop()
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def reference(run_dir, index_dir):
    """The hybrid the server should run, built from the parts: BM25 with its default floor and
    the encoder saved in the index."""
    from lmstack.rag import BM25Retriever, ContrastiveEncoder, DenseRetriever, HybridRetriever, Index
    from lmstack.tokenizer import Tokenizer

    index = Index.load(index_dir)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    encoder = ContrastiveEncoder.load(index_dir / "encoder", tok)
    return index, tok, encoder, HybridRetriever([BM25Retriever(index, 0.85), DenseRetriever(index, encoder)])


def test_the_cli_retriever_uses_the_indexs_trained_encoder(run_dir, index_dir, reference):
    """--rag-mode dense: the query is embedded by IDX/encoder (cosines with the chunks' rows),
    not by the served model's mean-pooled hidden states."""
    from lmstack.cli.serve import ServeOptions, _retrieval
    from lmstack.infer import LLM
    index, tok, encoder, _ = reference
    assert index.encoder["kind"] == "contrastive"
    llm = LLM(str(run_dir), kv_cache_tokens=1024)
    found = _retrieval(ServeOptions(rag_index=str(index_dir), rag_mode="dense", rag_k=4), llm).search(QUESTION)
    trained = index.embeddings @ encoder.encode([QUESTION])[0]
    want = np.argsort(-trained, kind="stable")[:4]
    assert [s["text"] for s in found] == [index.chunks[i].text for i in want]
    assert [s["score"] for s in found] == pytest.approx(trained[want].tolist(), abs=1e-5)


def _grounded_lengths(tok, hits) -> list[tuple[str, int]]:
    """(user turn, prompt tokens) listing the top n hits, n = 1, 2, ..."""
    out = []
    for n in range(1, len(hits) + 1):
        turn = f"{render_context([h.chunk.text for h in hits[:n]])}\n{QUESTION}"
        out.append((turn, len(tok.apply_chat_template([{"role": "user", "content": turn}],
                                                      add_generation_prompt=True))))
    return out


def test_chat_answers_from_the_retrieved_chunks(rag_server, reference):
    url, app = rag_server
    index, tok, _, hybrid = reference
    hits = hybrid.search(QUESTION, 3)
    assert len(hits) == 3 and hits[0].chunk.doc_id == "cat"
    turns = _grounded_lengths(tok, hits)
    context = app.state.lm.limits.context_length
    # 8 tokens of answer: all three chunks fit; as many as leave room for one chunk: only the first
    for max_tokens, n_fit in ((8, 3), (context - turns[0][1], 1)):
        assert turns[n_fit - 1][1] + max_tokens <= context and (n_fit == 3 or turns[n_fit][1] + max_tokens > context)
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(url + CHAT, json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert [(s["index"], s["doc_id"], s["start"], s["end"], s["text"]) for s in out["sources"]] == \
            [(n, h.chunk.doc_id, h.chunk.start, h.chunk.end, h.chunk.text) for n, h in enumerate(hits[:n_fit], 1)]
        assert [s["score"] for s in out["sources"]] == pytest.approx([h.score for h in hits[:n_fit]])
        # the model read exactly the grounded turn: the same answer as that turn sent by hand
        by_hand = httpx.post(url + CHAT, json={**body, "retrieval": False, "messages": [
            {"role": "user", "content": turns[n_fit - 1][0]}]}, timeout=60).json()
        assert "sources" not in by_hand
        assert out["usage"]["prompt_tokens"] == by_hand["usage"]["prompt_tokens"] == turns[n_fit - 1][1]
        assert out["choices"][0]["message"] == by_hand["choices"][0]["message"]
        # streamed: the same sources (first chunk) and the same text
        events = [json.loads(line[6:]) for line in httpx.post(url + CHAT, json={**body, "stream": True},
                                                               timeout=60).text.splitlines()
                  if line.startswith("data: {")]
        assert events[0]["sources"] == out["sources"] and all("sources" not in e for e in events[1:])
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == \
            out["choices"][0]["message"]["content"]


def test_a_question_that_cannot_fit_with_one_chunk_is_a_400(rag_server, reference):
    url, app = rag_server
    _, tok, _, hybrid = reference
    one = _grounded_lengths(tok, hybrid.search(QUESTION, 1))[0][1]
    max_tokens = app.state.lm.limits.context_length - one + 1
    r = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "retrieval: false" in r.json()["error"]["message"]


def test_nothing_relevant_is_an_abstention(rag_server):
    from lmstack.rag import ABSTAIN

    url, _ = rag_server
    body = {"messages": [{"role": "user", "content": "zebra quantum xylophone?"}], "max_tokens": 8, "n": 2}
    out = httpx.post(url + CHAT, json=body).json()
    assert out["sources"] == [] and out["usage"]["completion_tokens"] == 0
    assert [(c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == [(ABSTAIN, "stop")] * 2
    lines = [line for line in httpx.post(url + CHAT, json={**body, "stream": True}).text.splitlines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[0]["sources"] == [] and lines[-1] == "data: [DONE]" and len(events) == len(lines) - 1
    for i in range(2):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content") or "" for c in mine) == ABSTAIN
        assert mine[-1]["finish_reason"] == "stop"


def test_retrieval_true_without_an_index_is_a_400(server, rag_server):
    r = httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                            "retrieval": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "retrieval"
    assert "--rag-index" in r.json()["error"]["message"]
    # each server's spec says so: true is valid only where there is an index
    for url, enum in ((server.url, [False, None]), (rag_server[0], None)):
        spec = httpx.get(url + "/openapi.json").json()
        assert spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["retrieval"].get("enum") == enum
