"""The paged KV cache: one big slot pool per layer, addressed through block tables.

Storage per layer is `(num_blocks * block_size, n_kv_head, head_dim)` for keys and for
values: token slot `block * block_size + offset`. A sequence's token at position p lives
in slot `block_table[p // block_size] * block_size + p % block_size`, so its K/V are
scattered over whatever blocks the block manager handed it, and nothing is reserved for
tokens it has not produced yet (that is the point: no max-length preallocation).

The model talks to it through the KV-cache protocol (`lmstack.model.cache`):
`update(layer_idx, k, v, positions) -> (k_all, v_all, k_pos)`. The runner computes, once
per forward, where the new tokens go (`write_rows`, `write_slots`) and which slots each row
reads back (`read_slots`, `read_pos`); `update` then only scatters and gathers, with no
per-sequence Python in the per-layer path.

Fused path (`attend`, the protocol's optional method, see model/cache.py): for rows of a few
queries (decode, draft verification) on CPU in float32, attention asks the cache for its
output directly; one C++ op (kernels/paged_attention.cpp) applies RoPE, writes the new K/V
and reads each row's blocks in place through its block table, with an online softmax. No
(B, S) gather index is built then, and no copy of the context is made. Where the kernel does
not apply, `attend` returns None and the gather + SDPA path above runs; both are tested equal.

INT8 storage (`kv_cache_dtype="int8"`). Keys and values are stored as int8 codes with one
absmax scale per token and head, kept beside the codes in the same slot layout
`(num_blocks * block_size, n_kv_head)`, i.e. each block carries the scales of its tokens
and heads:
    scale[slot, h] = max_d |x[h, d]| / 127   (stored in bfloat16; the codes are computed
                                               against the stored value)
    code[slot, h, d] = clamp(round(x[h, d] / scale), -127, 127),   x_hat = code * scale
Quantize on write (in `update`), dequantize on read into the model's dtype. Error: at most
half a step, |x - x_hat| <= scale / 2 (the absmax element, if the bf16 scale rounded down,
clamps by at most that much too).
Why a scale per token rather than one per block: a block is filled over many steps (prefill
chunks, then one decode token at a time), and a token written later must not change the
tokens already there. With per-token scales a token is quantized once and never touched
again, so its stored K/V depend on that token alone, not on when or with what it was
written: a prefix-cache hit reads exactly what recomputing the prefix would have written,
and a preempted sequence recomputes the same codes. (One scale per block would have to be
re-derived, and the block requantized, whenever a new token raises the block's absmax,
adding up to half a new step of error to every old value at each growth.) The price is 2
bytes of scale per token and head: head_dim 64 stores 66 bytes instead of 128 (bf16, 1.94x
the tokens in the same memory) or 256 (fp32, 3.88x).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lmstack import kernels
from lmstack.utils import LmstackError

# Rows of up to this many queries (decode: 1; draft verification: k + 1) take the fused kernel;
# longer prefill chunks gather their context and call SDPA, whose blocked GEMMs win there.
# Measured (4 rows, 8 heads / 2 kv heads, head_dim 64, context 256, one thread, shared machine):
# kernel time / gather + SDPA time = 0.07 at T=1, 0.8 at T=4, 1.1 at T=8, 2.0 at T=16.
FUSED_MAX_T = 8
KV_CACHE_DTYPES = ("auto", "int8")     # auto: the model's dtype
SCALE_DTYPE = torch.bfloat16           # an int8 token's per-head scale
QMAX = 127


def check_kv_cache_dtype(kv_cache_dtype) -> str:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise LmstackError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; choose 'auto' (the model's dtype) "
                           f"or 'int8' (absmax codes per token and head)")
    return kv_cache_dtype


def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (N, H, D) float -> codes (N, H, D) int8, scale (N, H) SCALE_DTYPE (see the docstring)."""
    scale = (x.detach().float().abs().amax(-1) / QMAX).to(SCALE_DTYPE)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))        # an all-zero row: codes 0 with any step
    codes = torch.round(x.float() / s[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize_kv(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """codes (..., H, D) int8, scale (..., H) -> (..., H, D) in dtype."""
    return codes.to(dtype) * scale.to(dtype)[..., None]


class PagedKVCache:
    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_cache_dtype: str = "auto"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.quantized = check_kv_cache_dtype(kv_cache_dtype) == "int8"
        shape = (n_layer, num_blocks * block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=torch.int8 if self.quantized else dtype, device=device)
        self.v = torch.zeros_like(self.k)
        if self.quantized:   # (n_layer, slots, n_kv_head): one scale per token and head
            self.k_scale = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device)
            self.v_scale = torch.zeros_like(self.k_scale)
        # set by `bind` / `bind_tables` before each forward
        self.write_rows: Tensor | None = None   # (N,) indices into the flattened (B*T) new tokens, None = all
        self.write_slots: Tensor | None = None  # (N,) destination slot of each written token
        self.tables: Tensor | None = None       # (B, n_blk) long block tables (bind_tables), for attend()
        self.context_lens: Tensor | None = None  # (B,) long: positions 0..len-1 of each row hold K/V
        self.read_slots: Tensor | None = None   # (B, S) slot of each key/value a row may see
        self.read_pos: Tensor | None = None     # (B, S) its position; -1 = padding
        self.read_flat: Tensor | None = None    # read_slots flattened to (B*S,)
        self._rope_in: Tensor | None = None     # attend(): the last cos seen, and (cos, sin) squeezed
        self._rope: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                        kv_cache_dtype: str = "auto") -> int:
        """K and V of one token across all layers (int8: codes + one scale per head)."""
        if check_kv_cache_dtype(kv_cache_dtype) == "int8":
            return 2 * n_layer * n_kv_head * (head_dim + torch.empty((), dtype=SCALE_DTYPE).element_size())
        return 2 * n_layer * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()

    def bind(self, write_rows: Tensor | None, write_slots: Tensor, read_slots: Tensor, read_pos: Tensor) -> None:
        """An explicit read index: row b reads slots read_slots[b] (B, S) at positions read_pos[b]."""
        self.write_rows, self.write_slots = write_rows, write_slots
        self.tables = self.context_lens = None
        self.read_slots, self.read_pos = read_slots, read_pos
        self.read_flat = read_slots.reshape(-1)

    def bind_tables(self, write_rows: Tensor | None, write_slots: Tensor, tables: Tensor, context_lens: Tensor) -> None:
        """The runner's binding: block tables (B, n_blk) long and context lengths (B,) long. The
        fused attend() reads through the tables; the (B, S) gather index of update() is built
        from them only when a layer asks for it (the first update() of the forward)."""
        self.write_rows, self.write_slots = write_rows, write_slots
        self.tables, self.context_lens = tables, context_lens
        self.read_slots = self.read_pos = self.read_flat = None

    def _read_index(self) -> None:
        """read_slots / read_pos / read_flat from the bound tables: every row's context 0 .. len-1, padded to S."""
        if self.read_flat is not None:
            return
        bs, ctx, dev = self.block_size, self.context_lens, self.tables.device
        B, S = ctx.shape[0], int(ctx.max())
        s = torch.arange(S, device=dev)
        self.read_pos = torch.where(s[None, :] < ctx[:, None], s[None, :].expand(B, S), -1)        # (B, S)
        rp = self.read_pos.clamp_min(0)
        self.read_slots = self.tables.gather(1, rp // bs) * bs + rp % bs
        self.read_flat = self.read_slots.reshape(-1)

    def _new_rows(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, T, D) -> (N, H, D): the tokens to write, in the runner's flattened order."""
        B, H, T, D = k.shape
        k_new = k.transpose(1, 2).reshape(B * T, H, D)
        v_new = v.transpose(1, 2).reshape(B * T, H, D)
        if self.write_rows is not None:
            k_new, v_new = k_new.index_select(0, self.write_rows), v_new.index_select(0, self.write_rows)
        return k_new, v_new

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float,
               window: int | None, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor | None:
        """The fused path of causal attention (model/attention.py asks it before update()): one
        kernel call rotates q and k by RoPE (cos, sin (B, 1, T, rot); None: no RoPE), writes k and
        v at each token's slot and reads every row's context in place through its block table.
        q (B, T, H, D), k, v (B, T, KV, D): the QKV projection's views, before RoPE; positions
        (B, T). Returns (B, T, H * D), or None, having written nothing, where the kernel does not
        apply (library not built, not float32 on CPU, int8 storage, rows of more than FUSED_MAX_T
        queries, an explicit bind()): the caller then takes RoPE, update() and SDPA."""
        B, T, H, D = q.shape
        if (self.tables is None or self.quantized or T > FUSED_MAX_T or q.dtype != torch.float32
                or self.k.dtype != torch.float32 or q.device.type != "cpu" or not kernels.available()):
            return None
        if cos is not None:   # (B, T, rot): every layer gets the same tables, squeezed once a forward
            if self._rope_in is not cos:
                self._rope_in, self._rope = cos, (cos.squeeze(1), sin.squeeze(1))
            cos, sin = self._rope
        out = kernels.paged_attention_step(q, k, v, self.k[layer_idx], self.v[layer_idx], self.tables, positions,
                                           cos, sin, self.block_size, scale, window)      # (B, T, H, D)
        return out.view(B, T, H * D)

    def update(self, layer_idx: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, H, T, D = k.shape
        self._read_index()
        k_new, v_new = self._new_rows(k, v)       # (N, H, D)
        if self.quantized:
            return self._update_int8(layer_idx, k_new, v_new, k.dtype)
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        k_cache.index_copy_(0, self.write_slots, k_new.to(k_cache.dtype))
        v_cache.index_copy_(0, self.write_slots, v_new.to(v_cache.dtype))
        # gather (B*S, H, D) -> (B, S, H, D) -> view as (B, H, S, D). index_select on a flat
        # index is ~10x faster on CPU than advanced indexing with a (B, S) index tensor.
        Bs, S = self.read_pos.shape
        k_all = k_cache.index_select(0, self.read_flat).view(Bs, S, H, D).transpose(1, 2)
        v_all = v_cache.index_select(0, self.read_flat).view(Bs, S, H, D).transpose(1, 2)
        return k_all, v_all, self.read_pos

    def _update_int8(self, layer_idx: int, k_new: Tensor, v_new: Tensor, dtype: torch.dtype):
        """update() on int8 storage: quantize the (N, H, D) new rows, gather and dequantize."""
        Bs, S = self.read_pos.shape
        out = []
        for codes, scales, new in ((self.k, self.k_scale, k_new), (self.v, self.v_scale, v_new)):
            q, s = quantize_kv(new)
            codes[layer_idx].index_copy_(0, self.write_slots, q)
            scales[layer_idx].index_copy_(0, self.write_slots, s)
            x = dequantize_kv(codes[layer_idx].index_select(0, self.read_flat),
                              scales[layer_idx].index_select(0, self.read_flat), dtype)   # (B*S, H, D)
            out.append(x.view(Bs, S, *x.shape[1:]).transpose(1, 2))
        return out[0], out[1], self.read_pos

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer."""
        if not pairs:
            return
        bs = self.block_size
        offs = torch.arange(bs, device=self.k.device)
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)[:, None] * bs + offs
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)[:, None] * bs + offs
        src, dst = src.flatten(), dst.flatten()
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        if self.quantized:
            self.k_scale[:, dst] = self.k_scale[:, src]
            self.v_scale[:, dst] = self.v_scale[:, src]
