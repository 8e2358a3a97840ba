"""What an exporter reads from a model: its float weights under our names, after checking
that every transform it carries is one the export can write.

A quantized run (the "quant" transform) computes with `QuantLinear.dequantize()`; exporting
it to another format starts from exactly those float weights. Adapters (LoRA) are not
folded in silently: a merge is a decision of its own (lmstack.finetune.merge_lora).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.model.quantized import QuantLinear
from lmstack.model.transforms import get_transforms
from lmstack.utils import LmstackError


def check_transforms(model: nn.Module, allowed: tuple[str, ...], what: str) -> list[dict]:
    """The model's transform records; raises if one is not in `allowed` (naming it and the fix)."""
    from lmstack.quant.qat import qat_modules
    fake = qat_modules(model)
    if fake:   # its weights are the latent float ones, not the grid the model was trained to compute on
        raise LmstackError(f"{what} cannot write a model with fake-quantized (QAT) linears ({fake[0][0]}, ...); round "
                           f"them first with lmstack.quant.convert_qat(model), or load the saved float run")
    records = get_transforms(model)
    bad = [r["kind"] for r in records if r.get("kind") not in allowed]
    if bad:
        raise LmstackError(f"{what} cannot write a model that carries the transform(s) {bad}; merge LoRA adapters "
                           f"into the weights first (lmstack.finetune.merge_lora) and save the merged run")
    return records


def quant_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """name -> quantized linear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def float_state(model: nn.Module) -> dict[str, Tensor]:
    """Our stored names -> float32 CPU tensors: a quantized linear's `weight` is the float
    weight it computes with (its statistics are dropped), everything else as held."""
    sd = model.state_dict()
    out = {}
    quant = quant_modules(model)
    for name, m in quant.items():
        for key in list(sd):
            if key.startswith(name + ".") and key != name + ".bias":
                del sd[key]
        out[name + ".weight"] = m.dequantize(torch.float32).cpu()
    for key, t in sd.items():
        if t.is_floating_point():
            out[key] = t.detach().to(torch.float32).cpu()
    return out
