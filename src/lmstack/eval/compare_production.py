"""`lmstack eval compare LOG`: what a server's request log says about its two models.

    report = compare_log("logs/requests.jsonl", judge=Judge(open_model("runs/judge"), "pairwise"))
    print("\\n".join(format_compare(report)))

The log is the server's (lmstack.serve.production): one JSON record per answer, "primary"
(what the client got, from arm "a" or "b" of an A/B split) or "shadow" (the shadow model's
answer to the same request, same key). Two comparisons come out of it, each where the log
has the records for it:

- "shadow": primary against shadow, paired by request key: both answered the same input
  (requests of arm a only, the production model; with an A/B split, arm b's requests are
  counted as `b_arm_pairs` and left out, so one model stands on each side);
- "ab": arm a against arm b of the primary answers: different requests (split by a hash of
  their key), so only the per-side statistics are compared, and no judge.

Per side: answers, mean length (characters and completion tokens), abstention rate (an
answer that is empty or says it does not know; `ABSTAIN_PATTERNS`, case-insensitive),
error rate, mean latency; and the differences (second side minus first). With a `judge`
(lmstack.eval.judge: any callable prompts -> verdicts, e.g. `Judge(model, "pairwise")`), the
paired answers are judged in both orders by `lmstack.eval.judge.compare`, whose
`win_rate_a` is the primary's preference rate, next to the judge's consistency.

Then `input_drift` (compare_drift.py) on the primary records' inputs: length, prompt-token
and character-distribution drift between time windows.

A torn last line (a crash mid-append) or any other line that is not a JSON object is
skipped and counted (`skipped_lines`); a log without a single record is an error.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from lmstack.eval.compare_drift import input_drift
from lmstack.utils import LmstackError

ABSTAIN_PATTERNS = (r"^\s*$", r"\bi (?:do not|don't|dont) know\b", r"\bi (?:cannot|can't|can not) answer\b",
                    r"\bnot sure\b", r"\bno idea\b", r"\bunable to answer\b", r"\bnothing relevant\b")
_ABSTAIN = re.compile("|".join(ABSTAIN_PATTERNS), re.IGNORECASE)


def read_log(path: str | Path) -> tuple[list[dict], int]:
    """(records, skipped lines) of a request log."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"request log {path} not found; start the server with --log-requests {path}")
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(rec, dict) and rec.get("role") in ("primary", "shadow") and isinstance(rec.get("key"), str):
                records.append(rec)
            else:
                skipped += 1
    if not records:
        raise LmstackError(f"request log {path} holds no answer records ({skipped} lines skipped); "
                           "is it a log written by `lmstack serve --log-requests`?")
    return records, skipped


def abstained(text: str) -> bool:
    return bool(_ABSTAIN.search(text))


def _answer(rec: dict) -> str:
    outs = rec.get("outputs") or []
    return outs[0] if outs and isinstance(outs[0], str) else ""


def side_stats(records: list[dict]) -> dict:
    """Statistics of one side's answers (first choice of each record)."""
    ok = [r for r in records if not r.get("error")]
    n = len(ok)
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)  # noqa: E731
    models = sorted({str(r.get("model")) for r in records})
    return {"models": models, "records": len(records), "answers": n,
            "error_rate": (len(records) - n) / len(records) if records else None,
            "mean_chars": mean([len(_answer(r)) for r in ok]),
            "mean_completion_tokens": mean([r["completion_tokens"] / max(1, len(r.get("outputs") or [1]))
                                            for r in ok if isinstance(r.get("completion_tokens"), int)]),
            "abstention_rate": mean([float(abstained(_answer(r))) for r in ok]),
            "mean_latency_s": mean([r["latency_s"] for r in ok if isinstance(r.get("latency_s"), (int, float))])}


def _differences(a: dict, b: dict) -> dict:
    return {k: (b[k] - a[k] if a[k] is not None and b[k] is not None else None)
            for k in ("mean_chars", "mean_completion_tokens", "abstention_rate", "error_rate", "mean_latency_s")}


