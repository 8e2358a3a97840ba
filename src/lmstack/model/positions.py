"""Position information, always from explicit per-token positions (never from the index t).

Positions come in as a (B, T) long tensor so that a KV cache, packed prefill or padded
batch all use the same code; -1 marks a padding token (it is treated as position 0 here and
its output is discarded by the caller).

- sinusoidal_embedding: "Attention Is All You Need" table, PE[p, 2i] = sin(p / 10000^(2i/C)),
  PE[p, 2i+1] = cos(same), added to the token embeddings.
- RotaryEmbedding: RoPE (Su et al. 2021) in the "half split" layout used by GPT-NeoX and
  Hugging Face Llama (dims i and i + rot/2 form a pair), so HF q/k weights need no permutation.
  Supports partial rotary (only the first `rotary_dim` dims of a head rotate), linear
  position interpolation and Llama-3.1 frequency scaling.
- alibi_slopes: ALiBi (Press et al. 2022) per-head slopes; the bias itself,
  slope * (k_pos - q_pos), is built with the mask in attention.py.
- RelativePositionBias: T5's (Raffel et al. 2020) learned scalar per head and bucket of the
  relative position k_pos - q_pos, added to the attention scores. One table per stack,
  read by every layer of that stack.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmstack.model.config import ModelConfig


def sinusoidal_embedding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """(B, T) positions -> (B, T, dim) float32 sinusoidal embeddings (sin/cos interleaved)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.clamp(min=0).float()[..., None] * inv_freq  # (B, T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (B, T, dim): sin, cos, sin, cos...


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """(rotary_dim/2,) float32 angular frequencies theta^(-2i/rotary_dim), after any scaling."""
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["type"] == "linear":  # position interpolation: position p behaves like p / factor
        return inv_freq / s["factor"]
    # llama3 (Llama 3.1): long wavelengths are slowed by `factor`, short ones kept, and the
    # band between is interpolated smoothly in 1/wavelength.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_context_length"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables for RoPE, looked up by position.

    Not an nn.Module on purpose: the tables are derived from the config (nothing to save) and
    must stay float32 even when the model is cast to bf16, so they live outside the module
    tree and are rebuilt on the device they are needed on.
    """

    def __init__(self, cfg: ModelConfig):
        self.rotary_dim = cfg.rotary_dim
        self.inv_freq = rope_inv_freq(cfg)
        # grown on demand (eager) beyond 8192: HF configs often declare 128k positions that a
        # test never uses; under torch.compile the table is not grown, so it covers the context
        self.length = min(cfg.context_length, 8192)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, device: torch.device, need: int) -> tuple[Tensor, Tensor]:
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < need:
            self.length = max(self.length * 2 if need > self.length else self.length, need)
            t = torch.arange(self.length, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))      # (L, rot/2)
            emb = torch.cat((freqs, freqs), dim=-1)                # (L, rot): half-split layout
            cached = self._tables[device] = (emb.cos(), emb.sin())
        return cached

    def tables(self, device: torch.device, length: int) -> tuple[Tensor, Tensor]:
        """The whole cos, sin tables (L >= length, rotary_dim) float32, row p for position p
        (a compiled decode step indexes them itself: infer/fused_decode.py)."""
        return self._table(device, length)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, rotary_dim) (broadcast over heads)."""
        cos, sin = self._table(positions.device, 0)
        p = positions.clamp(min=0)
        if not torch.compiler.is_compiling() and p.numel() and int(p.max()) >= cos.shape[0]:
            cos, sin = self._table(positions.device, int(p.max()) + 1)
        return cos[p].unsqueeze(1).to(dtype), sin[p].unsqueeze(1).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by the angles in cos/sin (B, 1, T, rot); dims >= rot pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    # pairs (i, i + rot/2): (x1, x2) -> (-x2, x1), the 90-degree rotation in each pair's plane
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def alibi_slopes(n_head: int) -> Tensor:
    """(n_head,) ALiBi slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of
    two; otherwise the slopes of the nearest lower power of two followed by every other slope
    of the next power of two (the paper's recipe)."""
    def geometric(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(p)
    if p < n_head:
        slopes += geometric(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes, dtype=torch.float32)


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position rel = k_pos - q_pos (any shape, long -> long).

    Bidirectional: half the buckets for keys after the query (rel > 0), half for keys at or
    before it. Unidirectional (causal): keys after the query all share bucket 0, the rest are
    bucketed by how far back they lie. Within a direction, the first half of the n buckets are
    the exact distances 0 .. n/2 - 1; the other half cover distances n/2 .. max_distance on a
    log scale, and every distance beyond max_distance falls in the last bucket."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)                   # how far back; future keys -> 0
    exact = num_buckets // 2
    # clamp before the log: dist 0 would give -inf (it takes the exact branch anyway)
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    """(num_buckets, n_head) learned table -> attention bias (B, n_head, T, S) from positions.

    The bias depends on positions only, so it is computed once per forward from the query and
    key positions (a KV cache's k_pos included) and shared by every layer of the stack."""

    def __init__(self, n_head: int, num_buckets: int, max_distance: int, bidirectional: bool,
                 init_std: float = 0.02):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.randn(num_buckets, n_head) * init_std)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_pos (B, T), k_pos (B, S) long -> (B, H, T, S) in the table's dtype."""
        rel = k_pos[:, None, :] - q_pos[:, :, None]                            # (B, T, S)
        bucket = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.weight[bucket].permute(0, 3, 1, 2)                         # (B, T, S, H) -> (B, H, T, S)

    def extra_repr(self) -> str:
        return (f"buckets={self.num_buckets}, heads={self.weight.shape[1]}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")
