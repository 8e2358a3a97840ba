"""Small stand-ins for the trainer tests: a tiny model config and an in-memory sampler.

`ToySampler` follows the batch-source protocol the Trainer uses (next_batch, state_dict,
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
    return Trainer(cfg, mcfg, batches=ToySampler(cfg.batch_size, cfg.seq_len, seed=cfg.seed),
                   val_batches=ToySampler(cfg.batch_size, cfg.seq_len, seed=99))


def losses(out):
    """{(split, step): loss} from out/metrics.jsonl."""
    from lmstack.train.metrics import read_metrics
    return {(r["split"], r["step"]): r["loss"] for r in read_metrics(out) if "loss" in r}


# --------------------------------------------------------------------------- a partly frozen run
def frozen_objective():
    """A custom objective that uses all of the protocol: random loss positions drawn from the
    trainer's generator in prepare(), metrics (token accuracy, an EMA of the loss) and state
    (the EMA), so exact resume needs every one of them restored."""
    from lmstack.train import IGNORE_INDEX, Batch, CausalLM, token_loss

    class DropTargetsLM(CausalLM):
        name = "drop-targets"

        def __init__(self):
            self.ema = 0.0

        def prepare(self, raw, generator):
            x, y = raw
            drop = torch.rand(y.shape, generator=generator) < 0.2       # 20% of targets carry no loss
            return Batch(x, torch.where(drop, torch.full_like(y, IGNORE_INDEX), y))

        def loss(self, model, batch):
            logits = self.forward(model, batch)
            loss = token_loss(logits, batch.targets)
            keep = batch.targets != IGNORE_INDEX
            acc = (logits.argmax(-1) == batch.targets)[keep].float().mean()
            if model.training:
                self.ema = 0.9 * self.ema + 0.1 * float(loss.detach())
            return loss, {"acc": acc, "loss_ema": self.ema}

        def state_dict(self):
            return {"ema": self.ema}

        def load_state_dict(self, sd):
            self.ema = sd["ema"]

    return DropTargetsLM()


def frozen_model(base_seed: int = 1234, **model_kw):
    """The caller's base model: the tiny Transformer from `base_seed`, everything frozen but
    the last block and the final norm (embeddings and the tied LM head stay frozen)."""
    from lmstack.model import Transformer
    torch.manual_seed(base_seed)
    model = Transformer(tiny_model_config(**{"dropout": 0.1, **model_kw}))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("blocks.1.", "norm_f."))
    return model


def frozen_trainer(out, base_seed: int = 1234, **kw):
    """toy_trainer's run on a partly frozen base with `frozen_objective`, saving trainable weights only."""
    from lmstack.train import Trainer
    cfg = toy_config(out, save_weights="trainable", **kw)
    return Trainer(cfg, frozen_model(base_seed), frozen_objective(),
                   ToySampler(cfg.batch_size, cfg.seq_len, seed=cfg.seed),
                   val_batches=ToySampler(cfg.batch_size, cfg.seq_len, seed=99))


def records(out):
    """{(split, step): record} from out/metrics.jsonl without the timing fields."""
    from lmstack.train.metrics import read_metrics
    return {(r["split"], r["step"]): {k: v for k, v in r.items() if k not in ("tok_per_s", "mfu")}
            for r in read_metrics(out)}
