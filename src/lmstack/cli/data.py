"""`lmstack data`: build a data directory (corpus -> docs/tasks/eval/kb -> tokenizer -> shards) and
show its statistics.

    lmstack data build --corpus tinyworld --out data/tw --size-mb 2 --seed 0 --dedupe
    lmstack data build --corpus shakespeare --out data/shk --vocab-size 2048
    lmstack data build --corpus my_texts/ --out data/mine --errors replace
    lmstack data stats data/tw
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lmstack.cli.options import Parser, add_options, build_options
from lmstack.data.build import SPLITS, CorpusOptions, build_corpus, read_jsonl
from lmstack.utils.errors import LmstackError


@dataclasses.dataclass
class DataBuildOptions(CorpusOptions):
    """CorpusOptions plus the tokenizer step that `lmstack data build` runs after the corpus."""
    vocab_size: int = dataclasses.field(default=4096, metadata={"help": "BPE vocabulary size to train"})
    tokenizer: str | None = dataclasses.field(default=None, metadata={
        "help": "use this tokenizer.json instead of training one"})


def _build(args: argparse.Namespace) -> int:
    from lmstack.data.shards import tokenize_corpus  # noqa: PLC0415  (imports the tokenizer)

    opts = build_options(DataBuildOptions, args)
    # fail before any work: a missing tokenizer file or an impossible vocabulary size
    if opts.tokenizer is not None and not Path(opts.tokenizer).is_file():
        raise LmstackError(f"tokenizer {opts.tokenizer} not found; pass a tokenizer.json or omit --tokenizer")
    if opts.tokenizer is None and opts.vocab_size < 261:
        raise LmstackError(f"--vocab-size {opts.vocab_size} is too small: at least 256 bytes + 5 special tokens = 261")
    corpus = CorpusOptions(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(CorpusOptions)})
    meta = build_corpus(corpus)
    shards = tokenize_corpus(opts.out, vocab_size=opts.vocab_size, tokenizer=opts.tokenizer)
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
    b.set_defaults(func=_build)
    s = sub.add_parser("stats", help="documents, tokens, duplicates, splits and a sample of each task")
    s.add_argument("dir", metavar="DIR", help="a data directory made by `lmstack data build`")
    s.set_defaults(func=_stats)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
