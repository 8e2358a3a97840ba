"""LLM-as-judge: grade answers against a rubric, or compare two answers, with any model.

    judge = Judge(open_model("runs/judge"), mode="loglikelihood")   # or a HF folder, an endpoint URL
    grade(judge, [{"question": q, "answer": a, "reference": r, "label": em}, ...])
    compare(judge, [{"question": q, "answer_a": a, "answer_b": b, "label_a": 1, "label_b": 0}, ...])

A judge is any callable `prompts -> [verdict | Failure]`. `Judge` builds one from a
backend and a versioned template (judge_single.yaml, judge_pairwise.yaml): in "generate"
mode the judge writes its answer and the template's `pattern` finds the verdict in it
(none found: that item fails, listed); in "loglikelihood" mode each verdict's text is
scored as a continuation of the prompt and the likeliest wins, so even a small model
always returns a verdict.

Pairwise comparison is position-debiased: every pair is judged twice, with the answers in
both orders. A verdict counts only when the two orders agree (A wins in the first order and
B in the swapped one means the same answer won); otherwise the pair is "inconsistent".
The result reports the consistency rate (agreeing pairs / pairs judged in both orders),
next to wins, losses and ties among the consistent pairs. A judge that always answers "A"
(pure position bias) never agrees with itself across the two orders: consistency 0.

Calibration: where exact-match labels exist (the harness's exact_match of each answer),
the judge's verdicts are compared with them: for grading, agreement and the confusion
counts (judge pass/fail x label correct/wrong) and Cohen's kappa; for pairs where exactly
one answer is right, how often a consistent verdict picks it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from lmstack.eval.tasks import BUILTIN_DIR, Failure, render
from lmstack.utils import LmstackError

Verdicts = Callable[[list[str]], list]      # prompts -> [verdict string | Failure]


@dataclass(frozen=True)
class JudgeTemplate:
    name: str
    version: int | str
    kind: str                       # "single" | "pairwise"
    prompt: str                     # str.format over question, answer(_a/_b), reference, rubric
    verdicts: dict                  # verdict -> its text as the judge would write it
    pattern: str                    # regex whose group 1 is a verdict, for generate mode
    scores: dict = field(default_factory=dict)   # single: verdict -> score
    pass_at: float = 1.0            # single: a score >= pass_at counts as "correct"
    tie: str | None = None          # pairwise: the verdict meaning a tie
    rubric: str = ""
    path: str = ""


def load_judge_template(spec: str) -> JudgeTemplate:
    """'single', 'pairwise' (built-in judge_*.yaml) or a YAML path."""
    path = Path(spec) if Path(spec).is_file() else BUILTIN_DIR / f"judge_{spec}.yaml"
    if not path.is_file():
        raise LmstackError(f"judge template {spec!r}: not a file and not 'single' or 'pairwise'")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    keys = set(JudgeTemplate.__dataclass_fields__) - {"path"}
    if not isinstance(raw, dict) or set(raw) - keys:
        raise LmstackError(f"{path}: unknown key(s) {sorted(set(raw or {}) - keys)}; valid: {sorted(keys)}")
    missing = [k for k in ("name", "version", "kind", "prompt", "verdicts", "pattern") if k not in raw]
    if missing:
        raise LmstackError(f"{path}: missing key(s) {missing}")
    t = JudgeTemplate(**raw, path=str(path))
    if t.kind not in ("single", "pairwise"):
        raise LmstackError(f"{path}: kind must be 'single' or 'pairwise', got {t.kind!r}")
    if t.kind == "single" and set(t.scores) != set(t.verdicts):
        raise LmstackError(f"{path}: scores must give every verdict {sorted(t.verdicts)} a number")
    if t.kind == "pairwise" and not {"A", "B"} <= set(t.verdicts):
        raise LmstackError(f"{path}: a pairwise template needs verdicts A and B (and optionally a tie)")
    return t


class Judge:
    """A backend + template as a `Verdicts` callable."""

    def __init__(self, backend, template: JudgeTemplate | str = "single", mode: str = "generate",
                 max_tokens: int = 64, chat: bool = False):
        if mode not in ("generate", "loglikelihood"):
            raise LmstackError(f"judge mode must be 'generate' or 'loglikelihood', got {mode!r}")
        self.backend, self.mode, self.max_tokens, self.chat = backend, mode, max_tokens, chat
        self.template = load_judge_template(template) if isinstance(template, str) else template

    def info(self) -> dict:
        t = self.template
        return {"judge": self.backend.info(), "template": t.path, "version": t.version, "mode": self.mode}

    def __call__(self, prompts: list[str]) -> list:
        names = list(self.template.verdicts)
        if self.mode == "loglikelihood":
            pairs = [(p, self.template.verdicts[v]) for p in prompts for v in names]
            lls = self.backend.loglikelihood(pairs)
            out = []
            for k in range(len(prompts)):
                mine = lls[k * len(names):(k + 1) * len(names)]
                bad = next((r for r in mine if isinstance(r, Failure)), None)
                out.append(bad or names[max(range(len(names)), key=lambda i: (mine[i][0], -i))])
            return out
        texts = self.backend.generate(prompts, max_tokens=self.max_tokens, stop=None, chat=self.chat)
        return [t if isinstance(t, Failure) else parse_verdict(self.template, t) for t in texts]


def parse_verdict(template: JudgeTemplate, text: str) -> str | Failure:
    m = re.search(template.pattern, text)
    if m is None or m.group(1) not in template.verdicts:
        return Failure(f"no verdict matching /{template.pattern}/ in the judge's answer {text[:80]!r}")
    return m.group(1)


def _template(judge, template: JudgeTemplate | None, kind: str) -> JudgeTemplate:
    template = template or getattr(judge, "template", None) or load_judge_template(kind)
    if template.kind != kind:
        raise LmstackError(f"judge template {template.path or template.name} is for {template.kind} judging, "
                           f"not {kind}")
    return template


def _prompt(template: JudgeTemplate, item: dict) -> str:
    return render(template.prompt, {"rubric": template.rubric, "reference": "", **item}, "judge prompt")


# ------------------------------------------------------------------ single-answer grading
def grade(judge: Verdicts, items: list[dict], template: JudgeTemplate | None = None) -> dict:
    """Grade each {"question", "answer", "reference"?, "label"?} -> scores, pass rate,
    failures, and calibration against `label` (1 = the answer is right) where given."""
    template = _template(judge, template, "single")
    prompts, failures, rows = [], [], []
    for i, item in enumerate(items):
        try:
            prompts.append((i, _prompt(template, item)))
        except LmstackError as e:
            failures.append({"index": i, "reason": str(e)})
    verdicts = judge([p for _, p in prompts]) if prompts else []
    for (i, _), v in zip(prompts, verdicts):
        if isinstance(v, Failure):
            failures.append({"index": i, "reason": str(v)})
            continue
        score = float(template.scores[v])
        rows.append({"index": i, "verdict": v, "score": score, "passed": score >= template.pass_at,
                     "label": items[i].get("label")})
    n = len(rows)
    out = {"kind": "single", "template": template.path, "version": template.version, "n": len(items),
           "n_judged": n, "n_failed": len(failures), "failures": failures, "verdicts": rows,
           "mean_score": sum(r["score"] for r in rows) / n if n else None,
           "pass_rate": sum(r["passed"] for r in rows) / n if n else None}
    labelled = [r for r in rows if r["label"] is not None]
    if labelled:
        out["calibration"] = binary_agreement([r["passed"] for r in labelled], [bool(r["label"]) for r in labelled])
    return out


def binary_agreement(judged: list[bool], labels: list[bool]) -> dict:
    """Agreement, confusion counts and Cohen's kappa of two binary raters."""
    n = len(judged)
    tp = sum(j and l for j, l in zip(judged, labels))
    tn = sum((not j) and (not l) for j, l in zip(judged, labels))
    fp = sum(j and not l for j, l in zip(judged, labels))
    fn = n - tp - tn - fp
    agree = (tp + tn) / n
    chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
    kappa = (agree - chance) / (1 - chance) if chance < 1 else (1.0 if agree == 1 else 0.0)
    return {"n": n, "agreement": agree, "kappa": kappa, "judge_pass_label_right": tp, "judge_fail_label_wrong": tn,
            "judge_pass_label_wrong": fp, "judge_fail_label_right": fn}


