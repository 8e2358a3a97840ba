"""Packed, deterministic, resumable batches of next-token training sequences.

    sampler = PackedSampler(ShardSet(DIR / "shards", "train"), batch_size=8, seq_len=256, seed=0)
    x, y = sampler.next_batch()           # LongTensor (B, T) each; y[:, t] is the token after x[:, t]
    sd = sampler.state_dict()             # save with the checkpoint ...
    sampler.load_state_dict(sd)           # ... and continue exactly where it stopped

Packing: a split is one token stream in which documents are separated by `<|endoftext|>`
(see shards.py), so sequences are cut from the stream with no padding; a sequence may span
documents and the model learns to start afresh after EOT. Each epoch cuts the stream into
windows of T+1 tokens (x is the first T, y the last T) at a seeded random offset, then
visits the windows in a seeded random order. Everything that decides a batch is a function
of (seed, epoch, step), so the state is just the position (epoch, step) and resuming yields
exactly the batches an uninterrupted run would have.

Distributed data parallel: global step g uses windows perm[g*B*W : (g+1)*B*W]; rank r takes
the r-th block of B. The W ranks therefore read disjoint windows, and together they see the
same data as one process with batch size B*W.

(This file cuts training batches; infer/sampler.py samples tokens from logits.)
"""
from __future__ import annotations

import numpy as np
import torch

from lmstack.data.shards import ShardSet
from lmstack.utils.errors import LmstackError


class PackedSampler:
    def __init__(self, shards: ShardSet, batch_size: int = 8, seq_len: int = 256, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.shards = shards
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.n_tokens = len(shards)
        # windows of T+1 tokens with stride T after an offset in [0, T): same count every epoch
        self.n_windows = max(0, (self.n_tokens - seq_len) // seq_len)
        self.steps_per_epoch = self.n_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            need = batch_size * world_size * seq_len + seq_len
            raise LmstackError(f"split {shards.split!r} has {self.n_tokens} tokens, fewer than one batch needs "
                               f"({need} for batch_size={batch_size} x world_size={world_size} x seq_len={seq_len}); "
                               f"lower batch_size/seq_len or build a bigger corpus")
        self.epoch, self.step = 0, 0
        self._plan_epoch: int | None = None
        self._single = shards.shards[0] if len(shards.shards) == 1 else None

    def _plan(self) -> tuple[int, np.ndarray]:
        """(offset, window order) of the current epoch, a pure function of (seed, epoch)."""
        if self._plan_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._offset = int(rng.integers(0, self.seq_len))
                self._perm = rng.permutation(self.n_windows)
            else:
                self._offset, self._perm = 0, np.arange(self.n_windows)
            self._plan_epoch = self.epoch
        return self._offset, self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        offset, perm = self._plan()
        B, T = self.batch_size, self.seq_len
        first = self.step * B * self.world_size + self.rank * B
        starts = offset + perm[first:first + B] * T                          # (B,)
        if self._single is not None:
            rows = np.asarray(self._single[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # (B, T+1)
        else:
            rows = np.stack([self.shards.window(int(s), T + 1) for s in starts])
        self.step += 1
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()       # x, y: (B, T)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size, "n_tokens": self.n_tokens,
                "shuffle": self.shuffle}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at a saved position. The position is global (the same on every rank), so a
        state saved by any rank resumes every rank."""
        for key in ("seed", "batch_size", "seq_len", "world_size", "n_tokens", "shuffle"):
            if key in sd and sd[key] != getattr(self, key):
                raise LmstackError(f"sampler state has {key}={sd[key]} but this sampler has "
                                   f"{key}={getattr(self, key)}; resume with the same data and settings")
        epoch, step = int(sd["epoch"]), int(sd["step"])
        if epoch < 0 or step < 0:
            raise LmstackError(f"sampler state epoch={epoch} step={step} is negative; it is not a sampler state")
        # step >= steps_per_epoch means "epoch finished": next_batch moves on to the next epoch
        self.epoch, self.step = epoch, step
