"""Attention: the one self-attention code path for training, contiguous-cache and paged-cache
inference, and the cross-attention an encoder-decoder's decoder adds.

    q, k, v projections -> QK-norm -> RoPE by explicit positions -> cache.update (if a cache)
    -> mask from query positions vs key positions -> SDPA (or the explicit math path)

Who may attend to whom is decided from positions alone (see cache.py): key slot s is
visible to query t iff k_pos >= 0 and, per `mask`,
    causal         k_pos <= q_pos
    bidirectional  always
    prefix         k_pos <= q_pos  or  k_pos < prefix_len of the row
and with a sliding window W also |q_pos - k_pos| < W; with segment ids (several documents
packed in one row, training only) also seg_q == seg_k. Padding queries (q_pos = -1) see every
slot so no softmax row is empty (their outputs are discarded). ALiBi adds
-slope_h * |q_pos - k_pos| to the scores; T5's relative bias adds a learned
table[h, bucket(k_pos - q_pos)] (positions.py).

Cross-attention (CrossAttention): queries from the decoder, keys and values from the
encoder's output, projected once per request (`EncoderMemory`: the encoder-decoder fills its
per-layer K/V when it encodes, and generation reuses them every step). Every encoder slot
whose position is >= 0 is visible to every decoder query (the encoder's padding mask); there
is no position bias across the two sequences.

A cache may also offer `attend(layer_idx, q, k, v, positions, scale, window, cos, sin)` (cache.py):
with a plain causal mask, attention then asks it for the output directly (the engine's paged
cache runs its fused decode kernel there) and falls back to update() + SDPA when it returns None.

Training with no cache and a plain causal mask takes the `is_causal=True` fast path of
`F.scaled_dot_product_attention` (no mask tensor at all). `attention_math` is the explicit
softmax(QK^T/sqrt(d) + mask)V used by `Transformer.introspect`; tests check it equals SDPA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.config import ModelConfig
from lmstack.model.layers import RMSNorm
from lmstack.model.positions import alibi_slopes, apply_rope


@dataclass
class EncoderMemory:
    """What the decoder's cross-attention reads: the encoder's output, projected once.

    positions (B, S) long: the encoder's token positions, -1 = padding (never attended)
    kv: per decoder layer, (k, v) each (B, n_kv_head, S, head_dim)
    hidden (B, S, C): the encoder's final hidden states (what kv was projected from)."""
    positions: Tensor
    kv: list[tuple[Tensor, Tensor]]
    hidden: Tensor

    def repeat_interleave(self, n: int) -> "EncoderMemory":
        """Each row repeated n times in place (row b -> rows b*n .. b*n+n-1): one copy per beam."""
        return EncoderMemory(self.positions.repeat_interleave(n, 0),
                             [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv],
                             self.hidden.repeat_interleave(n, 0))


