"""`lmstack data`: build a data directory (corpus -> docs/tasks/eval/kb -> tokenizer -> shards) and
show its statistics.

    lmstack data build --out runs/data/tw                            # the default recipe's data
    lmstack data build --recipe recipes/shakespeare.yaml --out runs/data/shk
    lmstack data build --corpus my_texts/ --out runs/data/mine --errors replace
    lmstack data stats runs/data/tw

The data keys of a recipe (corpus, size_mb, seed, dedupe, vocab_size, ...: see `lmstack run
--help`) with the default recipe's defaults, so `data build` makes the data directory that
`lmstack run` and `lmstack train` make from the same recipe (plus the test split's shards).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lmstack.cli.options import Parser, add_options, build_options, from_dict, given
from lmstack.data.build import SPLITS, read_jsonl
from lmstack.pipeline.options import DATA_KEYS, RunOptions
from lmstack.utils.errors import LmstackError


@dataclasses.dataclass
class DataBuildOptions:
    """What `data build` takes besides the recipe's data keys."""
    out: str = dataclasses.field(default="", metadata={"help": "the data directory DIR to write (required)"})
    tokenizer: str | None = dataclasses.field(default=None, metadata={
        "help": "use this tokenizer.json instead of training one"})


def _build(args: argparse.Namespace) -> int:
    from lmstack.cli.recipe import read_recipe
    from lmstack.pipeline.data import build_data_dir
    from lmstack.pipeline.options import check_vocab

    recipe = read_recipe(args.recipe, "data build")
    data_keys = {k: recipe.pop(k) for k in DATA_KEYS if k in recipe}
    opts = build_options(DataBuildOptions, args, recipe=recipe)
    data = from_dict(RunOptions, {**data_keys, **given(args, DATA_KEYS)})
    # fail before any work: no --out, a missing tokenizer file or an impossible vocabulary size
    if not opts.out:
        raise LmstackError("out is required: pass --out DIR (the data directory to write)")
    if opts.tokenizer is not None and not Path(opts.tokenizer).is_file():
        raise LmstackError(f"tokenizer {opts.tokenizer} not found; pass a tokenizer.json or omit --tokenizer")
    if opts.tokenizer is None:
        check_vocab(data)
    meta, shards = build_data_dir(data, opts.out, splits=SPLITS, tokenizer=opts.tokenizer, log=lambda m: None)
    d = meta["documents"]
    print(f"built {opts.out}: {d['kept']} documents ({d['removed']} duplicates removed), "
          + ", ".join(f"{s} {shards['splits'][s]['tokens']} tokens" for s in SPLITS)
          + f", vocab {shards['vocab_size']}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise LmstackError(f"{meta_path} not found; {root} is not a data directory (lmstack data build --out {root})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    shards_path = root / "shards" / "meta.json"
    shards = json.loads(shards_path.read_text(encoding="utf-8")) if shards_path.is_file() else None
    d = meta["documents"]
    print(f"data dir   {root}  (corpus: {meta['corpus']})")
    print(f"documents  {d['input']} read, {d['empty']} empty, {d['exact_duplicates']} exact + "
          f"{d['near_duplicates']} near duplicates found, {d['removed']} removed, {d['kept']} kept")
    if any(meta["noise"].values()):
        print("noise      " + ", ".join(f"{k} {v}" for k, v in meta["noise"].items()))
    for s in SPLITS:
        info = meta["splits"][s]
        tok = shards["splits"].get(s, {}).get("tokens") if shards else None
        print(f"{s:<10} {info['documents']} documents, {info['bytes'] / 1e6:.2f} MB"
              + (f", {tok} tokens" if tok is not None else "") + f", {sum(info['tasks'].values())} task records")
    if shards:
        print(f"shards     {shards['dtype']}, vocab {shards['vocab_size']}, eot id {shards['eot_token']}, "
              f"tokenizer {shards['tokenizer']}")
    if meta["eval"]:
        print("eval       " + ", ".join(f"{k} {v}" for k, v in meta["eval"].items()))
    if meta["kb"].get("docs"):
        print(f"kb         {meta['kb']['docs']} documents, {meta['kb']['questions']} questions")
    samples: dict[str, dict] = {}
    tasks_path = root / "tasks" / "train.jsonl"
    for r in read_jsonl(tasks_path) if tasks_path.is_file() else []:
        samples.setdefault(r["task"], r)
    for task, r in sorted(samples.items()):
        print(f"-- {task}: {json.dumps(r['prompt'] + r['response'], ensure_ascii=False)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="build and inspect data directories",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=Parser)
    b = sub.add_parser("build", help="corpus -> docs/tasks/eval/kb -> tokenizer -> token shards",
                       description="Build a data directory DIR (see lmstack.data.build for the layout).")
    add_options(b, DataBuildOptions)
    add_options(b, RunOptions, recipe=False, only=DATA_KEYS)
    b.set_defaults(func=_build)
    s = sub.add_parser("stats", help="documents, tokens, duplicates, splits and a sample of each task")
    s.add_argument("dir", metavar="DIR", help="a data directory made by `lmstack data build`")
    s.set_defaults(func=_stats)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
