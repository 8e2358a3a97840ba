"""Supervised finetuning for the one Trainer: a batch source over chat examples and its loss.

    examples = load_sft_jsonl("chats.jsonl", tok, ChatExampleOptions(max_len=seq_len + 1))
    batches = SFTBatches(examples, batch_size=8, seq_len=256, packing=True, grad_accum=2)
    Trainer(cfg, model, SFTObjective(), batches, val_batches=...).fit()

The loss covers assistant tokens only (their end-of-turn token included); data/chat_examples.py
builds the masks, batching.py lays examples out in rows (padding or packing), and the model's
`segment_ids` keep packed examples from attending to each other.

The global batch. A Trainer step is `grad_accum` micro-batches on each of W ranks. The
source cuts each epoch's rows (a seeded shuffle of the examples, then packed or one per row)
into global batches of W * grad_accum * batch_size rows; rank r's micro-batch m of a step is
rows [(m * W + r) * B, ... + B) of it. Every rank knows the whole global batch, so it knows
N, the number of trained tokens in it, and scales its sum of token losses by
W * grad_accum / N. The Trainer divides by grad_accum and DDP averages over W, so the
gradient is that of (sum over the global batch) / N: the token-weighted mean, the same as
one process running the whole global batch at once (tests/finetune/test_sft_ddp.py), and a
step's logged loss is that mean. A per-micro-batch mean would instead weight a short
example's tokens more when it lands in a batch of short examples.

The state is the position (epoch, micro-batches drawn): a resumed run continues exactly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmstack.data.chat_examples import SFTExample
from lmstack.finetune.batching import SFTBatch, collate, pack_rows, trained_positions
from lmstack.train.objectives import Objective
from lmstack.utils import LmstackError


class SFTObjective(Objective):
    """Causal LM loss on the trained positions of an SFTBatch, summed and scaled by the batch's
    loss_scale; metric "acc": the fraction of trained tokens predicted exactly (greedy).

    The final norm and LM head run only at the trained positions (the model's logits_indices):
    prompt tokens carry no loss, so their logits (B*T x vocab floats, and their softmax in
    backward) would be computed only to be thrown away."""
    name = "sft"
    model_mask = "causal"
    token_nll = True      # the logged loss is the token-mean NLL of the global batch (see the module docstring)

    def loss(self, model, batch: SFTBatch):
        idx = batch.loss_index
        if batch.packed:   # positions restart at 0 per example; attention stays within each example
            logits = model(batch.input_ids, positions=batch.positions, segment_ids=batch.segments,
                           logits_indices=idx)                                                   # (N, V)
        else:
            logits = model(batch.input_ids, logits_indices=idx)
        return sft_loss(logits, batch.targets.reshape(-1)[idx], batch.loss_scale)

    def tokens(self, batch: SFTBatch) -> int:
        return batch.n_tokens


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, loss_scale: float):
    """logits (N, V) at trained positions, targets (N,) -> (sum of token NLLs * loss_scale,
    {"acc": correct tokens * loss_scale})."""
    logits = logits.float()
    nll = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return nll * loss_scale, {"acc": correct.float() * loss_scale}


class SFTBatches:
    """A resumable batch source of SFTBatches over `examples` (see the module docstring).

    batch_size: rows per micro-batch per rank; seq_len: positions per row (packing) and the
    longest example allowed; grad_accum: micro-batches per step; shuffle: a new seeded order
    every epoch (else the given order, for validation)."""

    def __init__(self, examples: list[SFTExample], batch_size: int, seq_len: int, *, packing: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, grad_accum: int = 1, shuffle: bool = True,
                 what: str = "the training data"):
        if batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad layout: batch_size={batch_size}, grad_accum={grad_accum}, rank={rank}, "
                             f"world_size={world_size}")
        for ex in examples:
            if len(ex) - 1 > seq_len:
                raise LmstackError(f"{ex.source}: the example has {len(ex)} tokens ({len(ex) - 1} input positions), "
                                   f"more than seq_len={seq_len}; raise --seq-len (within the model's context) "
                                   f"or shorten the example")
        self.examples = examples
        self.batch_size, self.seq_len, self.packing, self.seed = batch_size, seq_len, packing, seed
        self.rank, self.world_size, self.grad_accum, self.shuffle = rank, world_size, grad_accum, shuffle
        self.global_rows = world_size * grad_accum * batch_size
        self.epoch, self.drawn = 0, 0          # drawn: micro-batches taken this epoch by this rank
        self._rows_epoch, self._rows = None, None
        if self.steps_per_epoch() == 0:
            raise LmstackError(f"{what} has {len(examples)} examples, which make {len(self._epoch_rows())} rows, "
                               f"fewer than one global batch of {self.global_rows} rows (world_size "
                               f"{world_size} x grad_accum {grad_accum} x batch_size {batch_size}); lower "
                               f"--batch-size or --grad-accum, or add data")

    def _epoch_rows(self) -> list[list[int]]:
        """This epoch's rows as lists of example indices: a pure function of (seed, epoch)."""
        if self._rows_epoch != self.epoch:
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
            if self.packing:
                rows = pack_rows([len(self.examples[i]) - 1 for i in order], self.seq_len)
                self._rows = [[int(order[j]) for j in row] for row in rows]
            else:
                self._rows = [[int(i)] for i in order]
            self._rows_epoch = self.epoch
        return self._rows

    def steps_per_epoch(self) -> int:
        return len(self._epoch_rows()) // self.global_rows

    def next_batch(self) -> SFTBatch:
        if self.drawn // self.grad_accum >= self.steps_per_epoch():
            self.epoch, self.drawn = self.epoch + 1, 0
        rows = self._epoch_rows()
        step, micro = divmod(self.drawn, self.grad_accum)
        start = step * self.global_rows
        global_rows = rows[start:start + self.global_rows]
        n_trained = sum(trained_positions(self.examples[i]) for row in global_rows for i in row)
        mine = global_rows[(micro * self.world_size + self.rank) * self.batch_size:][:self.batch_size]
        self.drawn += 1
        scale = self.world_size * self.grad_accum / max(n_trained, 1)
        return collate([[self.examples[i] for i in row] for row in mine], scale, self.packing)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "drawn": self.drawn, "rows": self.global_rows}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("rows") != self.global_rows:
            print(f"note: the checkpoint's global batch was {sd.get('rows')} rows, this run's is "
                  f"{self.global_rows}; the data order continues at the start of epoch {sd['epoch']}")
            self.epoch, self.drawn = int(sd["epoch"]), 0
            return
        self.epoch, self.drawn = int(sd["epoch"]), int(sd["drawn"])

