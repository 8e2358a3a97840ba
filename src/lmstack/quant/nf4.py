"""NF4 with double quantization (QLoRA, Dettmers et al. 2023), bit-compatible with bitsandbytes.

    packed, absmax_q, absmax_scale, offset = quantize_nf4(w)          # w (out, in), in % 64 == 0

equals bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=True) on CPU byte for byte (bitsandbytes 0.50; tests/quant checks it):

1. Blocks of 64 consecutive weights (row-major, so blocks stay inside a row when 64 | in).
   absmax = max |w| of the block; x = clamp(w * (1 / absmax), -1, 1) (a reciprocal, then a
   multiply, exactly as bitsandbytes does); the index is the NF4 value nearest to x, ties
   to the lower one (x is compared with the midpoints of neighbouring table values).
2. Double quantization of the float32 absmax: offset = mean(absmax); the centred values
   absmax - offset are quantized to 8 bits with the signed dynamic map (DYNAMIC_MAP) in
   blocks of 256, each block with its own float32 absmax ("absmax_scale").
   bitsandbytes' CPU kernel does this through a 65536-bin lookup table rather than an exact
   nearest search: bin i covers the value -1 + 2i/65535, maps to the number of table
   midpoints below that value, and a value v falls into bin trunc((v + 1) * 0.5 * 65535 + 0.5).
   Near zero, where the table is finer than the bins, this is not the nearest code; we
   reproduce it so the bytes match.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lmstack.model.quant_formats import ABSMAX_BLOCK, DYNAMIC_MAP, NF4_CODE, pack_int4
from lmstack.model.quantized import QuantError

LUT_BINS = 65536


def _midpoints(code: Tensor) -> Tensor:
    return 0.5 * (code[:-1] + code[1:])                                   # float32, as bitsandbytes


def _dynamic_lut() -> Tensor:
    """(65536,) long: the code index of each bin of [-1, 1] (see the module docstring)."""
    i = torch.arange(LUT_BINS, dtype=torch.float32)
    centre = torch.tensor(-1.0) + (2.0 * i) / torch.tensor(float(LUT_BINS - 1))
    return torch.searchsorted(_midpoints(DYNAMIC_MAP), centre, right=False)  # count of midpoints < centre


_LUT = _dynamic_lut()


def quantize_blockwise_dynamic(x: Tensor, blocksize: int = ABSMAX_BLOCK) -> tuple[Tensor, Tensor]:
    """x (n,) float -> codes (n,) uint8 into DYNAMIC_MAP, absmax (ceil(n / blocksize),) float32."""
    x = x.detach().float().reshape(-1)
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = x                                         # zero padding never changes a block's absmax
    blocks = padded.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)                      # (n_blocks,)
    inv = 1.0 / absmax
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    bins = (((v + 1.0) * 0.5) * float(LUT_BINS - 1) + 0.5).long()   # truncation of a non-negative value
    codes = _LUT.to(x.device)[bins]
    codes = torch.where(absmax[:, None] > 0, codes, torch.zeros_like(codes))  # an all-zero block: code 0
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def quantize_nf4(w: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """w (out, in) -> packed (out, in/2) uint8, absmax codes (n_blocks,) uint8,
    absmax_scale (ceil(n_blocks/256),) float32, offset () float32. See the module docstring."""
    out_f, in_f = w.shape
    if in_f % blocksize:
        raise QuantError(f"NF4 blocks of {blocksize} must divide in_features={in_f}")
    blocks = w.detach().float().reshape(-1, blocksize)                   # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)                                    # (n_blocks,) float32
    x = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0)
    mids = _midpoints(NF4_CODE.to(w.device))
    idx = torch.bucketize(x, mids)                                       # nearest NF4 value, ties down
    packed = pack_int4(idx.view(out_f, in_f))
    offset = absmax.mean()
    absmax_codes, absmax_scale = quantize_blockwise_dynamic(absmax - offset, ABSMAX_BLOCK)
    return packed, absmax_codes, absmax_scale, offset
