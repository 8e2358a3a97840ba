"""`lmstack align`: align a model with a reward model, DPO, PPO or GRPO.

    lmstack align rm   runs/sft --out runs/rm                       # reward model on preference pairs
    lmstack align dpo  runs/sft --out runs/dpo --beta 0.1           # DPO (or --loss-type ipo)
    lmstack align ppo  runs/sft --out runs/ppo --reward-model runs/rm
    lmstack align grpo runs/sft --out runs/grpo --group-size 8      # verifiable rewards (exact answer)
    lmstack align grpo runs/sft --recipe recipes/align/grpo.yaml --out runs/grpo   # flags override it
    torchrun --nproc-per-node 2 -m lmstack.cli.main align dpo runs/sft --out runs/dpo-ddp

RUN is the starting model (a run dir, usually an SFT run, or a HF folder). Without --data the
tinyworld preference pairs (rm, dpo) or arithmetic problems (grpo, ppo) are used, with held-out
sets never seen in training. OUT gets metrics.jsonl, the aligned model, summary.json (held-out
numbers before and after), samples.md and figures/.
"""
from __future__ import annotations

import argparse
import json

from lmstack.cli.options import Parser, add_options, build_options

HELP = {"rm": "train a reward model (Bradley-Terry) on preference pairs",
        "dpo": "direct preference optimization (DPO / IPO) against the starting model",
        "ppo": "PPO against a reward model with a KL penalty to the starting model",
        "grpo": "GRPO with verifiable rewards, rollouts through the engine"}


def register(subparsers) -> None:
    doc = __doc__.split("\n\n")
    p = subparsers.add_parser("align", help=doc[0].split(": ", 1)[-1], description="\n\n".join(doc[:3]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="method", metavar="METHOD", parser_class=Parser)
    from lmstack.align.config import AlignConfig
    for method, text in HELP.items():
        q = sub.add_parser(method, help=text, description=text)
        q.add_argument("model", metavar="RUN", help="the starting model: a run dir or a HF folder")
        add_options(q, AlignConfig)          # every field but method and model (given positionally)
        q.set_defaults(func=run)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run(args: argparse.Namespace) -> int:
    from lmstack.align.config import AlignConfig
    from lmstack.align.runner import run_align
    cfg = build_options(AlignConfig, args)          # args.method (the subcommand) and args.model (RUN) included
    summary = run_align(cfg)
    keep = ("method", "before", "after", "train", "figures")
    print(json.dumps({k: v for k, v in summary.items() if k in keep}, indent=2, default=str))
    return 0
