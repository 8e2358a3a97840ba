"""The number formats of the quantized linears (model/quantized.py): the method and bit-width
choices, QLoRA's NF4 table and bitsandbytes' dynamic 8-bit table (bit-equal to theirs), 4-bit
packing (two codes a byte, the even index in the high nibble), the code range of a uniform
grid, and W8A8's activation rounding. Plain tensors and functions: the modules, quantizers
(lmstack.quant), exporters and kernels' callers all read the formats from here.
"""
from __future__ import annotations

import torch
from torch import Tensor

METHODS = ("rtn", "nf4", "gptq", "awq")
INT_BITS = (4, 8)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # the block sizes bitsandbytes accepts
ABSMAX_BLOCK = 256                                            # double quantization's block of absmax values
ACT_BITS = (None, 8)                                          # IntLinear's input: float, or int8 (W8A8)
ACT_BLOCKS = (128, 64, 32)                                    # inputs per activation scale (W8A8), preferred first

# QLoRA's NormalFloat4 table: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero,
# the values bitsandbytes ships (create_normal_map(offset=0.9677083)).
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit "dynamic tree" code (Dettmers 2015), 256 sorted float32 values.

    For exponent e = 0..6 the decade 10^(e-6) holds 2^e values, the midpoints of 2^e + 1
    evenly spaced points in [0.1, 1], with both signs; plus 0 and 1. Built with the same
    float32 steps as bitsandbytes' create_dynamic_map so the table is equal bit for bit."""
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist()
        values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _dynamic_map()
NF4_CODE = torch.tensor(NF4_VALUES, dtype=torch.float32)
_ON_DEVICE: dict[tuple[str, torch.device], Tensor] = {}


def codebook(name: str, device: torch.device) -> Tensor:
    """A constant float32 table ("nf4" or "dynamic") on `device`, cached. Tables are not
    buffers: model.to(bfloat16) must never round them."""
    key = (name, torch.device(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = (NF4_CODE if name == "nf4" else DYNAMIC_MAP).to(device)
    return _ON_DEVICE[key]


def pack_int4(codes: Tensor) -> Tensor:
    """(..., n) integer codes in [0, 15], n even -> (..., n/2) uint8, even index in the high nibble."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: (..., n/2) uint8 -> (..., n) uint8 codes."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2)


def act_block(group_size: int) -> int | None:
    """The activation block of W8A8 for a weight group of `group_size` inputs: the largest of
    ACT_BLOCKS that divides it (None: none does)."""
    return next((b for b in ACT_BLOCKS if group_size % b == 0), None)


def quantize_activations(x: Tensor, block: int) -> Tensor:
    """x_hat: x rounded to int8 in blocks of `block` along the last dimension, one absmax scale
    d = max|x| / 127 per block, x_hat = clamp(round(x / d), -127, 127) * d (computed in float32,
    returned in x's dtype). Straight-through in autograd: dL/dx = dL/dx_hat."""
    xf = x.detach().float()
    xb = xf.reshape(*xf.shape[:-1], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))).clamp_(-127, 127)
    x_hat = (q * d).reshape(x.shape).to(x.dtype)
    return x + (x_hat - x).detach() if x.requires_grad else x_hat


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The codes a grid uses: symmetric [1, 2^b - 1] around 2^(b-1), asymmetric [0, 2^b - 1]."""
    return (1 if symmetric else 0), 2 ** bits - 1
