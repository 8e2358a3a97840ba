"""Small stand-ins for the trainer tests: a tiny model config and an in-memory sampler.

`ToySampler` follows the sampler protocol the Trainer uses (next_batch, state_dict,
load_state_dict) over a fixed random token stream, so loop tests do not depend on building
a corpus. The data-dir path (PackedSampler over real shards) is tested in test_cli.py.
"""
from __future__ import annotations

import numpy as np
import torch

VOCAB = 97


def tiny_model_config(**kw):
    from lmstack.model import ModelConfig
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, context_length=64)
    return ModelConfig(**{**base, **kw})


class ToySampler:
    """Random windows of a fixed token stream (a repeating pattern + noise, so loss can fall)."""

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0, n_tokens: int = 20000):
        rng = np.random.default_rng(1234)
        pattern = rng.integers(0, VOCAB, size=37)
        tokens = np.tile(pattern, n_tokens // 37 + 1)[:n_tokens]
        noise = rng.random(n_tokens) < 0.1
        tokens[noise] = rng.integers(0, VOCAB, size=int(noise.sum()))
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next_batch(self):
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        win = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        self.batches += 1
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def state_dict(self):
        return {"gen": self.gen.get_state(), "batches": self.batches}

    def load_state_dict(self, sd):
        self.gen.set_state(sd["gen"])
        self.batches = sd["batches"]


def toy_config(out, **kw):
    from lmstack.train import TrainConfig
    base = dict(out=str(out), max_steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4,
                eval_batches=2, ckpt_every=3, keep_last=2, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def toy_trainer(out, model_kw=None, **kw):
    """A Trainer over ToySampler with the tiny model (dropout on, so RNG state matters)."""
    from lmstack.train import Trainer
    cfg = toy_config(out, **kw)
    mcfg = tiny_model_config(**{"dropout": 0.1, **(model_kw or {})})
    return Trainer(cfg, mcfg, train_sampler=ToySampler(cfg.batch_size, cfg.seq_len, seed=cfg.seed),
                   val_sampler=ToySampler(cfg.batch_size, cfg.seq_len, seed=99))


def losses(out):
    """{(split, step): loss} from out/metrics.jsonl."""
    from lmstack.train.metrics import read_metrics
    return {(r["split"], r["step"]): r["loss"] for r in read_metrics(out) if "loss" in r}
