"""Convert multi-head attention to grouped-query or multi-query attention by mean-pooling K/V heads.

    from lmstack.model.gqa import to_gqa
    gqa = to_gqa(model, n_kv_head=2)      # a new Transformer; `model` is not changed

GQA (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints", section 2.1) builds a checkpoint with fewer key/value heads from a
trained one: the key (and value) projection heads of each group are replaced by their mean,
after which the paper uptrains briefly. The query heads, the output projection and every
other weight are kept as they are.

Grouping follows the attention code: query head h reads K/V head h // (n_head / n_kv_head),
so a K/V head serves consecutive query heads, and going from K old K/V heads to G new ones
averages the K/G consecutive old heads of each new group (old head j -> new head j // (K/G)).
Then query head h, which read old head h // (H/K), reads new head h // (H/G) = that old head's
group: every query head keeps reading the average of the heads it and its group-mates read.
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.model.config import ConfigError
from lmstack.model.transformer import Transformer


def pool_heads(rows: torch.Tensor, n_old: int, n_new: int) -> torch.Tensor:
    """(n_old * D, ...) projection rows, head after head -> (n_new * D, ...): each new head the
    mean of n_old / n_new consecutive old heads."""
    D = rows.shape[0] // n_old
    return rows.reshape(n_new, n_old // n_new, D, *rows.shape[1:]).mean(1).reshape(n_new * D, *rows.shape[1:])


def to_gqa(model: Transformer, n_kv_head: int) -> Transformer:
    """A copy of `model` with `n_kv_head` key/value heads, K/V heads mean-pooled per group."""
    cfg = model.config
    if type(model) is not Transformer:
        raise ConfigError(f"to_gqa converts a decoder Transformer's self-attention; got {type(model).__name__}")
    old = cfg.n_kv_head
    if not isinstance(n_kv_head, int) or isinstance(n_kv_head, bool) or n_kv_head < 1 or old % n_kv_head:
        valid = [g for g in range(1, old + 1) if old % g == 0]
        raise ConfigError(f"n_kv_head={n_kv_head!r}: pooling groups whole K/V heads, so it must divide the model's "
                          f"n_kv_head={old}; valid: {valid}")
    for name, module in model.named_modules():
        if name.endswith("attn.qkv") and type(module) is not nn.Linear:
            raise ConfigError(f"{name} is a {type(module).__name__}, not a plain nn.Linear (LoRA or a quantized "
                              f"linear): merge or dequantize before converting to GQA")
    H, D = cfg.n_head, cfg.head_dim
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            q, k, v = tensor.split([H * D, old * D, old * D], dim=0)     # rows [q | k | v]
            tensor = torch.cat([q, pool_heads(k, old, n_kv_head), pool_heads(v, old, n_kv_head)], dim=0)
        state[name] = tensor
    param = next(model.parameters())
    out = Transformer(cfg.replace(n_kv_head=n_kv_head, extra={**cfg.extra, "gqa_pooled_from_n_kv_head": old}))
    out.load_state_dict(state)
    return out.to(device=param.device, dtype=param.dtype).train(model.training)
