"""`lmstack finetune`: supervised finetuning (full, LoRA, QLoRA) of a run or a Hugging Face folder.

    lmstack finetune runs/tinyworld --method lora --data tinyworld --out runs/tw-sft
    lmstack finetune hf/qwen2-tiny --method qlora --data chats.jsonl --out runs/q --export-hf hf/q-sft
    lmstack finetune runs/tinyworld --recipe recipes/finetune-tinyworld.yaml --out runs/tw-sft
    torchrun --nproc-per-node 2 -m lmstack.cli.main finetune runs/tinyworld --out runs/ddp

RUN is one of our run directories or a Hugging Face folder (config.json, model.safetensors,
tokenizer.json). Every FinetuneConfig field (the train command's options and the finetuning
ones: --method, --lora-r, --packing, --export-hf ...) is a recipe key and a
--flag-with-dashes. Data: "tinyworld" (its tasks as chats, held-out probes scored before and
after) or a JSONL of {"messages": [...]} / {"prompt", "response"} lines. OUT gets the model
(LLM(OUT) and `lmstack serve OUT` load it), adapter/ (PEFT format, lora/qlora),
finetune.json and report.html.
"""
from __future__ import annotations

import argparse
import json

from lmstack.cli.options import add_options, build_options
from lmstack.utils import LmstackError


def register(subparsers) -> None:
    from lmstack.finetune.config import FinetuneConfig
    doc = __doc__.split("\n\n")
    p = subparsers.add_parser("finetune", help=doc[0].split(": ", 1)[-1], description="\n\n".join(doc[:3]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", metavar="RUN", default=None,
                   help="the model to finetune: a run directory or a Hugging Face folder (same as --model)")
    add_options(p, FinetuneConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmstack.finetune.config import FinetuneConfig
    from lmstack.finetune.run import finetune
    if args.run is not None:
        flag = getattr(args, "model", None)
        if isinstance(flag, str) and flag != args.run:
            raise LmstackError(f"RUN={args.run!r} and --model={flag!r} disagree; give the model once")
        args.model = args.run
    cfg = build_options(FinetuneConfig, args)
    summary = finetune(cfg)
    if "after" not in summary:            # a non-zero rank under torchrun
        return 0
    short = {"out": cfg.out, "method": summary["method"], **summary["train"],
             "peak_train_memory_mb": summary["peak_train_memory_mb"],
             "base_bits_per_param": summary["base_bits_per_param"]["stored"]}
    for when in ("before", "after"):
        scores = summary.get(when)
        if scores:
            short[f"exact_match_{when}"] = {t: round(r["accuracy"], 3) for t, r in scores["tasks"].items()}
    after = summary.get("after") or {}
    for key in ("abstain_rate_unseen", "accuracy_known", "abstain_rate_known"):
        if after.get(key) is not None:
            short[key] = round(after[key], 3)
    if summary.get("export_hf"):
        short["export_hf"] = summary["export_hf"]
    print(json.dumps(short, indent=2))
    return 0
