"""The KV-cache protocol: how attention talks to whatever stores keys and values.

One attention code path serves training (no cache), simple generation (the contiguous
cache below) and the inference engine (a paged cache over block tables, in `infer/`).
The model never knows which one it has. The contract:

    k_all, v_all, k_pos = cache.update(layer_idx, k, v, positions)

    k, v       (B, n_kv_head, T, head_dim)  keys/values of the T new tokens of each row,
                                            RoPE already applied to k
    positions  (B, T) long                  absolute position of each new token;
                                            -1 marks a padding slot (nothing is written)
    k_all, v_all (B, n_kv_head, S, head_dim) every key/value these queries may see
    k_pos      (B, S) long                  position of each returned slot; -1 = empty

The cache decides *where* K/V are written and *what* comes back; the model decides *who
attends to whom* from positions alone: slot s is visible to query t of row b iff
k_pos[b,s] >= 0, k_pos[b,s] <= q_pos[b,t] (causal) and, with a sliding window W,
q_pos[b,t] - k_pos[b,s] < W. ALiBi biases are slope * (k_pos - q_pos). A query whose
position is -1 is padding; its output is discarded (the model lets it see every slot so
no softmax row is empty).

Optional: `attend(layer_idx, q, k, v, positions, scale, window, cos, sin) -> (B, T, H * head_dim)
or None`, q (B, T, H, head_dim) and k, v (B, T, n_kv_head, head_dim) before RoPE (cos, sin: the
RoPE tables (B, 1, T, rot), or None). With a plain causal mask (+ sliding window W) attention
calls it first; a cache that can compute the attention output itself (a fused kernel reading
its own storage) rotates q and k, writes k, v and returns it; None means "not here" (nothing
written) and RoPE + update() follow.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class KVCache(Protocol):
    def update(self, layer_idx: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ...


class ContiguousKVCache:
    """A preallocated (B, max_len) cache: slot index == token position.

    Used by plain generation loops. Memory is batch * max_len whatever the real lengths
    are; the engine's paged cache exists to avoid exactly that waste.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # 1 + highest position written so far

    def update(self, layer_idx: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, H, T, D = k.shape
        if (B, H, D) != (self.k.shape[1], self.k.shape[2], self.k.shape[4]):
            raise ValueError(f"KV cache built for (batch={self.k.shape[1]}, n_kv_head={self.k.shape[2]}, "
                             f"head_dim={self.k.shape[4]}), got k of shape {tuple(k.shape)}")
        if positions.shape != (B, T):
            raise ValueError(f"positions must have shape {(B, T)}, got {tuple(positions.shape)}")
        hi = int(positions.max()) if positions.numel() else -1
        if hi >= self.max_len:
            raise ValueError(f"position {hi} does not fit a KV cache of max_len={self.max_len}")
        valid = positions >= 0
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        p = positions[b_idx, t_idx]
        # (n, H, D) rows scattered into (B, H, S, D) at [b, :, p, :]
        self.k[layer_idx].permute(0, 2, 1, 3)[b_idx, p] = k.permute(0, 2, 1, 3)[b_idx, t_idx].to(self.k.dtype)
        self.v[layer_idx].permute(0, 2, 1, 3)[b_idx, p] = v.permute(0, 2, 1, 3)[b_idx, t_idx].to(self.v.dtype)
        if layer_idx == 0:
            self.pos[b_idx, p] = p
            self.length = max(self.length, hi + 1)
        S = self.length
        return self.k[layer_idx, :, :, :S], self.v[layer_idx, :, :, :S], self.pos[:, :S]

    def reorder(self, rows: Tensor) -> None:
        """Row i now holds what row rows[i] held (beam search: each beam continues its parent)."""
        self.k, self.v, self.pos = self.k[:, rows], self.v[:, rows], self.pos[rows]

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.length = 0
