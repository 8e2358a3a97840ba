"""Ways to answer an arithmetic question, and what each costs.

    res = solve(llm, problems, "self_consistency", k=8, temperature=0.7)
    res.summary()     # {"strategy", "n", "accuracy", "tokens_per_question", "seconds", "failed", ...}

    direct            'A: 47+38=' -> the number, greedy
    cot               'show your work.' -> worked steps, greedy (chain of thought, Wei et al. 2022)
    self_consistency  k sampled worked solutions, majority vote on their final numbers
                      (Wang et al. 2023); maj@k, with k times the tokens
    tool              the model writes a calculator call, the tool computes (tools.py)

Every strategy reads its answer with the same `extract_answer` (arithmetic.py), counts the
tokens the model generated (all k samples, all tool rounds) and the wall time of the whole
batch. A prompt the engine refuses (longer than the context) is a recorded failure for that
example (`Attempt.error`), counted wrong; the rest of the batch runs.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from lmstack.reasoning.arithmetic import Problem, extract_answer
from lmstack.reasoning.calculator import CalcResult
from lmstack.reasoning.tools import check_prompts, generate_with_tools
from lmstack.utils import LmstackError

STRATEGIES = ("direct", "cot", "self_consistency", "tool")
# the prompt style each strategy asks in
_STYLE = {"direct": "direct", "cot": "cot", "self_consistency": "cot", "tool": "tool"}
# default token budget per answer: a number; a worked solution (3-digit sums take ~60 tokens)
_MAX_TOKENS = {"direct": 8, "cot": 128, "self_consistency": 128, "tool": 32}


@dataclass
class Attempt:
    problem: Problem
    prediction: str | None                 # the extracted (voted) number, None if none
    completions: list[str] = field(default_factory=list)
    votes: list[str | None] = field(default_factory=list)   # one extracted answer per completion
    generated_tokens: int = 0
    error: str | None = None
    calls: list[CalcResult] = field(default_factory=list)     # tool strategy: the calculator calls

    @property
    def correct(self) -> bool:
        return self.error is None and self.prediction == self.problem.answer


@dataclass
class StrategyResult:
    strategy: str
    attempts: list[Attempt]
    seconds: float
    k: int = 1

    def summary(self) -> dict:
        n = len(self.attempts)
        tokens = sum(a.generated_tokens for a in self.attempts)
        return {"strategy": self.strategy, "k": self.k, "n": n,
                "accuracy": sum(a.correct for a in self.attempts) / max(1, n),
                "tokens_per_question": tokens / max(1, n), "seconds": self.seconds,
                "ms_per_question": 1000 * self.seconds / max(1, n),
                "failed": sum(a.error is not None for a in self.attempts)}


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent answer (None = no answer, never voted for); ties go to the answer
    that appeared first, so the vote is deterministic given the samples."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def solve(llm, problems: list[Problem], strategy: str, *, k: int = 8, temperature: float = 0.7,
          max_tokens: int | None = None, seed: int = 0, max_calls: int = 4) -> StrategyResult:
    """Answer every problem with one strategy; see the module doc for the strategies."""
    from lmstack.infer import SamplingParams

    if strategy not in STRATEGIES:
        raise LmstackError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if k < 1:
        raise LmstackError(f"k must be >= 1 (samples per question), got {k}")
    max_tokens = max_tokens or _MAX_TOKENS[strategy]
    if not problems:
        return StrategyResult(strategy, [], 0.0, k if strategy == "self_consistency" else 1)
    prompts = [p.prompt(_STYLE[strategy]) for p in problems]
    t0 = time.perf_counter()
    if strategy == "tool":
        runs = generate_with_tools(llm, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                 stop=["\n"]), max_calls=max_calls)
        attempts = []
        for p, prompt, r in zip(problems, prompts, runs):
            ans = extract_answer(prompt, r.text, r.complete) if r.error is None else None
            attempts.append(Attempt(p, ans, [r.text], [ans], r.generated_tokens, r.error, r.calls))
        return StrategyResult(strategy, attempts, time.perf_counter() - t0)

    sampled = strategy == "self_consistency"
    params = [SamplingParams(n=k if sampled else 1, temperature=temperature if sampled else 0.0,
                             seed=seed + i if sampled else None, max_tokens=max_tokens, stop=["\n"])
              for i in range(len(problems))]
    errors = check_prompts(llm, prompts, params[0])
    ok = [i for i, e in enumerate(errors) if e is None]
    outs = dict(zip(ok, llm.generate([prompts[i] for i in ok], [params[i] for i in ok]))) if ok else {}
    attempts = []
    for i, (p, prompt) in enumerate(zip(problems, prompts)):
        if errors[i] is not None:
            attempts.append(Attempt(p, None, error=errors[i]))
            continue
        out = outs[i]
        comps = out.outputs
        votes = [extract_answer(prompt, c.text, c.finish_reason != "length") for c in comps]
        attempts.append(Attempt(p, majority_vote(votes), [c.text for c in comps], votes,
                                sum(len(c.token_ids) for c in comps), out.error))
    return StrategyResult(strategy, attempts, time.perf_counter() - t0, k if sampled else 1)
