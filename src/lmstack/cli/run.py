"""`lmstack run`: the main job. Builds the corpus, trains a tokenizer and a model, evaluates and
samples it, makes it a chat model (SFT, DPO, GRPO), quantizes it to INT4, measures every stage's
model on the same held-out sets, and writes `OUT_DIR/NAME/report.html`; prints a summary table,
each stage's effect, and (last line) how to serve the final model.

    lmstack run                                   # the built-in tinyworld recipe -> runs/tinyworld/
    lmstack run --name demo --max-steps 200       # any recipe key as a flag
    lmstack run --recipe recipes/shakespeare.yaml
    lmstack run --corpus my_book.txt --name book  # your own text (a file, a folder, or .jsonl)
    lmstack run --force                           # redo stages whose inputs did not change

Interrupted (Ctrl-C, a kill), the same command continues: finished stages are cached and
pretraining resumes from its last checkpoint (train_config.ckpt_every) with the losses of an
uninterrupted run.
"""
from __future__ import annotations

import argparse
import sys

from lmstack.cli.options import add_options, build_options

# The one time estimate of the default recipe (README and recipes/tinyworld.yaml say the same).
DEFAULT_TIME = "about 6 minutes on 2 idle CPU cores"


def register(subparsers) -> None:
    from lmstack.pipeline.options import DEFAULT_STAGES, STAGE_NAMES, RunOptions

    p = subparsers.add_parser(
        "run", help="the main job: pretrain -> sft -> dpo -> grpo -> int4 -> measure -> report",
        description=f"Run the stages {' -> '.join(DEFAULT_STAGES)} into OUT_DIR/NAME (or those of --stages, "
                    f"in the order {' -> '.join(STAGE_NAMES)}). A stage whose inputs "
                    "are unchanged since the last run is skipped; an interrupted run continues where it stopped "
                    "(pretraining from its last checkpoint). Without --recipe the built-in tinyworld recipe "
                    f"(recipes/tinyworld.yaml) runs: {DEFAULT_TIME}.")
    add_options(p, RunOptions)
    p.add_argument("--force", action="store_true", help="re-run every stage even when its cache is valid")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from lmstack.cli.recipe import read_recipe
    from lmstack.pipeline import RunOptions, format_effects, format_probes, format_table, run_pipeline

    opts = build_options(RunOptions, args, recipe=read_recipe(args.recipe, "run"))
    try:
        summary = run_pipeline(opts, force=args.force)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to continue (finished stages are kept, pretraining "
              f"resumes from its last checkpoint in {opts.out_dir}/{opts.name}/checkpoints)", file=sys.stderr)
        return 130
    print(format_table(summary))
    status = {s["name"]: s["status"] for s in summary["stages"]}
    probes = format_probes(summary["run_dir"]) if "evaluate" in status else ""
    if probes:
        print("\nheld-out probes (greedy, exact match; chance = always the most common answer):")
        print(probes)
    effects = format_effects(summary["run_dir"]) if "measure" in status else ""
    if effects:
        print("\neach stage's effect on held-out data (before -> after):")
        print(effects)
    if status.get("report") == "ran":
        print(f"report: {summary['run_dir']}/report.html")
    else:
        print("no report written: the report stage was not among --stages")
    if any(s in status for s in ("sft", "dpo", "grpo", "quantize", "import")):
        from lmstack.pipeline.report_chat import serve_line
        from lmstack.pipeline.runner import Run
        print(serve_line(Run(opts, log=print)))
    return 0
