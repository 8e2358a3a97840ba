"""Shared helpers for the engine tests: tiny models, a plain reference loop, a byte tokenizer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmstack.model import ModelConfig, Transformer


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # init_std=0.3: with the default 0.02 a random tiny model repeats one token forever,
    # which would make "same output" comparisons nearly vacuous
    cfg = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=256, init_std=0.3)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg)).eval()


@torch.no_grad()
def plain_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Reference: full forward over the whole sequence each step, no cache at all."""
    ids = list(prompt)
    for _ in range(max_tokens):
        if len(ids) >= model.config.context_length:
            break
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


class ByteTokenizer:
    """Token i < 256 is byte i; 256 = <|endoftext|>. Splits multi-byte characters across tokens."""
    special_tokens = {"<|endoftext|>": 256}
    eot_token = 256
    n_vocab = 257

    def encode(self, text, allowed_special="none"):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class ScriptedModel(torch.nn.Module):
    """Emits script[position + 1] at every position (wrapping): a model whose output we know."""

    def __init__(self, script: list[int], vocab_size: int = 257, context_length: int = 128):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, head_dim=4,
                                      context_length=context_length, mask="causal")
        self.script = torch.tensor(script)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, positions=None, cache=None):
        B, T = ids.shape
        nxt = self.script[(positions.clamp_min(0) + 1) % len(self.script)]        # (B, T)
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        return logits.scatter(2, nxt[..., None], 10.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""
