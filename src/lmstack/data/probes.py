"""Exact-match probes: does the model complete a held-out prompt with the right answer?

A probe file (`DIR/eval/<task>.jsonl`, written by the data build) holds records
`{"task", "prompt", "answer"}`. The model is given `prompt` verbatim and greedily continues
it; the probe is correct when the first line of the continuation, stripped, equals the
answer, and that line is complete: a generation cut off by its token budget before a newline
or end of text counts as wrong (its first line might have gone on). Accuracy is reported per
task next to a chance baseline: the accuracy of always
answering that task's most common answer (computed on the probes themselves, so it is an
upper bound on any constant guesser; "well above chance" is measured against the strongest
such baseline).

    probes = load_probes(DIR / "eval")
    results = score_probes(probes, complete)     # complete(probes) -> completions; the engine's
                                                 # is lmstack.eval.engine_completer(llm)
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from lmstack.utils.errors import LmstackError

# Takes probes, returns one completion per probe, in order: the text after the prompt, or
# (text, finished) where finished=False means generation hit its token budget.
Completer = Callable[[list["Probe"]], list["str | tuple[str, bool]"]]


@dataclass(frozen=True)
class Probe:
    task: str
    prompt: str
    answer: str


@dataclass
class ProbeResult:
    """One task's score; `examples` keeps a few (prompt, completion, answer, correct) rows."""
    task: str
    n: int
    correct: int
    chance: float
    examples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        return {"task": self.task, "n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "chance": self.chance, "examples": self.examples}


def exact_match(completion: str, answer: str) -> bool:
    """First line of the completion, whitespace-stripped, equals the answer."""
    return completion.split("\n")[0].strip() == answer.strip()


def load_probes(eval_dir: str | Path, limit: int | None = None,
                files: list[str] | None = None) -> dict[str, list[Probe]]:
    """Read every `*.jsonl` under `eval_dir` (or just `files`) -> {task: [Probe, ...]}, the first
    `limit` per task."""
    eval_dir = Path(eval_dir)
    if files is not None:
        files = [eval_dir / f for f in files]
    else:
        files = sorted(eval_dir.glob("*.jsonl")) if eval_dir.is_dir() else []
    probes: dict[str, list[Probe]] = {}
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                probe = Probe(str(rec.get("task") or path.stem), str(rec["prompt"]), str(rec["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise LmstackError(f"{path}:{lineno}: a probe must be a JSON object with 'prompt' and "
                                   f"'answer'; fix or remove the line") from None
            bucket = probes.setdefault(probe.task, [])
            if limit is None or len(bucket) < limit:
                bucket.append(probe)
    return probes


def majority_baseline(probes: Sequence[Probe]) -> float:
    """Accuracy of always answering the most common answer among `probes`."""
    if not probes:
        return 0.0
    counts = Counter(p.answer.strip() for p in probes)
    return counts.most_common(1)[0][1] / len(probes)


def score_probes(probes: dict[str, list[Probe]], complete: Completer,
                 n_examples: int = 3) -> dict[str, ProbeResult]:
    """Complete every prompt (all tasks in one batch) and score each task by exact match."""
    flat = [p for task in sorted(probes) for p in probes[task]]
    completions = complete(flat) if flat else []
    if len(completions) != len(flat):
        raise ValueError(f"completer returned {len(completions)} completions for {len(flat)} prompts")
    results: dict[str, ProbeResult] = {}
    for p, out in zip(flat, completions):
        text, finished = out if isinstance(out, tuple) else (out, True)
        r = results.get(p.task)
        if r is None:
            r = results[p.task] = ProbeResult(p.task, 0, 0, majority_baseline(probes[p.task]))
        ok = exact_match(text, p.answer) and (finished or "\n" in text)
        r.n += 1
        r.correct += ok
        if len(r.examples) < n_examples:
            r.examples.append({"prompt": p.prompt, "completion": text.split("\n")[0],
                               "answer": p.answer, "correct": ok})
    return results
