"""Tensor parallelism, Megatron-LM's split (Shoeybi et al. 2019, arXiv:1909.08053), on DTensor:
`parallelize_module` with ColwiseParallel / RowwiseParallel over a DeviceMesh of t ranks.

Each of the t ranks holds 1/t of every matrix below and the whole of everything else:

    attn.qkv   column-parallel: rank r computes its n_head/t query heads and n_kv_head/t kv heads
    attn.proj  row-parallel: each rank multiplies its heads' slice, an all-reduce sums the parts
    mlp.fc     column-parallel: rank r's intermediate_size/t hidden units (gate and up)
    mlp.proj   row-parallel (all-reduce)
    wte        vocabulary-parallel embedding: rank r holds rows [r V/t, (r+1) V/t); ids outside
               that range look up zeros and an all-reduce sums the partial embeddings
    lm_head    column-parallel over the vocabulary (tied to wte: the same sharded rows); the
               logits (B, T, V/t) are all-gathered, so any objective reads whole logits

Norms stay whole on every rank: they act on replicated activations. A step's forward costs
two all-reduces of (B, T, C) per block, one for the embedding and an all-gather of the logits;
the backward mirrors them (the column-parallel inputs' gradients are all-reduced).

Why the fused matrices are reordered. ColwiseParallel shards the weight as Shard(0): rank r
gets rows [r N/t, (r+1) N/t). attn.qkv's rows are [q (H D) | k (KV D) | v (KV D)], so with t=2
and H=KV rank 0 would get all of q and rank 1 all of k and v: neither could compute one head.
So at shard time the rows are permuted to [q_0|k_0|v_0 | q_1|k_1|v_1 | ...] (q_r: query heads
[r H/t, (r+1) H/t), k_r and v_r the kv heads those use), after which a plain Shard(0) hands
rank r exactly its heads. Its local output is [q_r|k_r|v_r], which the unchanged
Attention.forward splits once its head counts are set to the local ones (H/t, KV/t). Likewise a
gated mlp.fc's [gate | up] becomes [gate_0|up_0 | gate_1|up_1 | ...]. The permutation is undone
when the whole state is gathered for a checkpoint and redone on load (`permute_state`), so
checkpoints keep the model's own layout and load in any mode. A custom Placement ("three
interleaved shards") could say the same without moving rows, but every DTensor op would then
have to understand it; the permutation keeps each op a standard Shard(0).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.model.config import GATED_MLPS


class GatedColumnLinear(nn.Linear):
    """A gated MLP's `fc` under tensor parallelism. MLP._gated multiplies a plain nn.Linear's
    weight halves directly (views of the [gate | up] rows), which a sharded weight cannot give
    and which would bypass ColwiseParallel's hooks; a subclass is called as a whole, and its
    local output is this rank's [gate_r | up_r], which MLP splits in two."""


def _interleave(parts: list[tuple[int, int]], t: int) -> Tensor:
    """Row order that takes, for each rank r, the r-th 1/t of every (start, length) part in turn."""
    order = []
    for r in range(t):
        for start, length in parts:
            step = length // t
            order.append(torch.arange(start + r * step, start + (r + 1) * step))
    return torch.cat(order)


def row_orders(cfg, t: int) -> dict[str, Tensor]:
    """{module suffix: the row permutation applied to its weight (and bias) before Shard(0)}."""
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    orders = {"attn.qkv": _interleave([(0, H * D), (H * D, KV * D), ((H + KV) * D, KV * D)], t)}
    if cfg.mlp in GATED_MLPS:
        hidden = cfg.intermediate_size
        orders["mlp.fc"] = _interleave([(0, hidden), (hidden, hidden)], t)
    return orders


def permute_state(sd: dict, cfg, t: int, inverse: bool = False) -> dict:
    """A whole state dict (model weights, or an optimizer's per-parameter state keyed by name)
    with the fused rows put into shard order (inverse=True: back into the model's order)."""
    orders = row_orders(cfg, t)
    out = {}
    for name, value in sd.items():
        module, _, leaf = name.rpartition(".")
        perm = next((p for suffix, p in orders.items() if module.endswith(suffix)), None)
        if perm is not None and leaf in ("weight", "bias"):
            perm = torch.argsort(perm) if inverse else perm
            if isinstance(value, dict):       # optimizer state: the moments have the weight's shape
                value = {k: v[perm] if torch.is_tensor(v) and v.dim() and v.shape[0] == len(perm) else v
                         for k, v in value.items()}
            else:
                value = value[perm]
        out[name] = value
    return out


def apply_tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Shard `model` (a Transformer, the same weights on every rank of `mesh`) in place."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    cfg, t = model.config, mesh.size()
    with torch.no_grad():      # the fused rows into shard order, before they are split
        for name, p in model.named_parameters():
            module, _, leaf = name.rpartition(".")
            for suffix, perm in row_orders(cfg, t).items():
                if module.endswith(suffix) and leaf in ("weight", "bias"):
                    p.copy_(p[perm])
    plan = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i, block in enumerate(model.blocks):
        if cfg.mlp in GATED_MLPS:
            block.mlp.fc.__class__ = GatedColumnLinear
        block.attn.n_head, block.attn.n_kv_head = cfg.n_head // t, cfg.n_kv_head // t   # local heads
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    if cfg.tie_embeddings:     # each style distributed its own copy: tie them again (both Shard(0))
        model.lm_head.weight = model.wte.weight
    return model
