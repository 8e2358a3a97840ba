"""Grounded generation: answer from retrieved chunks, cite them by number, or abstain.

    ans = answer(llm, retriever, "Q: where does Bolo live?\\nA: Bolo lives in", k=3)
    ans.text          # 'Tinar [1]'
    ans.citations     # [1] -> ans.hits[0].chunk
    ans.abstained     # True when the retriever found nothing above its min_score

The prompt lists the retrieved chunks numbered, in rank order, in the reading-comprehension
format the model was trained on (tinyworld's `with_context`):

    Context: [1] <chunk 1> [2] <chunk 2>
    Q: where does Bolo live?
    A: Bolo lives in

The answer is the first line of the greedy continuation. Citations: numbers `[n]` the model
writes are taken as written (a number with no chunk behind it still counts, as an
unsupported citation). A model never taught to write them (tinyworld's is not) gets them by
attribution instead: the answer cites every listed chunk whose text contains the answer as a
whole phrase, which is where a reader would find it. Either way `citation_scores` then checks
each cited chunk against the gold fact; no judge model is involved.

When nothing is retrieved (every hit below the retriever's min_score) the answer is
ABSTAIN and the model is not asked: a guess about an entity the index does not know would
be a hallucination. Chunks that do not fit the context are dropped from the lowest rank up;
a question that does not fit even alone is a recorded failure (`Answer.error`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmstack.rag.retrieve import Hit
from lmstack.utils import LmstackError

ABSTAIN = "I don't know: nothing relevant was found."
_CITE = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    question: str
    text: str                              # answer line with citation markers, or ABSTAIN
    answer: str = ""                       # the bare answer (markers and final '.' removed)
    citations: list[int] = field(default_factory=list)   # 1-based numbers into the prompt's chunks
    hits: list[Hit] = field(default_factory=list)        # the chunks listed in the prompt, in order
    abstained: bool = False
    attributed: bool = False               # citations came from attribution, not from the model
    generated_tokens: int = 0
    error: str | None = None

    def cited_chunks(self):
        """The chunks cited, in citation order (numbers with no chunk are skipped)."""
        return [self.hits[n - 1].chunk for n in self.citations if 1 <= n <= len(self.hits)]


def render_context(texts: list[str]) -> str:
    """'Context: [1] <text 1> [2] <text 2>': the retrieved chunks numbered in rank order."""
    return "Context: " + " ".join(f"[{i}] {t.strip()}" for i, t in enumerate(texts, start=1))


def render_prompt(question: str, hits: list[Hit]) -> str:
    """The grounded prompt; `question` is 'Q: ...\\nA: ...' or a bare question."""
    if not question.lstrip().startswith("Q:"):
        question = f"Q: {question.strip()}\nA:"
    return f"{render_context([h.chunk.text for h in hits])}\n{question}" if hits else question


def fit_prompt(llm, question: str, hits: list[Hit], max_tokens: int) -> tuple[str, list[Hit]]:
    """Drop the lowest-ranked chunks until prompt + max_tokens fits the context."""
    limit = llm.engine.max_model_len - max_tokens
    for n in range(len(hits), -1, -1):
        prompt = render_prompt(question, hits[:n])
        if len(llm.tokenizer.encode_ordinary(prompt)) <= limit:
            return prompt, hits[:n]
    q_tokens = len(llm.tokenizer.encode_ordinary(render_prompt(question, [])))
    raise LmstackError(f"the question has {q_tokens} tokens; with {max_tokens} tokens for the answer it does not "
                       f"fit the model's context of {llm.engine.max_model_len}; shorten the question")


def _phrase_in(phrase: str, text: str) -> bool:
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


def _finish(question: str, completion: str, hits: list[Hit], tokens: int) -> Answer:
    line = completion.split("\n", 1)[0].strip()
    cited = [int(n) for n in _CITE.findall(line)]
    bare = _CITE.sub("", line).strip().rstrip(".").strip()
    attributed = not cited
    if attributed:
        cited = [i for i, h in enumerate(hits, start=1) if _phrase_in(bare, h.chunk.text)]
    marks = "".join(f" [{n}]" for n in cited)
    return Answer(question, (bare + marks).strip(), bare, cited, hits, attributed=attributed,
                  generated_tokens=tokens)


def answer_many(llm, retriever, questions: list[str], k: int = 3, max_tokens: int = 16) -> list[Answer]:
    """Grounded answers to many questions in one batched generate (retrieval per question)."""
    from lmstack.infer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=["\n"])
    answers: list[Answer | None] = [None] * len(questions)
    todo: list[tuple[int, str, list[Hit]]] = []
    for i, q in enumerate(questions):
        hits = retriever.search(q, k) if retriever is not None else []
        if retriever is not None and not hits:
            answers[i] = Answer(q, ABSTAIN, abstained=True)
            continue
        try:
            prompt, hits = fit_prompt(llm, q, hits, max_tokens)
        except LmstackError as e:
            answers[i] = Answer(q, "", hits=hits, error=str(e))
            continue
        todo.append((i, prompt, hits))
    outs = llm.generate([p for _, p, _ in todo], params) if todo else []
    for (i, _, hits), out in zip(todo, outs):
        comp = out.outputs[0]
        answers[i] = _finish(questions[i], comp.text, hits, len(comp.token_ids))
        if out.error is not None:
            answers[i].error = out.error
    return answers


def answer(llm, retriever, question: str, k: int = 3, max_tokens: int = 16) -> Answer:
    """One grounded answer; `retriever=None` answers closed-book (no context, no citations)."""
    return answer_many(llm, retriever, [question], k, max_tokens)[0]


def citation_scores(ans: Answer, gold_fact: str) -> tuple[float, float] | None:
    """(precision, recall) of one answer's citations against the sentence that answers it.

    A cited chunk supports the answer when it contains `gold_fact` (for tinyworld, the
    statement 'Bolo lives in Tinar'). precision = supporting cited chunks / cited chunks,
    recall = 1 if the cited chunks together contain the fact (ALCE's citation recall, with
    containment as the entailment test). None for an answer without citations and nothing
    to cite, such as an abstention or a failure."""
    if ans.abstained or ans.error is not None:
        return None
    supported = [_phrase_in(gold_fact, c.text) for c in ans.cited_chunks()]
    if not ans.citations:
        return 0.0, 0.0
    # numbers with no chunk behind them (a model citing [7] of 3) are unsupported citations
    precision = sum(supported) / len(ans.citations)
    return precision, float(any(supported))
