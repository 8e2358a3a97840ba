"""What a finetuning method costs: the base's bits per weight and the peak memory of training.

    base_bits_per_param(model)      # {"stored": 4.13, "resident": 4.63, "params": 1_048_576}
    with PeakMemory(device) as peak:
        trainer.fit()
    peak.bytes                      # the peak above the level at entry

Bits per weight cover the linears QLoRA quantizes (attention and MLP projections of every
block; the embeddings, the LM head and the norms stay float, as with bitsandbytes). "stored" counts
what the state dict holds (codes, scales, double-quantized absmax, as QuantLinear.bits_per_param
does); "resident" adds the runtime caches a quantized module keeps in memory (NF4's decoded
float32 block absmax), which is what training actually holds.

Peak memory. On CUDA: torch's allocator peak (max_memory_allocated) after a reset. On CPU the
allocator keeps no statistics, so the process's resident-set high-water mark (VmHWM) is reset
through /proc/self/clear_refs (Linux >= 4.0) at entry and read at exit, minus the resident size
at entry: every byte the training touched (tensors, allocator slack) above what was there.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def base_bits_per_param(model: nn.Module) -> dict:
    """Bits per weight of the model's linears (their base weights; adapters excluded)."""
    from lmstack.model.lora import LoRALinear
    from lmstack.model.quantized import QuantLinear
    from lmstack.model.replace import linear_roles
    stored = resident = params = 0
    for name in linear_roles(model):
        if name == "lm_head":       # tied to the embedding in most small models; never quantized by QLoRA
            continue
        mod = model.get_submodule(name)
        base = mod.base if isinstance(mod, LoRALinear) else mod
        out_f, in_f = getattr(base, "base_linear_shape", None) or base.weight.shape
        n = out_f * in_f
        params += n
        if isinstance(base, QuantLinear):
            persistent = {k: b for k, b in base.named_buffers() if k not in base._non_persistent_buffers_set}
            s = sum(b.numel() * b.element_size() * 8 for b in persistent.values())
            stored += s
            resident += s + sum(b.numel() * b.element_size() * 8 for k, b in base.named_buffers()
                                if k in base._non_persistent_buffers_set and b is not None)
        else:
            bits = n * base.weight.element_size() * 8
            stored += bits
            resident += bits
    if params == 0:
        return {"stored": None, "resident": None, "params": 0}
    return {"stored": stored / params, "resident": resident / params, "params": params}


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory used inside the block, in bytes (None where it cannot be measured)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self.how = "unmeasured"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.how = "cuda max_memory_allocated"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS
                self._start = _rss_kib("VmRSS")
                self.how = "cpu VmHWM - VmRSS at start"
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            peak = _rss_kib("VmHWM")
            self.bytes = None if peak is None else (peak - self._start) * 1024
