"""QLoRA (Dettmers et al. 2023): adapters trained over a frozen quantized base.

    quantize_model(model, QuantConfig(method="nf4"))        # lmstack.quant: NF4 base, frozen
    add_lora(model, LoraConfig(r=16, targets="all-linear"))  # LoRALinear wraps each NF4Linear
    ... train the adapters (fp32 or the model's dtype) ...
    save_adapter(model, "adapter")       # loads on the float base as well (same fingerprint)
    merge_lora(model)                    # requantize(dequantize() + B @ A * scale), drift reported

Nothing here is needed to train: LoRALinear computes base(x) + adapter(x) over any base with
`dequantize()` (model/lora.py). What QLoRA adds is merging: a quantized weight cannot absorb
a float update, so the merged weight is quantized again in the base's own format: NF4 with
the same block size, or the same integer grid (bits, groups, symmetry, AWQ's per-channel
scale). GPTQ-made grids are requantized round-to-nearest: GPTQ needs calibration data a
merge does not have, and the format (what loading rebuilds) is the same either way.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from lmstack.model.quantized import IntLinear, NF4Linear
from lmstack.quant.awq import awq_quantize
from lmstack.quant.nf4 import quantize_nf4
from lmstack.quant.rtn import rtn_quantize


def default_requantizer(base: nn.Module) -> Callable[[nn.Module, Tensor], nn.Module] | None:
    """How merge_lora requantizes `base` when not told: lmstack's own formats here, else the
    base's own `requantize(weight)` method; None if neither exists."""
    if isinstance(base, (NF4Linear, IntLinear)):
        return requantize_like
    if callable(getattr(base, "requantize", None)):
        return lambda b, w: b.requantize(w)
    return None


def requantize_like(base: nn.Module, weight: Tensor) -> nn.Module:
    """A new NF4Linear / IntLinear in `base`'s format (same block size, or the same bits,
    groups, symmetry and AWQ scale) holding `weight` (out, in), with `base`'s bias."""
    if isinstance(base, NF4Linear):
        new = NF4Linear(*base.base_linear_shape, base.blocksize, base.bias, device=weight.device)
        new.set_state(*quantize_nf4(weight, base.blocksize))
        return new
    if isinstance(base, IntLinear):
        group = None if base.group_size == base.in_features else base.group_size
        dtype = base.weight_scale.dtype
        new = IntLinear(*base.base_linear_shape, base.bits, group, base.symmetric, base.awq, base.bias, dtype,
                        weight.device)
        if base.awq:   # keep AWQ's per-input-channel scale: W diag(s) is what the grid holds
            codes, scale, zero = awq_quantize(weight, base.awq_scale, base.bits, group, base.symmetric, dtype)
            new.set_codes(codes, scale, zero, awq_scale=base.awq_scale.clone())
        else:
            codes, scale, zero = rtn_quantize(weight, base.bits, group, base.symmetric, dtype)
            new.set_codes(codes, scale, zero)
        return new
    raise TypeError(f"requantize_like knows NF4Linear and IntLinear, not {type(base).__name__}")