# ------------------------------------------------------------------ pairwise comparison
def compare(judge: Verdicts, items: list[dict], template: JudgeTemplate | None = None) -> dict:
    """Judge each {"question", "answer_a", "answer_b", "label_a"?, "label_b"?} in both orders.

    Verdicts per pair: "a", "b", "tie" (both orders agree) or "inconsistent"; win_rate_a =
    (wins of a + ties / 2) / consistent pairs."""
    template = _template(judge, template, "pairwise")
    jobs, failures = [], []
    for i, item in enumerate(items):
        try:
            first = _prompt(template, {**item, "answer_a": item["answer_a"], "answer_b": item["answer_b"]})
            swapped = _prompt(template, {**item, "answer_a": item["answer_b"], "answer_b": item["answer_a"]})
        except (LmstackError, KeyError) as e:
            failures.append({"index": i, "reason": f"cannot build the judge prompt: {e}"})
            continue
        jobs.append((i, first, swapped))
    raw = judge([p for _, a, b in jobs for p in (a, b)]) if jobs else []
    rows, counts = [], {"a": 0, "b": 0, "tie": 0, "inconsistent": 0}
    for k, (i, _, _) in enumerate(jobs):
        v1, v2 = raw[2 * k], raw[2 * k + 1]
        bad = next((v for v in (v1, v2) if isinstance(v, Failure)), None)
        if bad is not None:
            failures.append({"index": i, "reason": str(bad)})
            continue
        first = _winner(template, v1, swapped=False)
        second = _winner(template, v2, swapped=True)    # in the swapped order, "A" means answer b
        verdict = first if first == second else "inconsistent"
        counts[verdict] += 1
        rows.append({"index": i, "first_order": v1, "swapped_order": v2, "verdict": verdict,
                     "label_a": items[i].get("label_a"), "label_b": items[i].get("label_b")})
    judged = len(rows)
    consistent = judged - counts["inconsistent"]
    out = {"kind": "pairwise", "template": template.path, "version": template.version, "n": len(items),
           "n_judged": judged, "n_failed": len(failures), "failures": failures, "verdicts": rows,
           "wins_a": counts["a"], "wins_b": counts["b"], "ties": counts["tie"], "inconsistent": counts["inconsistent"],
           "consistency_rate": consistent / judged if judged else None,
           "win_rate_a": (counts["a"] + counts["tie"] / 2) / consistent if consistent else None}
    decisive = [r for r in rows if r["label_a"] is not None and r["label_b"] is not None
                and bool(r["label_a"]) != bool(r["label_b"])]
    if decisive:
        agreed = [r for r in decisive if r["verdict"] in ("a", "b")]
        right = sum((r["verdict"] == "a") == bool(r["label_a"]) for r in agreed)
        out["calibration"] = {"pairs_one_right": len(decisive), "consistent_verdicts": len(agreed),
                              "picked_the_right_one": right,
                              "agreement": right / len(agreed) if agreed else None}
    return out


def _winner(template: JudgeTemplate, verdict: str, swapped: bool) -> str:
    if verdict == template.tie or verdict not in ("A", "B"):
        return "tie"
    return {"A": "b", "B": "a"}[verdict] if swapped else {"A": "a", "B": "b"}[verdict]
