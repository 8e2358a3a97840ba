"""Floor 1: byte-level BPE tokenizer, built from scratch (minbpe-style layering).

    base.py       patterns, byte-level alphabet, merge-by-rank BPE (pure helpers)
    trainer.py    incremental BPE training (pair counts + heap, unique chunks)
    tokenizer.py  Tokenizer: train / encode / decode / specials / tiktoken backend
    hf_json.py    on-disk format = Hugging Face tokenizer.json
    chat.py       chat template (role special tokens, loss mask)
    viz.py        token visualizer and bytes-per-token statistics
"""
from lmstack.tokenizer.base import DEFAULT_SPECIAL_TOKENS, PATTERNS, TokenizerError
from lmstack.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "TokenizerError", "PATTERNS", "DEFAULT_SPECIAL_TOKENS"]
