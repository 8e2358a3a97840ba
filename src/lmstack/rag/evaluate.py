"""Measure retrieval-augmented answering on questions with known answers and sources.

    qs = [{"prompt": "Q: where does Bolo live?\\nA: Bolo lives in", "answer": "Tinar", "doc_id": "kb-0008"}]
    evaluate_rag(llm, retriever, qs, k=3)
    # {"accuracy", "recall@1", "recall@3", ..., "citation_precision", "citation_recall",
    #  "abstained", "failed", "n"}

`retriever=None` measures the closed-book baseline (the bare question, no context).
Accuracy is exact match of the bare answer (citation markers removed) with the gold answer;
recall@k asks whether a chunk of the gold document is among the first k retrieved;
citation precision/recall are averaged over the questions that were answered (not
abstained, not failed). The gold fact a citation must contain is the answer statement:
tinyworld's question prompts end with the fact's own words ('A: Bolo lives in'), so prefix
+ ' ' + answer is the sentence the knowledge base states ('Bolo lives in Tinar').

`unanswerable_questions` makes questions about names the index has never seen, for the
abstention rate: a good system answers none of them.
"""
from __future__ import annotations

import random
import re

from lmstack.rag.grounded import answer_many, citation_scores
from lmstack.rag.retrieve import recall_at_k


def gold_fact(prompt: str, answer: str) -> str:
    """'Q: where does Bolo live?\\nA: Bolo lives in' + 'Tinar' -> 'Bolo lives in Tinar'."""
    return f"{prompt.rsplit('A:', 1)[-1].strip()} {answer}".strip()


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate_rag(llm, retriever, questions: list[dict], k: int = 3, recall_ks: tuple[int, ...] = (1, 3, 5),
                 max_tokens: int = 16) -> dict:
    answers = answer_many(llm, retriever, [q["prompt"] for q in questions], k=k, max_tokens=max_tokens)
    out = {"n": len(questions),
           "accuracy": _mean([float(a.error is None and not a.abstained and a.answer == q["answer"])
                              for a, q in zip(answers, questions)]) or 0.0,
           "abstained": sum(a.abstained for a in answers), "failed": sum(a.error is not None for a in answers),
           "tokens_per_question": _mean([a.generated_tokens for a in answers]) or 0.0}
    if retriever is None:
        return out
    depth = max(recall_ks)
    hits = [retriever.search(q["prompt"], depth) for q in questions]
    for r in recall_ks:
        out[f"recall@{r}"] = _mean([recall_at_k(h, q["doc_id"], r) for h, q in zip(hits, questions)])
    cites = [citation_scores(a, gold_fact(q["prompt"], q["answer"])) for a, q in zip(answers, questions)]
    cites = [c for c in cites if c is not None]
    out["citation_precision"] = _mean([p for p, _ in cites])
    out["citation_recall"] = _mean([r for _, r in cites])
    return out


def unanswerable_questions(questions: list[dict], known_names: set[str], n: int, seed: int = 0) -> list[dict]:
    """n questions shaped like `questions`, with the subject replaced by a fresh invented name."""
    from lmstack.data.tinyworld_world import NameMaker

    rng = random.Random(f"rag-unanswerable:{seed}")
    known = sorted(w for w in known_names if re.fullmatch(r"\w+", w))    # names, not "Bolo's" or "Tinar."
    names = NameMaker(rng, set(known_names))
    out = []
    for q in rng.sample(questions, min(n, len(questions))):
        found = [w for w in known if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", q["prompt"])]
        if not found:
            continue
        subject = max(found, key=len)          # 'Bolo' must not match inside 'Bolokan'
        out.append({"prompt": q["prompt"].replace(subject, names()), "answer": None, "doc_id": None})
    return out
