"""A retriever as the server takes it: `lmstack serve RUN --rag-index IDX`.

    retrieval = ServerRetrieval(BM25Retriever(Index.load("idx"), min_score=0.85), k=3)
    app = create_app(engine, retrieval=retrieval)     # chat answers list their `sources`

lmstack.serve (floor 4) cannot import this floor, so it names the shape it needs
(serve/retrieval.py): `search(question)` -> the top `k` chunks as plain dicts, best first,
[] when the retriever keeps nothing (every hit below its relevance floor: the server
abstains); `user_turn(question, sources)` -> the user message the model reads, the chunks
numbered as grounded generation lists them ('Context: [1] ... [2] ...', then the question
on its own line: the grounded chats SFT teaches); `abstain_text` -> grounded.ABSTAIN.
"""
from __future__ import annotations

from lmstack.rag.grounded import ABSTAIN, render_context
from lmstack.utils import LmstackError


class ServerRetrieval:
    abstain_text = ABSTAIN

    def __init__(self, retriever, k: int = 3):
        if not isinstance(k, int) or k < 1:
            raise LmstackError(f"k (chunks put in the prompt) must be an integer >= 1, got {k!r}")
        self.retriever, self.k = retriever, k

    def search(self, question: str) -> list[dict]:
        return [{"doc_id": h.chunk.doc_id, "start": h.chunk.start, "end": h.chunk.end, "text": h.chunk.text,
                 "score": float(h.score)} for h in self.retriever.search(question, self.k)]

    @staticmethod
    def user_turn(question: str, sources: list[dict]) -> str:
        return f"{render_context([s['text'] for s in sources])}\n{question.strip()}"
