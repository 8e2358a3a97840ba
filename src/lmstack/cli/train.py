"""`lmstack train`: pretrain a model from a recipe and flags.

    lmstack train --recipe recipes/tiny.yaml --out runs/tiny
    lmstack train --out runs/tiny --max-steps 200 --lr 3e-4 --batch-size 8
    lmstack train --out runs/tiny --resume                 # continue after a crash or kill
    torchrun --nproc-per-node 2 -m lmstack.cli.main train --data DIR --out runs/ddp
    torchrun --nproc-per-node 4 -m lmstack.cli.main train --distributed tp+dp --tp-size 2 ...
    (--distributed ddp | zero1 | zero2 | zero3 | fsdp | tp | pp | tp+dp; pp: --pp-schedule, --grad-accum)

Every TrainConfig field is a recipe key and a --flag-with-dashes. Without --data, the
default corpus is built into OUT/data first (tinyworld, 2 MB, a 2048-token BPE tokenizer,
token shards); an existing OUT/data is reused.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lmstack.cli.options import add_options, build_options
from lmstack.train import TrainConfig, Trainer

DEFAULT_CORPUS = dict(corpus="tinyworld", size_mb=2.0, seed=0, dedupe=True)
DEFAULT_VOCAB = 2048


def register(subparsers) -> None:
    doc = __doc__.split("\n\n")
    p = subparsers.add_parser("train", help=doc[0].split(": ", 1)[-1], description="\n\n".join(doc[:3]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainConfig)
    p.set_defaults(func=run)


def build_default_data(data_dir: Path) -> Path:
    """tinyworld -> tokenizer.json -> shards in `data_dir`, unless already there."""
    if (data_dir / "shards" / "meta.json").is_file() and (data_dir / "tokenizer.json").is_file():
        return data_dir
    from lmstack.data import CorpusOptions, build_corpus, iter_texts, write_shards
    from lmstack.tokenizer import Tokenizer
    print(f"building the default corpus in {data_dir} (tinyworld, {DEFAULT_CORPUS['size_mb']} MB) ...")
    build_corpus(CorpusOptions(out=str(data_dir), **DEFAULT_CORPUS))
    tok = Tokenizer.train(list(iter_texts(data_dir, "train")), vocab_size=DEFAULT_VOCAB)
    tok.save(data_dir / "tokenizer.json")
    write_shards(data_dir, tok, splits=("train", "val"))
    return data_dir


def run(args: argparse.Namespace) -> int:
    from lmstack.train.build import preflight
    from lmstack.train.parallel import check_launch
    cfg = build_options(TrainConfig, args)
    preflight(cfg)              # a bad preset or --seq-len fails before the default corpus is built
    check_launch(cfg, int(os.environ.get("WORLD_SIZE", 0)))   # so does a mode the launch cannot hold
    if cfg.data is None:
        cfg.data = str(build_default_data(Path(cfg.out) / "data"))
    result = Trainer(cfg).fit()
    print(json.dumps({k: v for k, v in result.items() if v is not None}, indent=2))
    return 0
