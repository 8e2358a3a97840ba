"""Floor 0: optional compiled CPU kernels, with the pure-PyTorch path as the fallback.

    from lmstack import kernels
    if kernels.available():                   # built for these sources and this torch
        y = kernels.quant_linear(x, weight, scale, zero, codebook, bits, group_size, bias)
        w = kernels.quant_dequantize(weight, scale, zero, codebook, bits, group_size)   # (N, K) float32
        out = kernels.paged_attention(q, k_cache, v_cache, block_tables, q_pos, block_size, scale, window)
        out = kernels.paged_attention_step(q, k, v, k_cache, v_cache, block_tables, q_pos, cos, sin, ...)
    with kernels.disabled():                  # force the PyTorch path (benchmarks, tests)
        ...

  quant_linear.cpp  torch.ops.lmstack.quant_linear, the weight-only quantized linear: at
                    decode and small batches it reads INT8 / packed INT4 / NF4 codes and
                    decodes them in registers (float32 accumulation); for prefill it hands
                    cached blocks of the dequantized weight to MKL's GEMM
  quant_dequantize.cpp  those blocks, and torch.ops.lmstack.quant_dequantize: the float32
                    weight in one pass (quant_codes.h: the formats and decoders both share)
  quant_linear_a8.cpp  torch.ops.lmstack.quant_linear_a8, INT8 weights x int8 activations
                    (W8A8, act_bits=8): x rounded in blocks of 32, VNNI integer dot products
  paged_attention.cpp  torch.ops.lmstack.paged_attention, attention of a few queries per row
                    (decode, draft verification) reading K/V in place through block tables,
                    online softmax, GQA, sliding window; paged_attention_step: RoPE on the
                    new q, k + the K/V write + that attention in one op (infer/paged_cache.py)
  decode_step.cpp   torch.ops.lmstack.decode_step, a Llama-family decoder's whole decode step
                    (ids -> logits) in one op: its GEMVs on dense_linear, attention on
                    paged_attention_step (infer/fused_decode.py)
  dense_linear.cpp  torch.ops.lmstack.dense_linear, the float32 linear for a few rows (decode
                    GEMVs), faster than MKL's on our AMD CPUs (infer/fast_linear.py uses it)
  build.py          `python -m lmstack.kernels.build`, run by `make install`: compiles into
                    _build/ and records the source hash and torch version it was built for

The library is never compiled at import time. When it is missing, stale (sources edited
since the build) or built for another torch, the first quantized forward that would use it
emits ONE RuntimeWarning saying why and how to build, and every layer takes the PyTorch path
(dequantize, then F.linear; gather the context, then SDPA). LMSTACK_KERNELS=0 in the environment turns the kernels off
without a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings

import torch
from torch import Tensor

from lmstack.utils.errors import LmstackError


class KernelsUnavailable(LmstackError):
    """A kernel was called on a machine where the library is missing, stale or turned off."""


_lock = threading.Lock()
_loaded: bool | None = None     # None: not tried yet
_why_not: str | None = None     # the reason the library is unavailable
_disabled = 0                   # depth of active disabled() blocks
_fakes = False                  # shape functions registered with torch.library (once a process)


def _load() -> str | None:
    """Load the built library; returns None on success, else the reason it cannot be used."""
    from lmstack.kernels import build

    if not build.INFO.exists():
        return "they are not built"
    info = json.loads(build.INFO.read_text())
    if info.get("sources_sha256") != build.sources_hash():
        return "the build is older than the sources"
    if info.get("torch") != torch.__version__:
        return f"they were built for torch {info.get('torch')}, this is torch {torch.__version__}"
    if not _registered():   # else build() in this process loaded it already
        torch.ops.load_library(str(build.library_path()))
    _register_fakes()
    return None


def _register_fakes() -> None:
    """Output shapes without data (meta / fake tensors), so torch.compile can put the ops in a graph."""
    global _fakes
    if _fakes:
        return
    _fakes = True

    @torch.library.register_fake("lmstack::quant_linear")
    def _(x, weight, scale, zero, codebook, bits, group_size, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("lmstack::quant_linear_a8")
    def _(x, weight, scale, zero, group_size, act_block, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("lmstack::quant_dequantize")
    def _(weight, scale, zero, codebook, bits, group_size):
        return scale.new_empty(weight.shape[0], weight.shape[1] * (2 if bits == 4 else 1))

    @torch.library.register_fake("lmstack::paged_attention")
    def _(q, k_cache, v_cache, block_tables, q_pos, block_size, scale, window):
        B, H, T, D = q.shape
        return q.new_empty(B, T, H, D)

    @torch.library.register_fake("lmstack::dense_linear")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("lmstack::paged_attention_step")
    def _(q, k, v, k_cache, v_cache, block_tables, q_pos, cos, sin, block_size, scale, window):
        return q.new_empty(q.shape)

    @torch.library.register_fake("lmstack::decode_step")
    def _(ids, q_pos, block_tables, k_cache, v_cache, rope_cos, rope_sin, wte, weights, biases, norm_f, lm_head, quant,
          quant_meta, n_head, n_kv_head, eps, block_size, scale, window, gemv_rows):
        return wte.new_empty(ids.shape[0], lm_head.shape[0])


def _registered() -> bool:
    try:
        torch.ops.lmstack.quant_linear
        torch.ops.lmstack.paged_attention_step
        torch.ops.lmstack.dense_linear
        torch.ops.lmstack.quant_linear_a8
        torch.ops.lmstack.decode_step
    except (AttributeError, RuntimeError):
        return False
    return True


@torch.compiler.assume_constant_result   # torch.compile: decided once, outside the graph
def available() -> bool:
    """True when the compiled kernels can be used (and are not turned off by disabled())."""
    global _loaded, _why_not
    if _loaded is None:
        with _lock:
            if _loaded is None:
                if os.environ.get("LMSTACK_KERNELS", "1") == "0":
                    _why_not = "LMSTACK_KERNELS=0"
                else:
                    try:
                        _why_not = _load()
                    except Exception as e:   # a corrupt record or library: fall back, say why
                        _why_not = f"loading them failed ({type(e).__name__}: {e})"
                    if _why_not is not None:
                        warnings.warn(f"lmstack: the compiled CPU kernels are unavailable ({_why_not}); "
                                      f"quantized layers, paged attention and decode linears use the slower "
                                      f"PyTorch path. Build them with `make kernels` or "
                                      f"`python -m lmstack.kernels.build`.",
                                      RuntimeWarning, stacklevel=3)
                _loaded = _why_not is None
    return _loaded and not _disabled


def unavailable_reason() -> str | None:
    """Why available() is False (None when it is True or was not asked yet)."""
    if _disabled:
        return "inside kernels.disabled()"
    return _why_not


@contextlib.contextmanager
def disabled():
    """Within the block available() is False: quantized layers and attention take the PyTorch path."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def quant_linear(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor | None, codebook: Tensor | None,
                 bits: int, group_size: int, bias: Tensor | None) -> Tensor:
    """y (M, N) = x (M, K) @ W_hat^T + bias, W_hat decoded from codes on the fly (float32, CPU).
    Few rows (decode): GEMV tiles that read each code once; many rows (prefill): W_hat one cached
    block of output rows at a time, multiplied by MKL's GEMM.

    weight (N, K) uint8 codes (bits 8) or (N, K/2) two 4-bit codes a byte, the even column in
    the high nibble; scale (N, K/group_size) float32; zero (N, K/group_size) uint8 or None for
    a symmetric grid (zero point 2^(bits-1)); codebook (16,) float32 for 4-bit lookup formats
    (NF4: W_hat = codebook[q] * scale), None for integer grids (W_hat = (q - zero) * scale).
    Raises KernelsUnavailable when the library cannot be loaded."""
    if not _loaded:
        _require()
    # the overload itself: the packet's __call__ would resolve it again on every call (decode
    # makes one call per linear and token, so microseconds count)
    return torch.ops.lmstack.quant_linear.default(x, weight, scale, zero, codebook, bits, group_size, bias)


