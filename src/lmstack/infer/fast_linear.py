"""Decode linears on the compiled float32 GEMV (kernels/dense_linear.cpp), the model unchanged.

At batch-1 decode every linear is a GEMV, bound by the bytes of weight it reads. On our AMD
EPYC machines `F.linear` (MKL) reads a decode-sized weight at about 0.4x-0.7x the rate of the
plain AVX-512 loop of dense_linear.cpp (benchmarks/bench_engine.py prints both against the
machine's copy rate), so the engine routes the linears of its forward there:

    fast = DecodeLinears(model)     # once, when the engine is built
    with fast.active():             # the runner's forward
        logits = model(...)

`DecodeLinears` gives each plain `nn.Linear` of the model (float32, on the CPU) an instance
forward that, inside `active()` and for up to MAX_ROWS rows of input without autograd, calls
`kernels.dense_linear`; everywhere else (training, the user's own calls, prefill chunks, a
machine without the library) it runs `F.linear` exactly as nn.Linear does. The class stays
`nn.Linear` (LoRA, quantization and export check `type(m) is nn.Linear`) and the state dict
is untouched; LoRA-wrapped or quantized linears are not plain nn.Linear and keep their path.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack import kernels

# Up to this many rows (B * T tokens) the GEMV loop wins; beyond, MKL's blocked GEMM does
# (prefill). Measured (one thread, shared machine), kernel time / F.linear time, 768 x 256 and
# 2304 x 768 weights: 0.59 / 0.67 at 1 row, 0.90 / 0.54 at 4, 0.71 / 0.79 at 8, 1.27 / 1.00 at 16.
MAX_ROWS = 8

_state = threading.local()      # .on: inside active() on this thread (AsyncLLM steps in its own)


def _forward(m: nn.Linear, x: Tensor) -> Tensor:
    # at batch-1 decode this runs ~17 times a step: parameters read from the dict directly
    # (each nn.Module attribute lookup costs a Python __getattr__), cheapest tests first
    params = m._parameters
    w, b = params.get("weight"), params.get("bias")
    if w is None:                                  # weight no longer a plain parameter (parametrized)
        return F.linear(x, m.weight, m.bias)
    if (getattr(_state, "on", False) and x.numel() <= MAX_ROWS * m.in_features and x.dtype == torch.float32
            and w.dtype == torch.float32 and not torch.is_grad_enabled() and x.device.type == "cpu"
            and w.device.type == "cpu" and w.is_contiguous() and kernels.available()):
        y = kernels.dense_linear(x.reshape(-1, m.in_features).contiguous(), w, b)
        return y.view(*x.shape[:-1], m.out_features)
    return F.linear(x, w, b)


class DecodeLinears:
    def __init__(self, model: nn.Module):
        self.modules = []
        for m in model.modules():
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.is_contiguous() \
                    and "forward" not in vars(m):          # not already routed (a second engine)
                m.forward = functools.partial(_forward, m)
                self.modules.append(m)
            elif type(m) is nn.Linear and isinstance(vars(m).get("forward"), functools.partial):
                self.modules.append(m)

    @contextlib.contextmanager
    def active(self):
        """Within the block, this thread's small float32 linears run on the kernel (when built and
        not turned off by kernels.disabled())."""
        before = getattr(_state, "on", False)
        _state.on = bool(self.modules)
        try:
            yield
        finally:
            _state.on = before
