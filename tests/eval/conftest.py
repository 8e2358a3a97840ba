"""Fixtures for the evaluation tests: a BPE tokenizer + tiny random model as an engine, and a
tiny *trained* run directory (the `lmstack run` pipeline on a micro recipe: corpus with its
held-out probes, tokenizer, a few pretraining steps), built once per session."""
from __future__ import annotations

import pytest
import torch
import yaml

TEXT = ("Q: what is 2+2?\nA: 2+2=4\nthe cat sat on the mat. the dog sat on the log. "
        "Alice counted one, two, three. The capital of Zelmal is Konfa.\n") * 20
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

MICRO = {
    "size_mb": 0.06, "vocab_size": 300, "max_steps": 6, "batch_size": 4, "seq_len": 32, "lr": 0.01,
    "stages": ["corpus", "tokenizer", "shards", "pretrain"],
    "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 2, "context_length": 256},
    "train_config": {"eval_every": 100, "ckpt_every": 0, "tensorboard": False, "eval_batches": 1,
                     "warmup_steps": 2},
}


@pytest.fixture(scope="session")
def tokenizer():
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.train([TEXT], vocab_size=330, special_tokens=SPECIALS)


def tiny_llm(tokenizer, seed: int = 0, context_length: int = 128, **engine_kw):
    from lmstack.infer import LLM
    from lmstack.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tokenizer.n_vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      context_length=context_length, init_std=0.3)
    return LLM(Transformer(cfg).eval(), tokenizer=tokenizer, **{"kv_cache_tokens": 4096, **engine_kw})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    from lmstack.cli.main import main

    root = tmp_path_factory.mktemp("eval_runs")
    recipe = root / "micro.yaml"
    recipe.write_text(yaml.safe_dump(MICRO))
    assert main(["run", "--recipe", str(recipe), "--out-dir", str(root), "--name", "micro"]) == 0
    return root / "micro"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""