def quant_linear_a8(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, act_block: int,
                    bias: Tensor | None) -> Tensor:
    """y (M, N) = x_hat (M, K) @ W_hat^T + bias for INT8 codes weight (N, K) uint8 (scale, zero as
    quant_linear; zero None: symmetric, 128), x_hat = x rounded to int8 in blocks of act_block
    inputs (absmax / 127 each, model/quant_formats.py's quantize_activations), by integer dot products.
    Raises KernelsUnavailable when the library cannot be loaded."""
    if not _loaded:
        _require()
    return torch.ops.lmstack.quant_linear_a8.default(x, weight, scale, zero, group_size, act_block, bias)


def quant_dequantize(weight: Tensor, scale: Tensor, zero: Tensor | None, codebook: Tensor | None, bits: int,
                     group_size: int) -> Tensor:
    """The (N, K) float32 W_hat of quant_linear's weight format, in one pass (equal bit for bit
    to model/quantized.py's dequantize(): one rounding, of (q - zero) * scale or codebook[q] * scale)."""
    if not _loaded:
        _require()
    return torch.ops.lmstack.quant_dequantize.default(weight, scale, zero, codebook, bits, group_size)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, q_pos: Tensor,
                    block_size: int, scale: float, window: int | None) -> Tensor:
    """Causal attention of queries q (B, H, T, D) float32 (last dim contiguous) at positions q_pos
    (B, T) int64 (-1 = padding: zeros out) over the keys and values of positions 0..q_pos of their
    row, read in place from k_cache / v_cache (slots, KV, D): position p of row b is slot
    block_tables[b, p // block_size] * block_size + p % block_size. window: keep only
    q_pos - p < window (None: all). Returns (B, T, H, D) float32; H a multiple of KV (GQA).
    Raises KernelsUnavailable when the library cannot be loaded."""
    if not _loaded:
        _require()
    return torch.ops.lmstack.paged_attention.default(q, k_cache, v_cache, block_tables, q_pos, block_size, scale,
                                                     0 if window is None else window)


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y (M, N) = x (M, K) @ weight (N, K)^T + bias, float32, all contiguous; for few rows
    (decode), where it reads each weight once at close to the cache / memory rate.
    Raises KernelsUnavailable when the library cannot be loaded."""
    if not _loaded:
        _require()
    return torch.ops.lmstack.dense_linear.default(x, weight, bias)


def paged_attention_step(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                         q_pos: Tensor, cos: Tensor | None, sin: Tensor | None, block_size: int, scale: float,
                         window: int | None) -> Tensor:
    """One decode step's attention from the QKV projection's output: q (B, T, H, D), k, v
    (B, T, KV, D) float32 (views are fine: last dim contiguous), before RoPE. Rotates q and k by
    cos / sin (B, T, rot) (half-split layout, model/positions.py; None: no RoPE), writes k and v
    into k_cache / v_cache at each token's slot (position q_pos[b, t] through block_tables; -1:
    padding, not written), then returns paged_attention of the rotated q: (B, T, H, D)."""
    if not _loaded:
        _require()
    return torch.ops.lmstack.paged_attention_step.default(q, k, v, k_cache, v_cache, block_tables, q_pos, cos, sin,
                                                          block_size, scale, 0 if window is None else window)


def decode_step(ids: Tensor, q_pos: Tensor, block_tables: Tensor, k_cache: Tensor, v_cache: Tensor,
                rope_cos: Tensor | None, rope_sin: Tensor | None, wte: Tensor, weights: list[Tensor],
                biases: list[Tensor | None], norm_f: Tensor, lm_head: Tensor, n_head: int, n_kv_head: int,
                eps: float, block_size: int, scale: float, window: int | None, gemv_rows: int,
                quant: list[Tensor | None] | None = None, quant_meta: list[int] | None = None) -> Tensor:
    """A pre-norm RMSNorm + SwiGLU decoder's whole decode step (decode_step.cpp): ids (B,) int64,
    one new token a row at q_pos (B, 1) -> logits (B, V) float32, writing each layer's K/V into
    k_cache / v_cache (n_layer, slots, KV, D) through block_tables (B, n_blk). rope_cos / rope_sin:
    the RoPE tables (P > every position, rot), row p for position p, or None; weights: per layer
    [attn_norm, qkv, o, mlp_norm, fc (gate | up), down], biases per layer [qkv, o, fc, down]
    (None: none). Linears of up to gemv_rows rows take dense_linear. Quantized linears (IntLinear's
    codes as the weight): quant holds 3 tensors for each linear, layer by layer [qkv, o, fc, down]
    then the head: (scale, zero or None, awq_scale or None), and quant_meta 3 ints for each: (bits,
    0 = float32; group_size; act_block, 0 = weight-only); they run quant_linear / quant_linear_a8
    with the module's arguments. None / None: every linear float32."""
    if not _loaded:
        _require()
    return torch.ops.lmstack.decode_step.default(ids, q_pos, block_tables, k_cache, v_cache, rope_cos, rope_sin, wte,
                                                 weights, biases, norm_f, lm_head, quant or [], quant_meta or [],
                                                 n_head, n_kv_head, eps, block_size,
                                                 scale, 0 if window is None else window, gemv_rows)


def _require() -> None:
    if not available() and not _loaded:
        raise KernelsUnavailable(f"the compiled kernels are unavailable: {unavailable_reason()}")


__all__ = ["KernelsUnavailable", "available", "unavailable_reason", "disabled", "quant_linear", "quant_linear_a8",
           "quant_dequantize",
           "paged_attention", "paged_attention_step", "dense_linear", "decode_step"]
