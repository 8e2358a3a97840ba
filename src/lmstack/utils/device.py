"""Device and dtype selection: CPU first, CUDA when present."""
from __future__ import annotations

import contextlib

import torch

from lmstack.utils.errors import LmstackError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmstackError(f"device={name!r} but no CUDA GPU is visible; use device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LmstackError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def pick_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise LmstackError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}") from None


def autocast(device: torch.device, dtype: str | torch.dtype | None):
    """Autocast context for mixed precision; a no-op for float32/None."""
    if dtype is None:
        return contextlib.nullcontext()
    dt = pick_dtype(dtype) if isinstance(dtype, str) else dtype
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)
