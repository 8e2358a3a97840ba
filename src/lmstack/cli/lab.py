"""`lmstack lab`: build, plot and break experiments, one command each, with figures and numbers.

    lmstack lab list                                   # the labs and what each asks
    lmstack lab attention --quick                      # -> runs/labs/attention/index.html
    lmstack lab kv-cache --out /tmp/kv --seed 3        # full mode (minutes)
    lmstack lab all --quick                            # every lab + runs/labs/index.html (the gallery)

Each lab writes numbers.json, its figures (PNG, and self-contained HTML where motion or a
slider helps) and index.html: the question, what was built, the figures, the numbers and the
insight those numbers support. --quick runs in seconds; the full mode takes minutes.
"""
from __future__ import annotations

import argparse
import sys

HELP = "build, plot and break experiments, one command each, with figures and numbers"


def _run(args: argparse.Namespace) -> int:
    from lmstack.labs import format_list, get_lab, run_all, run_lab
    if args.name == "list":
        print(format_list())
        return 0

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.name == "all":
        out = args.out or "runs/labs"
        entries = run_all(out, quick=args.quick, seed=args.seed, log=log)
        for e in entries:
            what = e["insight"]["sentence"] if e["status"] == "ok" else e["message"]
            print(f"{e['name']:<15} {e['status']:<8} {e['seconds']:>6.1f}s  {what}")
        print(f"gallery: {out}/index.html")
        return 1 if any(e["status"] == "failed" for e in entries) else 0
    spec = get_lab(args.name)                      # an unknown name lists the labs
    out = args.out or f"runs/labs/{spec.name}"
    res = run_lab(spec.name, out, quick=args.quick, seed=args.seed, log=log)
    print(res["insight"]["sentence"])
    print(f"lab {spec.name}: {res['seconds']:.1f}s, page {out}/index.html, numbers {out}/numbers.json")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("lab", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="a lab's name or number, 'list' or 'all'")
    p.add_argument("--quick", action="store_true", help="seconds instead of minutes (smaller models, fewer steps)")
    p.add_argument("--out", default=None, help="output folder (default runs/labs/NAME; for 'all' runs/labs)")
    p.add_argument("--seed", type=int, default=0, help="seed: every number but wall-clock timings follows from it")
    p.set_defaults(func=_run)
