"""Floor 0: helpers every other floor may use (device, seeding, atomic IO, errors, progress).

Imports are lazy so that light users (the tokenizer, the CLI's --help) do not pay for
importing torch.
"""
from __future__ import annotations

import importlib

from lmstack.utils.errors import LmstackError
from lmstack.utils.io import (atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text,
                              ensure_writable_dir)
# Eager: the submodule `lmstack.utils.progress` would otherwise shadow the function.
from lmstack.utils.progress import progress

_LAZY = {
    "pick_device": "lmstack.utils.device", "pick_dtype": "lmstack.utils.device",
    "autocast": "lmstack.utils.device", "seed_everything": "lmstack.utils.seed",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmstack.utils' has no attribute {name!r}")


__all__ = ["LmstackError", "atomic_dir", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "ensure_writable_dir", "progress", *_LAZY]
