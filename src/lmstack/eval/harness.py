"""The task harness: run tasks against a model, score them, report a table and a JSON.

    from lmstack.eval import evaluate, format_table, load_task, open_model
    report = evaluate(open_model("runs/tiny"), [load_task("facts"), load_task("facts_mc")],
                      data_dir="runs/tiny/data", limit=50)
    print(format_table(report))

A task runs in three steps: build its examples (tasks.py), ask the model (backends.py:
generate, loglikelihood or loglikelihood_rolling, all examples of the task in one call so
the engine batches them), score (metrics.py). Nothing that goes wrong with one example
stops the others: a record missing a field, a prompt longer than the context, an endpoint
error, an extractor that matches nothing - each becomes a failure listed in the task's
result with its reason, and counted. Failed examples score 0 on accuracy-like metrics
(they stay in the denominator `n`, as an unparseable answer is wrong in lm-eval); BLEU,
ROUGE and perplexities are computed over the examples that produced text or a score.
"""
from __future__ import annotations

import time
from pathlib import Path

from lmstack.eval.metrics import count_words, generation_scores, mc_scores, perplexities
from lmstack.eval.tasks import Example, Failure, TaskSpec, build_examples, extract
from lmstack.utils import LmstackError

HIGHER_IS_BETTER = {"token_perplexity": False, "word_perplexity": False, "byte_perplexity": False,
                    "bits_per_byte": False}


def evaluate(model, tasks: list[TaskSpec], data_dir: str | Path | None = None, limit: int | None = None,
             log=None) -> dict:
    """Every task against `model` (a backend from `open_model`) -> the report dict."""
    t0 = time.perf_counter()
    results = []
    for spec in tasks:
        if log:
            log(f"[eval] {spec.label} ...")
        results.append(run_task(model, spec, data_dir, limit))
    return {"model": model.info(), "data_dir": str(data_dir) if data_dir else None, "limit": limit,
            "seconds": round(time.perf_counter() - t0, 3), "tasks": results}


def run_task(model, spec: TaskSpec, data_dir=None, limit: int | None = None) -> dict:
    t0 = time.perf_counter()
    items = build_examples(spec, data_dir, limit)
    examples = [x for x in items if isinstance(x, Example)]
    failures = [{"index": None, "reason": str(x)} for x in items if isinstance(x, Failure)]
    before = _engine_tokens(model)
    scorer = {"generate_until": _generate, "multiple_choice": _multiple_choice, "perplexity": _perplexity}[spec.kind]
    metrics, samples = scorer(model, spec, examples, failures, len(items))
    result = {"task": spec.name, "variant": spec.variant, "version": spec.version, "template": spec.path,
              "kind": spec.kind, "n": len(items), "n_failed": len(failures), "metrics": metrics,
              "failures": failures, "samples": samples, "seconds": round(time.perf_counter() - t0, 3)}
    if before is not None:
        result["engine_prompt_tokens"] = _engine_tokens(model) - before
    return result


def _engine_tokens(model) -> int | None:
    llm = getattr(model, "llm", None)
    return llm.stats()["prompt_tokens"] if llm is not None else None


def _fail(failures: list, ex: Example, reason) -> None:
    failures.append({"index": ex.index, "reason": str(reason)})


# ------------------------------------------------------------------ the three kinds
def _generate(model, spec: TaskSpec, examples: list[Example], failures: list, n: int):
    gen = spec.generation or {}
    outs = model.generate([e.prompt for e in examples], max_tokens=gen.get("max_tokens", 32),
                          stop=gen.get("stop"), chat=spec.chat) if examples else []
    preds, refs, raws, raw_refs, samples = [], [], [], [], []
    for ex, out in zip(examples, outs):
        pred = raw = None
        try:
            ref = extract(spec, ex.target) if spec.extract else ex.target.strip()
        except LmstackError as e:
            _fail(failures, ex, f"reference: {e}")
            ref = ex.target.strip()
        else:
            if isinstance(out, Failure):
                _fail(failures, ex, out)
            else:
                raw = out.strip()
                try:
                    pred = extract(spec, out)
                except LmstackError as e:
                    _fail(failures, ex, e)
        preds.append(pred)
        refs.append(ref)
        raws.append(raw)
        raw_refs.append(ex.target.strip())
        samples.append({"index": ex.index, "prompt": ex.prompt, "output": out if isinstance(out, str) else None,
                        "prediction": pred, "reference": ref})
    # examples that failed before reaching the model score 0 too: pad to n
    pad = n - len(examples)
    means, per = generation_scores(preds + [None] * pad, refs + [""] * pad, spec.metrics,
                                   raw=raws + [None] * pad, raw_references=raw_refs + [""] * pad)
    for row, scores in zip(samples, per):
        row.update(scores)
    return means, samples


def _multiple_choice(model, spec: TaskSpec, examples: list[Example], failures: list, n: int):
    pairs = [(e.prompt, spec.target_delimiter + c) for e in examples for c in e.choices]
    lls = model.loglikelihood(pairs) if pairs else []
    totals = dict.fromkeys(spec.metrics, 0.0)
    samples, k = [], 0
    for ex in examples:
        mine, k = lls[k:k + len(ex.choices)], k + len(ex.choices)
        bad = next((r for r in mine if isinstance(r, Failure)), None)
        row = {"index": ex.index, "prompt": ex.prompt, "choices": ex.choices, "gold": ex.gold}
        if bad is not None:
            _fail(failures, ex, bad)
        else:
            scores = mc_scores([r[0] for r in mine], ex.choices, ex.gold)
            row.update(loglikelihoods=[r[0] for r in mine], is_greedy=[r[1] for r in mine], **scores)
            for m in spec.metrics:
                totals[m] += scores[m]
        samples.append(row)
    return {m: v / n if n else 0.0 for m, v in totals.items()}, samples


def _perplexity(model, spec: TaskSpec, examples: list[Example], failures: list, n: int):
    outs = model.loglikelihood_rolling([e.prompt for e in examples]) if examples else []
    lp = tokens = words = n_bytes = 0
    samples = []
    for ex, out in zip(examples, outs):
        if isinstance(out, Failure):
            _fail(failures, ex, out)
            continue
        lp += out[0]
        tokens += out[1]
        words += count_words(ex.prompt)
        n_bytes += len(ex.prompt.encode("utf-8"))
        samples.append({"index": ex.index, "logprob": out[0], "tokens": out[1]})
    scores = perplexities(lp, tokens, words, n_bytes)
    return {m: scores[m] for m in spec.metrics}, samples


# ------------------------------------------------------------------ the table
def format_table(report: dict) -> str:
    """One row per (task, metric): task, variant, version, n, failed, metric, value."""
    rows = [("task", "variant", "version", "kind", "n", "failed", "metric", "value")]
    for t in report["tasks"]:
        for i, (m, v) in enumerate(t["metrics"].items()):
            head = (t["task"], t["variant"], str(t["version"]), t["kind"], str(t["n"]), str(t["n_failed"])) \
                if i == 0 else ("",) * 6
            arrow = "" if HIGHER_IS_BETTER.get(m, True) else " (lower is better)"
            rows.append((*head, m + arrow, _fmt(v)))
        if not t["metrics"]:
            rows.append((t["task"], t["variant"], str(t["version"]), t["kind"], str(t["n"]), str(t["n_failed"]),
                         "-", "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
