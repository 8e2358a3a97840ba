"""`lmstack train`: pretrain a model from a recipe and flags.

    lmstack train --recipe recipes/tinyworld.yaml --out runs/tw     # the main job's data and model
    lmstack train --out runs/tiny --max-steps 200 --lr 3e-3 --batch-size 8
    lmstack train --out runs/tiny --resume                 # continue after a crash or kill
    lmstack train --data runs/tinyworld/data --out runs/t2 # train on a data dir built before
    torchrun --nproc-per-node 2 -m lmstack.cli.main train --data DIR --out runs/ddp
    torchrun --nproc-per-node 4 -m lmstack.cli.main train --distributed tp+dp --tp-size 2 ...
    (--distributed ddp | zero1 | zero2 | zero3 | fsdp | tp | pp | tp+dp; pp: --pp-schedule, --grad-accum)
    lmstack train --out runs/qat --qat '{bits: 4, group_size: 32}'   # quantization-aware training

Every TrainConfig field is a recipe key and a --flag-with-dashes. The defaults are those of
the default recipe (recipes/tinyworld.yaml), shown below. Without --data, the recipe's data
keys (corpus, size_mb, vocab_size, dedupe, ...) build OUT/data first: the data directory
`lmstack run` builds from the same recipe. An OUT/data built from the same keys is reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.cli.options import add_options, build_options, from_dict, given
from lmstack.pipeline.options import DATA_KEYS, RunOptions, train_config_for
from lmstack.train import TrainConfig, Trainer

# The data keys get flags of their own; seed is TrainConfig's (the corpus and the init share it).
DATA_FLAGS = tuple(k for k in DATA_KEYS if k != "seed")


@dataclass
class QATFlag:
    """--qat: the trainer's model transform lmstack.quant.QAT (train/ does not import quant/)."""
    qat: dict = field(default_factory=dict, metadata={"help": "quantization-aware training: fake-quantize the "
                      "linears (straight-through estimator), e.g. '{bits: 4, group_size: 32, symmetric: true}'; "
                      "the run saves the float (latent) weights: convert with lmstack.quant.convert_qat"})


def defaults() -> dict:
    """TrainConfig values of the default recipe (the CLI's defaults; TrainConfig's own are the library's)."""
    return dataclasses.asdict(train_config_for(RunOptions()))


def register(subparsers) -> None:
    doc = __doc__.split("\n\n")
    p = subparsers.add_parser("train", help=doc[0].split(": ", 1)[-1], description="\n\n".join(doc[:3]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainConfig, defaults=defaults())
    add_options(p, RunOptions, recipe=False, only=DATA_FLAGS)
    add_options(p, QATFlag, recipe=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmstack.cli.recipe import read_recipe
    from lmstack.pipeline.data import ensure_data_dir
    from lmstack.pipeline.options import check_vocab
    from lmstack.train.build import preflight
    from lmstack.train.parallel import check_launch

    recipe = read_recipe(args.recipe, "train")
    data_keys = {k: recipe.pop(k) for k in DATA_FLAGS if k in recipe}
    cfg = build_options(TrainConfig, args, base=defaults(), recipe=recipe)
    qat = build_options(QATFlag, args, recipe={}).qat
    transform = None
    if qat:
        from lmstack.quant import QAT
        transform = QAT(qat)    # checked here, before any data is built
    preflight(cfg)              # a bad preset or --seq-len fails before the default corpus is built
    check_launch(cfg, int(os.environ.get("WORLD_SIZE", 0)))   # so does a mode the launch cannot hold
    flags = given(args, DATA_FLAGS)
    if cfg.data is None:
        data = from_dict(RunOptions, {**data_keys, **flags, "seed": cfg.seed})
        check_vocab(data)
        cfg.data = str(ensure_data_dir(data, Path(cfg.out) / "data"))
    elif flags:
        ignored = ", ".join("--" + k.replace("_", "-") for k in flags)
        print(f"note: --data {cfg.data} is used as it is; ignoring {ignored}", file=sys.stderr)
    result = Trainer(cfg, model_transform=transform).fit()
    print(json.dumps({k: v for k, v in result.items() if v is not None}, indent=2))
    return 0
