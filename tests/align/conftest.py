"""Shared helpers for the alignment tests: a small BPE tokenizer with the chat tokens, tiny
models over its vocabulary, and a run directory holding both."""
from __future__ import annotations

import functools

import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from tests.infer.conftest import _one_thread  # noqa: F401  (an autouse fixture, registered by import)

TEXT = ["Q: what is 12+34?\nA: 12+34=46", "Q: reverse the word cat.\nA: tac", "yes no maybe 0123456789 +-*=?",
        "Q: what is 7*8?\nA: 7*8=56", "the quick brown fox jumps over the lazy dog"] * 4


@functools.lru_cache(maxsize=1)
def tokenizer():
    from lmstack.tokenizer import Tokenizer
    return Tokenizer.train(TEXT, vocab_size=300, show_progress=False)


def tiny_model(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tokenizer().n_vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, context_length=96,
               init_std=0.1)
    cfg.update(over)
    return Transformer(ModelConfig(**cfg))


@pytest.fixture
def tok():
    return tokenizer()


@pytest.fixture
def run_dir(tmp_path):
    """A run dir with a tiny model (tied embeddings) and the tokenizer."""
    d = tmp_path / "base"
    tiny_model(0, tie_embeddings=True).save_pretrained(d)
    tokenizer().save(d / "tokenizer.json")
    return d
