"""One recipe file for `lmstack run`, `lmstack train` and `lmstack data build`.

A recipe is a YAML mapping of RunOptions keys (lmstack/pipeline/options.py, whose defaults
are recipes/tinyworld.yaml and the defaults of all three commands). Each command reads the
keys it needs and skips the others with a note; a key that no command knows is an error
that names the closest valid one.

    keys                                                     run   train   data build
    DATA_KEYS: corpus, size_mb, seed, vocab_size, ...        yes   yes *   yes
    TRAIN_KEYS: model, model_config, max_steps, batch_size,  yes   yes     -
      seq_len, lr, device, train_config
    name, out_dir, stages, eval_*, probe_*, sample_*         yes   -       -
    other TrainConfig fields (warmup_steps, resume, ...)     ** -  yes     -
    out (the directory written), tokenizer (a tokenizer      -     out     both
      .json to use instead of training one)

    *  `lmstack train` builds its data from them when --data is not given.
    ** `run` reads a top-level TrainConfig field as part of `train_config`, and skips the
       ones the pipeline decides itself (data, out, objective, resume).

`model_config` (run) and `model_overrides` (train) name the same thing; either spelling
works for both commands, and so does `train_config: {...}` for `lmstack train`.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any, Callable

from lmstack.cli.options import load_recipe
from lmstack.pipeline.options import DATA_KEYS, TRAIN_KEYS, RunOptions
from lmstack.utils.errors import LmstackError

COMMANDS = ("run", "train", "data build")
RUN_SETS_ITSELF = {"data", "out", "objective", "resume"}      # TrainConfig keys the pipeline owns
DATA_BUILD_KEYS = set(DATA_KEYS) | {"out", "tokenizer"}


def _train_fields() -> set[str]:
    from lmstack.train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def _run_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RunOptions)}


def command_keys(command: str) -> set[str]:
    """The top-level recipe keys `command` reads."""
    if command == "run":
        return _run_fields() | (_train_fields() - RUN_SETS_ITSELF)
    if command == "train":
        return set(TRAIN_KEYS) | set(DATA_KEYS) | _train_fields()
    if command == "data build":
        return DATA_BUILD_KEYS
    raise ValueError(f"unknown command {command!r}; valid: {COMMANDS}")


def _move(data: dict, src: str, dst: str) -> None:
    if src in data:
        if dst in data:
            raise LmstackError(f"recipe keys {src!r} and {dst!r} name the same setting; keep one")
        data[dst] = data.pop(src)


def _flatten_train_config(data: dict) -> None:
    """`train_config: {k: v}` -> top-level k: v (lmstack train reads TrainConfig fields there)."""
    nested = data.pop("train_config", None) or {}
    if not isinstance(nested, dict):
        raise LmstackError(f"recipe key 'train_config' must be a mapping of TrainConfig fields, got {nested!r}")
    for k, v in nested.items():
        k = str(k).replace("-", "_")
        if k in data:
            raise LmstackError(f"recipe key {k!r} is given both at the top level and in train_config; keep one")
        data[k] = v


def _nest_train_config(data: dict, train_fields: set[str]) -> None:
    """Top-level TrainConfig fields that are no RunOptions field -> train_config (lmstack run)."""
    run_fields = _run_fields()
    extra = [k for k in data if k in train_fields - RUN_SETS_ITSELF and k not in run_fields]
    if not extra:
        return
    nested = dict(data.get("train_config") or {})
    for k in extra:
        if k in nested:
            raise LmstackError(f"recipe key {k!r} is given both at the top level and in train_config; keep one")
        nested[k] = data.pop(k)
    data["train_config"] = nested


def read_recipe(path: str | Path | None, command: str,
                note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The keys of recipe `path` that `command` reads, in its own spelling: for `train`,
    TrainConfig fields (train_config flattened, model_config -> model_overrides) plus the data
    keys; for `run`, RunOptions fields (top-level TrainConfig fields nested into
    train_config); for `data build`, the data keys, out and tokenizer."""
    note = note or (lambda msg: print(msg, file=sys.stderr))
    data = {str(k).replace("-", "_"): v for k, v in load_recipe(path).items()}
    train_fields = _train_fields()
    known = _run_fields() | train_fields | DATA_BUILD_KEYS
    for key in data:
        if key not in known:
            valid = sorted(command_keys(command))
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LmstackError(f"unknown recipe key {key!r}{hint}; valid keys for lmstack {command}: "
                               f"{', '.join(valid)}")
    if command == "train":
        _move(data, "model_config", "model_overrides")
        _flatten_train_config(data)
    elif command == "run":
        _move(data, "model_overrides", "model_config")
        _nest_train_config(data, train_fields)
    used = command_keys(command) | ({"train_config"} if command == "run" else set())
    skipped = sorted(k for k in data if k not in used)
    if skipped:
        note(f"note: lmstack {command} does not use the recipe key(s) {', '.join(skipped)} (other lmstack "
             f"commands do); ignoring them")
    return {k: v for k, v in data.items() if k in used}
