"""Reasoning strategies on tinyworld's held-out arithmetic: accuracy against tokens and time.

    .venv/bin/python benchmarks/bench_reasoning.py            # trains the cached run first if needed
    .venv/bin/python benchmarks/bench_reasoning.py --n 50 --k 5 10

The same problems (tinyworld's held-out arithmetic set: no problem, nor any step of one,
was seen in training) are answered four ways by the same model: directly ('A: 47+38='),
with worked steps (chain of thought), by self-consistency (k sampled worked solutions,
majority vote: maj@k), and with the calculator tool (the model writes <calc>47+38</calc>,
the tool computes). Each row: accuracy (overall and per operation), generated tokens per
question (all samples, all tool rounds), milliseconds per question (the whole batch
through the engine, wall clock, on this machine), failures.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from _tinyworld_run import ensure_run  # noqa: E402
from lmstack.infer import LLM  # noqa: E402
from lmstack.reasoning import Problem, solve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="problems")
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10], help="samples for self-consistency")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--quick", action="store_true", help="a 20-step smoke-test model (numbers mean nothing)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (see _tinyworld_run.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_dir, corpus = ensure_run(quick=args.quick)
    llm = LLM(str(run_dir), max_num_seqs=64)
    problems = [Problem.parse(p["prompt"]) for p in corpus.evals["arithmetic"][: args.n]]
    ops = sorted({p.op for p in problems})
    print(f"run {run_dir.name}, {len(problems)} held-out problems "
          f"({', '.join(f'{sum(p.op == o for p in problems)} {o}' for o in ops)})\n")
    runs = [("direct", {}), ("cot", {})]
    runs += [("self_consistency", {"k": k, "temperature": args.temperature}) for k in args.k]
    runs += [("tool", {})]
    head = f"{'strategy':<26} {'acc':>6} " + " ".join(f"{'acc ' + o:>6}" for o in ops) + \
        f" {'tokens/q':>9} {'ms/q':>8} {'failed':>6}"
    print(head)
    print("-" * len(head))
    for name, kw in runs:
        res = solve(llm, problems, name, **kw)
        s = res.summary()
        per_op = [[a.correct for a in res.attempts if a.problem.op == o] for o in ops]
        label = f"{name} (maj@{kw['k']})" if "k" in kw else name
        print(f"{label:<26} {s['accuracy']:>6.3f} " + " ".join(f"{sum(c) / max(1, len(c)):>6.2f}" for c in per_op)
              + f" {s['tokens_per_question']:>9.1f} {s['ms_per_question']:>8.1f} {s['failed']:>6}")
        if name == "tool":
            calls = [c for a in res.attempts for c in a.calls]
            print(f"{'':<26} ({len(calls) / len(problems):.2f} calculator calls per question, "
                  f"{sum(not c.ok for c in calls)} failed calls)")
    print("\nexamples (first problem):")
    p = problems[0]
    for name in ("direct", "cot", "tool"):
        a = solve(llm, [p], name).attempts[0]
        print(f"  {name:<6} {p.prompt(name)!r} -> "
              f"{a.completions[0]!r}  (answer {p.answer})")


if __name__ == "__main__":
    main()
