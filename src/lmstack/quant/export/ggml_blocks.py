"""GGML's tensor encodings that a GGUF export writes: F32, F16, Q8_0 and Q4_0, as raw bytes.

A GGML row of n floats is stored as n/32 blocks of 32 consecutive values (blocks never cross
a row, so a Q tensor's row length must be a multiple of 32):

    Q8_0  34 bytes = d (float16) + 32 x int8 q          x = d * q
          d = absmax / 127, q = roundf(x / d)            (roundf: half away from zero)
    Q4_0  18 bytes = d (float16) + 16 bytes of nibbles  x = d * (q - 8)
          d = m / -8 where m is the value of largest |x| (its sign kept, so m maps to q = 0),
          q = min(15, trunc(x / d + 8.5)); byte j holds q[j] (low nibble) and q[j + 16] (high)

These are the reference (non-SIMD) quantizers of ggml-quants.c, step for step in float32:
`1/d` is computed from the float32 d and only then is d rounded to float16, a block of zeros
gets d = 0 and q = 0 (Q4_0: q = 8). tests/quant/test_export_gguf.py checks the bytes against
the `gguf` package's `gguf.quants.quantize`.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32                                   # values per Q8_0 / Q4_0 block
# ggml_type ids (ggml.h) and bytes per block of BLOCK values
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
QUANTIZED = ("q8_0", "q4_0")
_BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}


def _roundf(x: Tensor) -> Tensor:
    """C's roundf (ties away from zero), written as gguf does it: |x| split into floor and
    fraction, the fraction doubled and floored (1 for >= 0.5), the sign put back."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _f16_bytes(d: Tensor) -> Tensor:
    """(n, 1) float32 -> (n, 2) uint8: the float16 scale, little-endian."""
    return d.to(torch.float16).view(torch.uint8)


def quantize_q8_0(w: Tensor) -> Tensor:
    """w (rows, cols) float32, cols % 32 == 0 -> (rows, cols / 32 * 34) uint8 Q8_0 blocks."""
    rows, cols = w.shape
    blocks = w.reshape(-1, BLOCK)                                     # (n_blocks, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127                  # (n_blocks, 1) float32
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(blocks * inv).to(torch.int8).view(torch.uint8)       # (n_blocks, 32)
    return torch.cat([_f16_bytes(d), q], dim=1).reshape(rows, -1)


def quantize_q4_0(w: Tensor) -> Tensor:
    """w (rows, cols) float32, cols % 32 == 0 -> (rows, cols / 32 * 18) uint8 Q4_0 blocks."""
    rows, cols = w.shape
    blocks = w.reshape(-1, BLOCK)                                     # (n_blocks, 32)
    m = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))   # signed value of max |x|
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)  # (n_blocks, 32)
    packed = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << 4)             # (n_blocks, 16)
    return torch.cat([_f16_bytes(d), packed], dim=1).reshape(rows, -1)


def encode(w: Tensor, kind: str) -> bytes:
    """A float tensor -> the bytes GGML stores for it as `kind` (f32, f16, q8_0, q4_0).
    Q kinds take a 2-D tensor whose rows are a multiple of 32 long (`fits` says so)."""
    w = w.detach().to(torch.float32).contiguous().cpu()
    if kind == "f32":
        out = w
    elif kind == "f16":
        out = w.to(torch.float16)
    elif kind == "q8_0":
        out = quantize_q8_0(w)
    elif kind == "q4_0":
        out = quantize_q4_0(w)
    else:
        raise ValueError(f"unknown GGML kind {kind!r}; valid: {list(GGML_TYPES)}")
    return out.contiguous().view(torch.uint8).numpy().tobytes()


def fits(shape: tuple[int, ...], kind: str) -> bool:
    """Whether a tensor of `shape` can be stored as `kind` (Q kinds: 2-D, rows of 32k values)."""
    return kind not in QUANTIZED or (len(shape) == 2 and shape[1] % BLOCK == 0)


def nbytes(shape: tuple[int, ...], kind: str) -> int:
    """Bytes a tensor of `shape` takes as `kind` (the size a GGUF tensor info promises)."""
    n = 1
    for s in shape:
        n *= s
    if kind in QUANTIZED:
        return n // BLOCK * _BLOCK_BYTES[kind]
    return n * (4 if kind == "f32" else 2)