def compare_log(path: str | Path, judge=None, window_s: float | None = None, alpha: float = 0.01,
                js_threshold: float = 0.1, limit: int | None = None) -> dict:
    """The report described in the module doc. `limit`: judge at most this many pairs."""
    records, skipped = read_log(path)
    primary = [r for r in records if r["role"] == "primary"]
    shadow = {r["key"]: r for r in records if r["role"] == "shadow"}
    report: dict = {"log": str(path), "records": len(records), "skipped_lines": skipped}

    paired = [(p, shadow[p["key"]]) for p in primary if p["key"] in shadow]
    pairs = [(p, s) for p, s in paired if p.get("arm", "a") == "a"]
    if pairs:
        a, b = side_stats([p for p, _ in pairs]), side_stats([s for _, s in pairs])
        out = {"pairs": len(pairs), "primary": a, "shadow": b, "shadow_minus_primary": _differences(a, b),
               "unpaired_shadow": len(shadow) - len(paired), "b_arm_pairs": len(paired) - len(pairs)}
        both = [(p, s) for p, s in pairs if not p.get("error") and not s.get("error")]
        out["same_answer_rate"] = (sum(_answer(p) == _answer(s) for p, s in both) / len(both)) if both else None
        if judge is not None:
            from lmstack.eval.judge import compare

            judged = both[:limit] if limit is not None else both
            items = [{"question": p.get("input", ""), "answer_a": _answer(p), "answer_b": _answer(s)}
                     for p, s in judged]
            out["judge"] = compare(judge, items)
        report["shadow"] = out

    arms = {arm: [p for p in primary if p.get("arm") == arm] for arm in ("a", "b")}
    if arms["a"] and arms["b"]:
        a, b = side_stats(arms["a"]), side_stats(arms["b"])
        total = len(arms["a"]) + len(arms["b"])
        report["ab"] = {"a": a, "b": b, "b_minus_a": _differences(a, b), "b_share": len(arms["b"]) / total}

    report["drift"] = input_drift(primary, window_s=window_s, alpha=alpha, js_threshold=js_threshold)
    return report


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.1%}" if pct else f"{x:+.2f}"


def format_compare(report: dict) -> list[str]:
    """Readable lines for a report from compare_log."""
    lines = [f"{report['log']}: {report['records']} records, {report['skipped_lines']} lines skipped"]
    for name, first, second, diff in (("shadow", "primary", "shadow", "shadow_minus_primary"),
                                      ("ab", "a", "b", "b_minus_a")):
        if name not in report:
            continue
        r = report[name]
        lines.append(f"{name}: {second} vs {first}" + (f" over {r['pairs']} paired requests" if name == "shadow"
                                                         else f" ({r['b_share']:.1%} of requests on b)"))
        for side in (first, second):
            s = r[side]
            lines.append(f"  {side:8s} {','.join(s['models'])}: {s['answers']} answers, mean {s['mean_chars'] or 0:.1f}"
                         f" chars, abstention {s['abstention_rate'] or 0:.1%}, errors {s['error_rate'] or 0:.1%}")
        d = r[diff]
        lines.append(f"  {second} - {first}: length {_fmt(d['mean_chars'])} chars, "
                     f"{_fmt(d['mean_completion_tokens'])} tokens, abstention {_fmt(d['abstention_rate'], True)}")
        if r.get("same_answer_rate") is not None:
            lines.append(f"  identical answers: {r['same_answer_rate']:.1%}")
        if "judge" in r:
            j = r["judge"]
            rate = "-" if j["win_rate_a"] is None else f"{j['win_rate_a']:.1%}"
            cons = "-" if j["consistency_rate"] is None else f"{j['consistency_rate']:.1%}"
            lines.append(f"  judge prefers primary in {rate} of consistent pairs (primary {j['wins_a']}, shadow "
                         f"{j['wins_b']}, ties {j['ties']}, inconsistent {j['inconsistent']}; consistency {cons}; "
                         f"{j['n_failed']} failed)")
    for k, w in enumerate(report["drift"]["windows"]):
        p = w["length_ks_p"]
        flag = {True: "DRIFT", False: "ok", None: "too few to judge"}[w["drifted"]]
        line = f"window {k}: {w['n']} requests, mean input {w['mean_chars'] or 0:.1f} chars"
        if k and p is not None:
            js = "-" if w["char_js"] is None else f"{w['char_js']:.3f}"
            line += f"; vs window 0: length KS {w['length_ks']:.3f} (p {p:.3g}), char JS {js}: {flag}"
        lines.append(line)
    return lines
