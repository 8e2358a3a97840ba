"""lmstack: the whole LLM stack, from bytes to a served model, readable end to end.

    from lmstack import LLM, SamplingParams, Tokenizer, ModelConfig, Transformer

Names are imported lazily so `import lmstack` stays cheap and optional extras are only
needed by the parts that use them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Tokenizer": "lmstack.tokenizer",
    "ModelConfig": "lmstack.model",
    "Transformer": "lmstack.model",
    "LLM": "lmstack.infer",
    "AsyncLLM": "lmstack.infer",
    "SamplingParams": "lmstack.infer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmstack' has no attribute {name!r}")


__all__ = sorted(_LAZY)