@dataclass
class AttnContext:
    """Everything the attention layers of one forward share (built once by the Transformer)."""
    positions: Tensor                       # (B, T) long, -1 = padding
    cache: object | None = None             # KV-cache protocol object, or None
    cos: Tensor | None = None               # RoPE tables (B, 1, T, rot), or None
    sin: Tensor | None = None
    causal_fast: bool = False               # SDPA is_causal=True is exactly right
    no_mask: bool = False                   # every key visible to every query (bidirectional, no cache)
    mask_kind: str = "causal"
    window: int | None = None
    prefix_lens: Tensor | None = None       # (B,) long, mask="prefix"
    slopes: Tensor | None = None            # (H,) ALiBi slopes, or None
    rel_bias: nn.Module | None = None       # RelativePositionBias: (q_pos, k_pos) -> (B, H, T, S)
    segments: Tensor | None = None          # (B, T) long document ids: attend within a document only
    memory: EncoderMemory | None = None     # the encoder's output, for cross-attention
    record: list | None = None              # introspect(): attention probs are appended here
    _mask_key: tuple | None = field(default=None, repr=False)
    _mask: Tensor | None = field(default=None, repr=False)
    _cross_mask: tuple[Tensor | None] | None = field(default=None, repr=False)   # (mask,) once built

    @property
    def plain_causal(self) -> bool:
        """The mask is causal (+ sliding window) from positions alone: no ALiBi, no relative
        bias, no segments, no recorded probabilities; what a cache's fused attend() computes."""
        return (self.mask_kind == "causal" and self.slopes is None and self.rel_bias is None and self.segments is None
                and self.record is None)

    def mask_for(self, k_pos: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The mask for keys at k_pos (B, S): bool (B, 1, T, S), float (B, H, T, S) with ALiBi,
        or None when no mask is needed. Reused across layers while k_pos is the same tensor data."""
        if self.causal_fast or self.no_mask:
            return None
        key = (k_pos.data_ptr(), tuple(k_pos.shape), k_pos.stride(), dtype)
        if key != self._mask_key:
            self._mask = build_mask(self.positions, k_pos, self.mask_kind, self.window, self.prefix_lens,
                                    self.slopes, dtype, self.rel_bias, self.segments)
            self._mask_key = key
        return self._mask

    def cross_mask(self) -> Tensor | None:
        """(B, 1, T, S) bool: encoder slots visible to the decoder's queries (None: all are)."""
        if self._cross_mask is None:
            enc_pos = self.memory.positions
            padded = bool((enc_pos < 0).any())
            self._cross_mask = (build_mask(self.positions, enc_pos, "bidirectional") if padded else None,)
        return self._cross_mask[0]


def build_mask(q_pos: Tensor, k_pos: Tensor, kind: str, window: int | None = None,
               prefix_lens: Tensor | None = None, slopes: Tensor | None = None,
               dtype: torch.dtype = torch.float32, rel_bias: nn.Module | None = None,
               segments: Tensor | None = None) -> Tensor:
    """Visibility of keys at k_pos (B, S) to queries at q_pos (B, T); with `segments` (B, T)
    document ids (queries and keys are the same T tokens, no cache) only within a document.

    Returns bool (B, 1, T, S) (True = may attend), or, when ALiBi slopes (H,) or a relative
    bias (a module (q_pos, k_pos) -> (B, H, T, S)) are given, an additive float mask
    (B, H, T, S) with -inf where not visible."""
    qp = q_pos[:, :, None]      # (B, T, 1)
    kp = k_pos[:, None, :]      # (B, 1, S)
    visible = kp >= 0
    if kind == "causal":
        visible = visible & (kp <= qp)
    elif kind == "prefix":
        if prefix_lens is None:
            visible = visible & (kp <= qp)
        else:
            visible = visible & ((kp <= qp) | (kp < prefix_lens.to(kp.device)[:, None, None]))
    if window is not None:
        visible = visible & ((qp - kp).abs() < window)
    if segments is not None:
        if segments.shape != q_pos.shape or k_pos.shape != q_pos.shape:
            raise ValueError(f"segment ids {tuple(segments.shape)} need queries {tuple(q_pos.shape)} and keys "
                             f"{tuple(k_pos.shape)} of the same tokens (a forward without a KV cache)")
        visible = visible & (segments[:, :, None] == segments[:, None, :])
    visible = (visible | (qp < 0)).unsqueeze(1)  # padding queries see every slot
    if rel_bias is not None:
        return rel_bias(q_pos, k_pos).float().masked_fill(~visible, float("-inf")).to(dtype)
    if slopes is None:
        return visible
    dist = (qp - kp).abs().unsqueeze(1).to(torch.float32)               # (B, 1, T, S)
    bias = -slopes.to(dist.device)[None, :, None, None] * dist          # (B, H, T, S)
    return bias.masked_fill(~visible, float("-inf")).to(dtype)


def attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False,
                   dropout_p: float = 0.0, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v, written out. q (B, H, T, D), k/v (B, KV, S, D).

    Returns (out (B, H, T, D), probs (B, H, T, S)). Same semantics as SDPA's arguments."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # GQA: each kv head serves n_rep consecutive query heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float() * scale                  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v, probs


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention (n_kv_head key/value heads)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout, self.scale = cfg.dropout, cfg.attn_scale     # scale None = 1/sqrt(head_dim)
        # q, k and v in one matmul: rows [q (H*D) | k (KV*D) | v (KV*D)]
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, ctx: AttnContext, keep: Tensor | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). With `keep` (N,) flat indices b * T + t (plain causal
        attention only): keys and values of every token still go to the cache, but only the
        queries at those tokens attend and go through the output projection: -> (1, N, C) (the
        last block of a Transformer.forward with prune_last_block). The qkv projection runs
        whole, as a module (its hooks, quantized or wrapped linears see every token)."""
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        if keep is not None:
            if not ctx.plain_causal:
                raise ValueError("attention at kept queries only (keep=) needs plain causal attention: no ALiBi, "
                                 "relative bias, segments or recorded probabilities")
            if 2 * len(keep) > B * T:            # most tokens kept (decode, draft verification): the
                y = self.forward(x, ctx)         # plain path, exactly what it computes, then those rows
                return y.reshape(B * T, -1).index_select(0, keep).unsqueeze(0)
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
        if self.q_norm is not None:   # over head_dim: the same in either layout
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.cache is not None and ctx.plain_causal:
            # a cache with a fused path (the engine's paged cache, rows of a few queries) applies
            # RoPE, writes k, v and returns the attention output itself; None: not here
            attend = getattr(ctx.cache, "attend", None)
            y = attend(self.layer_idx, q, k, v, ctx.positions, self.scale or D ** -0.5, ctx.window, ctx.cos,
                       ctx.sin) if attend is not None else None
            if y is not None:                                                         # y (B, T, H*D)
                return self.proj(y if keep is None else y.reshape(B * T, -1).index_select(0, keep)[None])
        if keep is not None:
            return self._attend_kept(q.reshape(B * T, H, D).index_select(0, keep), k, v, ctx, keep)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # (B, H|KV, T, D)
        if ctx.cos is not None:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        k_pos = ctx.positions
        if ctx.cache is not None:
            k, v, k_pos = ctx.cache.update(self.layer_idx, k, v, ctx.positions)
            if k.shape[0] != B or k.shape[1] != KV or k.shape[3] != D or k_pos.shape != (B, k.shape[2]):
                raise ValueError(f"KV cache returned k of shape {tuple(k.shape)} and k_pos {tuple(k_pos.shape)}; "
                                 f"layer {self.layer_idx} expects (B={B}, n_kv_head={KV}, S, head_dim={D}) and (B, S)")
            if k.dtype != q.dtype:  # e.g. a float32 cache under bf16 autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
        mask = ctx.mask_for(k_pos, q.dtype)
        y = _attend(q, k, v, mask, ctx, self.dropout if self.training else 0.0, self.scale, ctx.causal_fast)
        return self.proj(y)

    def _attend_kept(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, keep: Tensor) -> Tensor:
        """forward's keep path: q (N, H, D) at the kept tokens, k, v (B, T, KV, D) at every
        token, all before RoPE -> (1, N, C). Each row's kept queries go into a (B, Tq) grid
        (Tq: the most any row keeps; the grid's unused slots are padding queries) with the
        causal mask of their positions; the keys and values go to the cache as in forward."""
        B, T, KV, D = k.shape
        H, dev = q.shape[1], keep.device
        k, v = k.transpose(1, 2), v.transpose(1, 2)                                 # (B, KV, T, D)
        if ctx.cos is not None:
            k = apply_rope(k, ctx.cos, ctx.sin)
        k_pos = ctx.positions
        if ctx.cache is not None:
            k, v, k_pos = ctx.cache.update(self.layer_idx, k, v, ctx.positions)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        row, t = keep // T, keep % T
        counts = torch.bincount(row, minlength=B)
        Tq = int(counts.max()) if len(keep) else 0
        order = torch.argsort(row, stable=True)                      # keep in any order, repeats allowed
        by_row = row.index_select(0, order)
        slot = torch.empty_like(keep).index_copy_(0, order, by_row * Tq + torch.arange(len(keep), device=dev)
                                                  - (counts.cumsum(0) - counts).index_select(0, by_row))
        q_pos = torch.full((B * Tq,), -1, dtype=torch.long, device=dev)
        q_pos = q_pos.index_copy_(0, slot, ctx.positions.reshape(-1).index_select(0, keep)).view(B, Tq)
        q = q.new_zeros(B * Tq, H, D).index_copy_(0, slot, q).view(B, Tq, H, D).transpose(1, 2)   # (B, H, Tq, D)
        if ctx.cos is not None:
            t_grid = torch.zeros(B * Tq, dtype=torch.long, device=dev).index_copy_(0, slot, t).view(B, 1, Tq, 1)
            rot = ctx.cos.shape[-1]
            q = apply_rope(q, ctx.cos.gather(2, t_grid.expand(B, 1, Tq, rot)),
                           ctx.sin.gather(2, t_grid.expand(B, 1, Tq, rot)))
        mask = build_mask(q_pos, k_pos, ctx.mask_kind, ctx.window, dtype=q.dtype)
        y = _attend(q, k, v, mask, ctx, self.dropout if self.training else 0.0, self.scale)    # (B, Tq, H*D)
        return self.proj(y.reshape(B * Tq, H * D).index_select(0, slot).unsqueeze(0))


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, ctx: AttnContext, dropout_p: float,
            scale: float | None, is_causal: bool = False) -> Tensor:
    """SDPA (or the recording math path) -> (B, T, H*D)."""
    B, H, T, D = q.shape
    if ctx.record is not None:
        y, probs = attention_math(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale)
        ctx.record.append(probs)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                           scale=scale, enable_gqa=k.shape[1] != H)
    return y.transpose(1, 2).reshape(B, T, H * D)


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder's output (every non-padding encoder slot).

    `q` projects the decoder's stream; `kv` (rows [k | v]) projects the encoder's output and is
    applied once per request by `project_memory`, not at every decoding step."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout, self.scale = cfg.dropout, cfg.attn_scale
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)

    def project_memory(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's output (B, S, C) -> this layer's k, v, each (B, n_kv_head, S, head_dim)."""
        B, S, _ = hidden.shape
        k, v = self.kv(hidden).view(B, S, 2 * self.n_kv_head, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        return k, v

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        if ctx.memory is None:
            raise ValueError("cross-attention needs the encoder's output: call the EncoderDecoder with input_ids "
                             "and decoder_input_ids (or decode() with the EncoderMemory that encode() returns)")
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k, v = ctx.memory.kv[self.layer_idx]                                     # (B, KV, S, D)
        if k.shape[0] != B:
            raise ValueError(f"the encoder's output has {k.shape[0]} rows but the decoder input has {B}; "
                             f"give each decoder row its encoder row (repeat_interleave for beams)")
        if k.dtype != q.dtype:   # memory projected outside autocast
            k, v = k.to(q.dtype), v.to(q.dtype)
        return self.proj(_attend(q, k, v, ctx.cross_mask(), ctx, self.dropout if self.training else 0.0,
                                 self.scale))


def make_slopes(cfg: ModelConfig) -> Tensor | None:
    return alibi_slopes(cfg.n_head) if cfg.pos_emb == "alibi" else None
