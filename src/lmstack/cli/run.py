"""`lmstack run`: the main job. Builds the corpus, trains a tokenizer and a model, evaluates,
samples, and writes `OUT_DIR/NAME/report.html`, then prints a summary table.

    lmstack run                                   # the built-in tinyworld recipe -> runs/tinyworld/
    lmstack run --name demo --max-steps 200       # any recipe key as a flag
    lmstack run --recipe recipes/shakespeare.yaml
    lmstack run --force                           # redo stages whose inputs did not change
"""
from __future__ import annotations

import argparse

from lmstack.cli.options import add_options, build_options


def register(subparsers) -> None:
    from lmstack.pipeline.options import STAGE_NAMES, RunOptions

    p = subparsers.add_parser(
        "run", help="the main job: corpus -> tokenizer -> shards -> pretrain -> evaluate -> sample -> report",
        description=f"Run the stages {' -> '.join(STAGE_NAMES)} into OUT_DIR/NAME. A stage whose inputs "
                    "are unchanged since the last run is skipped. Without --recipe the built-in tinyworld "
                    "recipe (recipes/tinyworld.yaml) runs on 2 CPU cores in under 10 minutes.")
    add_options(p, RunOptions)
    p.add_argument("--force", action="store_true", help="re-run every stage even when its cache is valid")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from lmstack.pipeline import RunOptions, format_probes, format_table, run_pipeline

    opts = build_options(RunOptions, args)
    summary = run_pipeline(opts, force=args.force)
    print(format_table(summary))
    probes = format_probes(summary["run_dir"])
    if probes:
        print("\nheld-out probes (greedy, exact match; chance = always the most common answer):")
        print(probes)
    print(f"report: {summary['run_dir']}/report.html")
    return 0
