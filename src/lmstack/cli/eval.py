"""`lmstack eval RUN|HF_DIR|--endpoint URL`: score a model on tasks, print a table, write JSON.

    lmstack eval runs/tiny                                   # every built-in task its data has
    lmstack eval runs/tiny --tasks facts,facts_mc,val_ppl --limit 50
    lmstack eval runs/tiny --tasks facts --template-variant default,fewshot3   # a prompt sweep
    lmstack eval --endpoint http://127.0.0.1:8000 --data runs/tiny/data --tasks facts --chat
    lmstack eval runs/tiny --tasks facts --judge runs/judge --judge-mode loglikelihood
    lmstack eval runs/a --compare runs/b --judge http://127.0.0.1:8000 --tasks facts
    lmstack eval compare logs/requests.jsonl --judge runs/judge --window 3600   # a server's log

Tasks are versioned YAML templates (built-in names, NAME:VARIANT, or a path to a YAML
file); a run directory's data (RUN/data: held-out probes and validation documents) is used
unless --data says otherwise. The JSON (--out, default RUN/eval_results.json, or
./eval_results.json for an endpoint) records each task's template file, version and
variant, its metrics, and every failed example with its reason.

--judge grades each generation task's answers with another model (rubric: judge_single.yaml)
and reports its agreement with exact match; with --compare OTHER it judges the two models'
answers pairwise, in both orders (judge_pairwise.yaml), and reports the consistency rate.

`lmstack eval compare LOG` reads the request log of `lmstack serve --log-requests`: primary
against shadow answers and A/B arms (length, abstention, judge preference with --judge),
and drift of the inputs between --window-second windows (lmstack.eval.compare_production).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmstack.cli.options import add_options, build_options
from lmstack.utils import LmstackError, atomic_write_json


@dataclass
class EvalOptions:
    endpoint: str | None = field(default=None, metadata={"help": "an OpenAI-compatible server's URL to score "
                                                                 "instead of a model directory"})
    tasks: list[str] | None = field(default=None, metadata={"help": "comma-separated task names, NAME:VARIANT "
                                                                    "or YAML files; none = every built-in task "
                                                                    "whose data exists"})
    limit: int | None = field(default=None, metadata={"help": "examples per task; none = all"})
    data: str | None = field(default=None, metadata={"help": "data directory with eval/ and docs/; none = "
                                                             "RUN/data"})
    out: str | None = field(default=None, metadata={"help": "JSON file to write; none = RUN/eval_results.json"})
    template_variant: list[str] | None = field(default=None, metadata={"help": "run every task under each of "
                                                                               "these variants (a sweep)"})
    chat: bool = field(default=False, metadata={"help": "ask generation tasks and the judge through the chat "
                                                        "template / chat API"})
    judge: str | None = field(default=None, metadata={"help": "judge model: run dir, HF dir or URL"})
    judge_mode: str = field(default="generate", metadata={"help": "generate (parse the verdict) or "
                                                                  "loglikelihood (likeliest verdict)"})
    judge_template: str | None = field(default=None, metadata={"help": "judge YAML; none = judge_single.yaml, "
                                                                       "or judge_pairwise.yaml with --compare"})
    compare: str | None = field(default=None, metadata={"help": "second model (dir or URL) to judge pairwise "
                                                               "against"})
    batch_size: int = field(default=32, metadata={"help": "requests per engine batch"})
    api_key: str | None = field(default=None, metadata={"help": "Bearer key for --endpoint / URL models"})
    kv_cache_tokens: int | None = field(default=None, metadata={"help": "engine: KV-cache capacity in tokens"})
    window: float | None = field(default=None, metadata={"help": "eval compare: drift window in seconds; none = "
                                                                  "the log's two halves"})
    drift_alpha: float = field(default=0.01, metadata={"help": "eval compare: KS p-value below which a window "
                                                               "has drifted"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16; none = as saved"})


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on tasks (generation, multiple choice, perplexity), "
                                           "optionally with an LLM judge", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, metavar="RUN_DIR|HF_DIR",
                   help="run directory or Hugging Face checkpoint folder (or give --endpoint); "
                        "'compare LOG' compares a server's request log")
    p.add_argument("log", nargs="?", default=None, metavar="LOG", help=argparse.SUPPRESS)
    add_options(p, EvalOptions, recipe=False)
    p.set_defaults(func=handler)


def _open(spec: str, opts: EvalOptions):
    from lmstack.eval import open_model

    return open_model(spec, api_key=opts.api_key, batch_size=opts.batch_size, kv_cache_tokens=opts.kv_cache_tokens,
                      device=opts.device, dtype=opts.dtype)


def _task_specs(opts: EvalOptions, data_dir: Path | None) -> list:
    from lmstack.eval import builtin_tasks, load_task
    from lmstack.eval.tasks import source_path

    variants = opts.template_variant or [None]
    if opts.tasks:
        return [load_task(t, v) for t in opts.tasks for v in variants]
    specs = []
    for name in builtin_tasks():           # the default: what this data directory can feed
        spec = load_task(name)
        if data_dir is not None and source_path(spec, data_dir).is_file():
            specs += [load_task(name, v) for v in variants if v is None or v == "default" or v in spec.variants]
    if not specs:
        raise LmstackError(f"no built-in task has data in {data_dir}; pass --data DIR or --tasks")
    return specs


def handler(args) -> int:
    from lmstack.eval import evaluate, format_table

    opts: EvalOptions = build_options(EvalOptions, args)
    if args.model == "compare" and args.log is not None:
        return compare_handler(args.log, opts)
    if args.log is not None:
        raise LmstackError(f"unexpected argument {args.log!r}: give one model (or 'compare LOG')")
    if (args.model is None) == (opts.endpoint is None):
        raise LmstackError("give a model directory or --endpoint URL (exactly one)")
    if opts.compare and not opts.judge:
        raise LmstackError("--compare needs --judge MODEL to decide between the two models' answers")
    spec = args.model or opts.endpoint
    run_dir = Path(args.model) if args.model else None
    data_dir = Path(opts.data) if opts.data else (run_dir / "data" if run_dir and (run_dir / "data").is_dir()
                                                   else None)
    tasks = _task_specs(opts, data_dir)
    if opts.chat:
        tasks = [replace(t, chat=True) for t in tasks]
    if opts.judge and not any(t.kind == "generate_until" for t in tasks):
        raise LmstackError("the judge grades the answers of generation tasks; none of --tasks is one")
    model = _open(spec, opts)
    judge = None
    if opts.judge:        # everything about the judge is checked before the evaluation runs
        from lmstack.eval import Judge
        judge = Judge(_open(opts.judge, opts), opts.judge_template or ("pairwise" if opts.compare else "single"),
                      mode=opts.judge_mode, chat=opts.chat)
        if judge.template.kind != ("pairwise" if opts.compare else "single"):
            raise LmstackError(f"judge template {judge.template.path} is {judge.template.kind}; "
                               f"{'--compare needs a pairwise' if opts.compare else 'grading needs a single'} one")
    log = lambda msg: print(msg, file=sys.stderr)    # noqa: E731
    report = evaluate(model, tasks, data_dir, opts.limit, log=log)
    if judge is not None:
        _judge(report, judge, opts, tasks, data_dir, log)
    out = Path(opts.out) if opts.out else (run_dir / "eval_results.json" if run_dir else Path("eval_results.json"))
    atomic_write_json(out, report)
    print(format_table(report))
    for line in _judge_lines(report):
        print(line)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def compare_handler(log_path: str, opts: EvalOptions) -> int:
    """`lmstack eval compare LOG`: print the comparison, write it as JSON (--out)."""
    from lmstack.eval.compare_production import compare_log, format_compare

    judge = None
    if opts.judge:
        from lmstack.eval import Judge
        judge = Judge(_open(opts.judge, opts), opts.judge_template or "pairwise", mode=opts.judge_mode,
                      chat=opts.chat)
        if judge.template.kind != "pairwise":
            raise LmstackError(f"judge template {judge.template.path} is {judge.template.kind}; comparing two "
                               "models' answers needs a pairwise one")
    report = compare_log(log_path, judge=judge, window_s=opts.window, alpha=opts.drift_alpha, limit=opts.limit)
    out = Path(opts.out) if opts.out else Path(log_path).with_suffix(".compare.json")
    atomic_write_json(out, report)
    print("\n".join(format_compare(report)))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _judge(report: dict, judge, opts: EvalOptions, tasks, data_dir, log) -> None:
    """Grade (or, with --compare, judge pairwise) every generation task's answers."""
    from lmstack.eval import compare, evaluate, grade

    pairwise = opts.compare is not None
    report["judge"] = judge.info()
    gen = [(t, r) for t, r in zip(tasks, report["tasks"]) if r["kind"] == "generate_until"]
    other = None
    if pairwise:
        log(f"[eval] answers of {opts.compare} ...")
        other = evaluate(_open(opts.compare, opts), [t for t, _ in gen], data_dir, opts.limit)
        report["compare"] = {"model": other["model"], "tasks": other["tasks"]}
    for k, (_, result) in enumerate(gen):
        log(f"[eval] judging {result['task']} ...")
        mine = result["samples"]
        if pairwise:
            theirs = {s["index"]: s for s in other["tasks"][k]["samples"]}
            items = [{"question": s["prompt"], "answer_a": _answer(s), "answer_b": _answer(theirs[s["index"]]),
                      "reference": s["reference"], "label_a": s.get("exact_match"),
                      "label_b": theirs[s["index"]].get("exact_match")} for s in mine if s["index"] in theirs]
            result["pairwise"] = compare(judge, items)
        else:
            items = [{"question": s["prompt"], "answer": _answer(s), "reference": s["reference"],
                      "label": s.get("exact_match")} for s in mine]
            result["judged"] = grade(judge, items)


def _answer(sample: dict) -> str:
    out = sample.get("output")
    return out.split("\n")[0].strip() if out else ""


def _judge_lines(report: dict) -> list[str]:
    lines = []
    for t in report["tasks"]:
        if "judged" in t:
            j = t["judged"]
            cal = j.get("calibration")
            lines.append(f"judge {t['task']}: pass rate {_pct(j['pass_rate'])} of {j['n_judged']} judged, "
                         f"{j['n_failed']} failed" + (f"; agreement with exact match {_pct(cal['agreement'])} "
                                                      f"(kappa {cal['kappa']:.2f})" if cal else ""))
        if "pairwise" in t:
            p = t["pairwise"]
            lines.append(f"judge {t['task']}: A wins {p['wins_a']}, B wins {p['wins_b']}, ties {p['ties']}, "
                         f"inconsistent {p['inconsistent']}; consistency {_pct(p['consistency_rate'])}, "
                         f"{p['n_failed']} failed")
    return lines


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"

