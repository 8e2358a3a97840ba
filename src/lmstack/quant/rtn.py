"""Round-to-nearest onto a uniform integer grid: the scales, zero points and codes that RTN,
GPTQ's column loop and AWQ's search all share.

A weight (out, in) is cut into groups of g consecutive inputs per row (g = in: one group per
output channel). Each group gets a step `scale` and, on an asymmetric grid, a zero point:

    symmetric   scale = absmax / (2^(b-1) - 1),  codes in [1, 2^b - 1] around 2^(b-1)
    asymmetric  scale = (max - min) / (2^b - 1), zero = round(-min / scale), codes in [0, 2^b - 1]
                (min <= 0 <= max, so 0.0 is always on the grid, as in GPTQ's quantizer)
    code = clamp(round(w / scale) + zero),   w_hat = (code - zero) * scale

The scale is rounded to the dtype it is stored in *before* the codes are computed, so the
codes are the nearest points of the grid the module will actually use.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lmstack.model.quant_formats import code_range


def grid_params(w: Tensor, bits: int, group_size: int | None, symmetric: bool,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
    """w (out, in) -> scale (out, G) float32 holding `dtype` values, zero (out, G) float32
    integers or None (symmetric). G = in / group_size."""
    out_f, in_f = w.shape
    g = group_size or in_f
    wg = w.detach().float().reshape(out_f, in_f // g, g)
    if symmetric:
        scale = wg.abs().amax(-1) / (2 ** (bits - 1) - 1)
        lo = None
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / (2 ** bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # an all-zero group: any step is exact
    scale = scale.to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(dtype).tiny))  # underflow in dtype
    if symmetric:
        return scale, None
    zero = torch.round(-lo / scale).clamp(0, 2 ** bits - 1)
    return scale, zero


def zero_point(zero: Tensor | None, bits: int) -> Tensor | float:
    return float(2 ** (bits - 1)) if zero is None else zero


def to_codes(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """Nearest grid codes of w; scale/zero broadcast against w. Returns float integers."""
    lo, hi = code_range(bits, zero is None)
    return (torch.round(w / scale) + zero_point(zero, bits)).clamp(lo, hi)


def from_codes(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    return (codes - zero_point(zero, bits)) * scale


def _per_column(t: Tensor, g: int) -> Tensor:
    """(out, G) group statistic -> (out, G * g), one value per input column."""
    return t.repeat_interleave(g, dim=1)


def rtn_quantize(w: Tensor, bits: int, group_size: int | None, symmetric: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor | None]:
    """w (out, in) -> codes (out, in) long, scale (out, G), zero (out, G) long or None."""
    g = group_size or w.shape[1]
    scale, zero = grid_params(w, bits, g, symmetric, dtype)
    z = None if zero is None else _per_column(zero, g)
    codes = to_codes(w.detach().float(), _per_column(scale, g), z, bits)
    return codes.long(), scale, None if zero is None else zero.long()


def fake_quantize(w: Tensor, bits: int, group_size: int | None, symmetric: bool,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """RTN then dequantize: the float32 weight an RTN module would compute with."""
    g = group_size or w.shape[1]
    codes, scale, zero = rtn_quantize(w, bits, g, symmetric, dtype)
    z = None if zero is None else _per_column(zero, g).float()
    return from_codes(codes.float(), _per_column(scale, g), z, bits)
