"""The "prune" transform record, at floor 1 so every loader (the engine included) knows it.

Pruning (lmstack.quant.prune, floor 3) zeroes weights in place; it changes values, not the
model's structure, so a pruned run's model.safetensors already holds the zeros and the
record's rebuild only checks the record:

    {"kind": "prune", "method": "magnitude" | "2:4", "sparsity": 0.5,
     "targets": [...], "exclude": [...], "modules": ["blocks.0.attn.qkv", ...]}
"""
from __future__ import annotations

import re

from torch import nn

from lmstack.model.replace import SeamError, find_linears
from lmstack.model.transforms import register_transform

PRUNE_METHODS = ("magnitude", "2:4")


class PruneError(SeamError):
    """A pruning setting that does not fit a layer, or a model that cannot be pruned."""


def _rebuild(model: nn.Module, rec: dict) -> None:
    if rec["method"] not in PRUNE_METHODS:
        raise PruneError(f"method={rec['method']!r} is unknown; pruning methods: {PRUNE_METHODS}")
    names = rec["modules"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PruneError(f"'modules' must be a non-empty list of module names, got {names!r}")
    found = [t.name for t in find_linears(model, [re.escape(n) for n in names])]
    if found != names:
        raise PruneError(f"the record lists {names} but this model has {found}; the pruned weights were made "
                         f"for another model")


register_transform("prune", _rebuild)
