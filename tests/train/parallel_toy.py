"""The shared setup of the parallel-mode tests: one global batch stream that every mode splits
over its data-parallel ranks, and the run configuration they all use.

The runs build their models in float64 (`torch.set_default_dtype`): in float32 a different
summation order (per-rank means, all-reduce, sharded norms) moves gradients by an ulp, and
AdamW's update g / (sqrt(v) + eps) turns an ulp of a near-zero gradient into up to ~3e-6 of a
weight within 4 steps (measured: 6 of 100k weights past 1e-6 under zero1). In float64 the same
algebra agrees far below the tolerances, which is what the tests are after.

Every mode runs the same optimizer step: GRAD_ACCUM micro-batches of MICRO_GLOBAL sequences
(the pipeline's micro-batches under pp), split over the data-parallel ranks, so one process
with batch MICRO_GLOBAL and the same accumulation is the reference for all of them.
"""
from __future__ import annotations

import torch

from train_toy import VOCAB, tiny_model_config, toy_config

MICRO_GLOBAL, GRAD_ACCUM, SEQ_LEN, STEPS = 4, 4, 16, 4
CLIP = 0.5            # below the toy run's gradient norms (checked), so clipping is active


class GlobalBatches:
    """Micro-batch k of the run is the same (MICRO_GLOBAL, SEQ_LEN) tensor for everyone; data-
    parallel rank d of D takes rows [d*G/D, (d+1)*G/D). The state (k) is global, so a checkpoint
    resumes under any number of data-parallel ranks."""

    def __init__(self, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.dp_rank, self.dp_size, self.seed, self.k = dp_rank, dp_size, seed, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.k)
        # a repeating pattern with noise, so the loss falls
        base = torch.arange(SEQ_LEN + 1) * 7 % VOCAB
        x = (base + torch.randint(0, 3, (MICRO_GLOBAL, SEQ_LEN + 1), generator=g) * 11) % VOCAB
        self.k += 1
        n = MICRO_GLOBAL // self.dp_size
        part = x[self.dp_rank * n:(self.dp_rank + 1) * n]
        return part[:, :-1].contiguous(), part[:, 1:].contiguous()

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, sd):
        self.k = sd["k"]


def model_config():
    # 4 blocks (4 pipeline stages), 4 heads (tensor-parallel degree up to 4), vocab 97 (not a
    # multiple of 2 or 4: vocabulary-parallel shards are uneven)
    return tiny_model_config(n_layer=4, n_head=4, n_kv_head=2, n_embd=64)


class Float64:
    """Build models in float64 inside the block (the single-process reference runs here)."""

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def run_config(out, dp_size: int, **kw):
    return toy_config(out, max_steps=STEPS, batch_size=MICRO_GLOBAL // dp_size, grad_accum=GRAD_ACCUM,
                      seq_len=SEQ_LEN, grad_clip=CLIP, ckpt_every=2, keep_last=2, eval_every=0, **kw)
