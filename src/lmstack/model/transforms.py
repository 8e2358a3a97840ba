"""Transforms a model carries, recorded in its config.json and rebuilt when it is loaded.

Finetuning, alignment and quantization transform a model instead of forking it: LoRA adds
adapters, a quantizer swaps linears for quantized ones. Each transform is a JSON record in
the order it was applied, kept on the model as `model.transforms` and written by
`save_pretrained` under "transforms" in config.json:

    {"kind": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"], ...}
    {"kind": "quant", "method": "rtn", "bits": 4, "group_size": 64, ...}

Loading a folder builds the base Transformer from the config, calls each kind's registered
`rebuild(model, record)` in order (it changes the structure only: new modules, fresh
tensors), and then loads model.safetensors, which holds the transformed model's tensors
under their state-dict names. A record may name a `file` in the folder with more tensors
(e.g. an adapter kept apart from the base). An unknown kind is an error naming the kinds
this lmstack knows. The module classes a transform needs live at floor 1 (model/), so the
engine, which sits below finetune/ and quant/, can load any transformed run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from lmstack.model.weights_io import inside
from lmstack.utils import LmstackError

REBUILDERS: dict[str, Callable[[nn.Module, dict], None]] = {}


class TransformError(LmstackError, ValueError):
    """A transform record that cannot be rebuilt (unknown kind, bad fields, unsafe file)."""


def register_transform(kind: str, rebuild: Callable[[nn.Module, dict], None]) -> None:
    """Make `kind` loadable: `rebuild(model, record)` redoes its structural change."""
    REBUILDERS[kind] = rebuild


def get_transforms(model: nn.Module) -> list[dict]:
    """The records of the transforms applied to `model`, oldest first (a copy)."""
    return [dict(r) for r in getattr(model, "transforms", [])]


def record_transform(model: nn.Module, record: dict) -> None:
    """Append `record` to model.transforms after checking it is a loadable JSON record."""
    check_record(record, "record_transform")
    model.transforms = get_transforms(model) + [dict(record)]


def check_record(record, where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        raise TransformError(f"{where}: a transform must be a JSON object with a string 'kind', got {record!r}")
    if record["kind"] not in REBUILDERS:
        raise TransformError(f"{where}: unknown transform kind {record['kind']!r}; this lmstack knows "
                             f"{sorted(REBUILDERS)}")
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TransformError(f"{where}: transform {record['kind']!r} is not plain JSON ({e})") from None
    if "file" in record:
        transform_file(Path("."), record, where)


def apply_transforms(model: nn.Module, records, source: str = "config.json") -> None:
    """Rebuild the structure of each recorded transform on a freshly built base model."""
    if records is None:
        return
    if not isinstance(records, list):
        raise TransformError(f"{source}: 'transforms' must be a list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        check_record(rec, f"{source} transforms[{i}]")
        try:
            REBUILDERS[rec["kind"]](model, rec)
        except LmstackError as e:
            raise TransformError(f"{source} transforms[{i}] ({rec['kind']}): {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise TransformError(f"{source} transforms[{i}] ({rec['kind']}) has a bad or missing field: "
                                 f"{type(e).__name__}: {e}") from None
    model.transforms = [dict(r) for r in records]


def transform_file(folder: Path, record: dict, where: str = "config.json") -> Path:
    """The extra tensor file a record names, inside `folder` (never outside it)."""
    try:
        return inside(folder, record["file"], f"{where}: transform {record['kind']!r} file")
    except TransformError:
        raise
    except LmstackError as e:
        raise TransformError(str(e)) from None
