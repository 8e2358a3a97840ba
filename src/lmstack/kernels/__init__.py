"""Floor 0: optional compiled CPU kernels, with the pure-PyTorch path as the fallback.

    from lmstack import kernels
    if kernels.available():                   # built for these sources and this torch
        y = kernels.quant_linear(x, weight, scale, zero, codebook, bits, group_size, bias)
        w = kernels.quant_dequantize(weight, scale, zero, codebook, bits, group_size)   # (N, K) float32
    with kernels.disabled():                  # force the PyTorch path (benchmarks, tests)
        ...

  quant_linear.cpp  torch.ops.lmstack.quant_linear, the weight-only quantized linear: at
                    decode and small batches it reads INT8 / packed INT4 / NF4 codes and
                    decodes them in registers (float32 accumulation); for prefill it hands
                    cached blocks of the dequantized weight to MKL's GEMM.
                    torch.ops.lmstack.quant_dequantize: the float32 weight in one pass
  build.py          `python -m lmstack.kernels.build`, run by `make install`: compiles into
                    _build/ and records the source hash and torch version it was built for

The library is never compiled at import time. When it is missing, stale (sources edited
since the build) or built for another torch, the first quantized forward that would use it
emits ONE RuntimeWarning saying why and how to build, and every layer takes the PyTorch path
(dequantize, then F.linear). LMSTACK_KERNELS=0 in the environment turns the kernels off
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
    """quant_linear was called on a machine where the library is missing, stale or turned off."""


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

    @torch.library.register_fake("lmstack::quant_dequantize")
    def _(weight, scale, zero, codebook, bits, group_size):
        return scale.new_empty(weight.shape[0], weight.shape[1] * (2 if bits == 4 else 1))


def _registered() -> bool:
    try:
        torch.ops.lmstack.quant_linear
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
                        warnings.warn(f"lmstack: the compiled quantized-linear CPU kernels are unavailable "
                                      f"({_why_not}); quantized layers use the slower PyTorch path. Build them "
                                      f"with `make kernels` or `python -m lmstack.kernels.build`.",
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
    """Within the block available() is False: quantized layers take the PyTorch path."""
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


def quant_dequantize(weight: Tensor, scale: Tensor, zero: Tensor | None, codebook: Tensor | None, bits: int,
                     group_size: int) -> Tensor:
    """The (N, K) float32 W_hat of quant_linear's weight format, in one pass (equal bit for bit
    to model/quantized.py's dequantize(): one rounding, of (q - zero) * scale or codebook[q] * scale)."""
    if not _loaded:
        _require()
    return torch.ops.lmstack.quant_dequantize.default(weight, scale, zero, codebook, bits, group_size)


def _require() -> None:
    if not available() and not _loaded:
        raise KernelsUnavailable(f"the compiled kernels are unavailable: {unavailable_reason()}")


__all__ = ["KernelsUnavailable", "available", "unavailable_reason", "disabled", "quant_linear", "quant_dequantize"]
