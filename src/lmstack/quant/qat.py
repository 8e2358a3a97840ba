"""Quantization-aware training (QAT): train through the weights RTN will round to, then round.

    prepare_qat(model, {"bits": 4, "group_size": 32})       # linears -> FakeQuantLinear, in place
    Trainer(cfg, model, objective, batches).fit()           # any objective, the one Trainer
    convert_qat(model)                                      # -> IntLinear (the "quant" transform)
    # or as the trainer's model transform (`lmstack train --qat '{bits: 4}'` passes it):
    Trainer(cfg, model_transform=QAT({"bits": 4, "group_size": 32})).fit()
The trainer (floor 3, below quant/) never imports this module: it calls whatever transform it
is given on the model it built, before making the optimizer.

Forward. A `FakeQuantLinear` keeps the float weight W (the same Parameter, under the same
state-dict name, so checkpoints, resume and `save_pretrained` are those of the float model)
and computes with W_hat = fake_quantize(W): the grid of rtn.py (per-group absmax or min/max
scale, zero point) recomputed from the current W at every forward, W rounded onto it and
dequantized. W_hat is bit for bit what `rtn_quantize` + `IntLinear.dequantize` give for the
same W, so the model the optimizer sees is the model `convert_qat` returns.

Backward: the straight-through estimator (Bengio et al. 2013), with clipping.
    dL/dW[o, i] = dL/dW_hat[o, i]   where the unclamped code round(W / s) + z lies in the
                                    grid's code range (the weight is inside the clip range)
                = 0                 where it was clamped (the weight lies outside the grid)
The grid itself (scale, zero point) is treated as a constant: no gradient flows through the
absmax / min / max that chose it (PyTorch's FakeQuantize with a min-max observer does the
same; LSQ, which learns the scale, is not done). With symmetric absmax grids no weight is
ever outside the grid, so the rule is the identity there; asymmetric grids can clamp an
extreme weight by up to half a step when the zero point is rounded.

Conversion is round-to-nearest of the trained weights with the same setting: `convert_qat`
puts the plain linears back and calls `quantize_model(..., QuantConfig("rtn", ...))`, so the
result is a normal quantized run (saved, reloaded and served like any RTN model) whose codes
equal `rtn_quantize` of the QAT-trained weights. Fake quantization itself records no
transform: mid-training the model is its float weights (that is what checkpoints hold).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.quant_formats import code_range
from lmstack.model.quantized import QuantError
from lmstack.model.replace import replace_linears, set_module
from lmstack.quant.config import QuantConfig
from lmstack.quant.quantize import _check_model, quantize_model
from lmstack.quant.rtn import _per_column, from_codes, grid_params, zero_point

QAT_KEYS = ("bits", "group_size", "symmetric", "targets", "exclude")


def qat_config(settings: QuantConfig | dict | None = None) -> QuantConfig:
    """The RTN setting QAT simulates: a QuantConfig(method="rtn"), or a dict of QAT_KEYS
    (TrainConfig.qat; bits default to 4 there, the usual QAT target)."""
    if isinstance(settings, QuantConfig):
        if settings.method != "rtn":
            raise QuantError(f"QAT simulates round-to-nearest grids; got QuantConfig.method={settings.method!r} "
                             f"(use method='rtn')")
        return settings
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise QuantError(f"qat settings must be a mapping of {list(QAT_KEYS)}, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(QAT_KEYS))
    if unknown:
        raise QuantError(f"qat: unknown key(s) {unknown}; valid keys: {list(QAT_KEYS)}")
    return QuantConfig(method="rtn", **{"bits": 4, **settings})


def fake_quantize_grid(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
                       group_size: int) -> tuple[Tensor, Tensor]:
    """Round w (out, in) onto a given grid: (W_hat, inside). scale / zero (out, in/g) as
    grid_params returns them; inside (out, in) bool: the unclamped code was in range."""
    s = _per_column(scale, group_size)
    z = None if zero is None else _per_column(zero, group_size)
    raw = torch.round(w / s) + zero_point(z, bits)                 # to_codes before its clamp
    lo, hi = code_range(bits, zero is None)
    codes = raw.clamp(lo, hi)
    return from_codes(codes, s, z, bits), (raw >= lo) & (raw <= hi)


class _FakeQuantSTE(torch.autograd.Function):
    """W -> W_hat on a fixed grid; backward passes the gradient where W was inside the grid."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
        w_hat, inside = fake_quantize_grid(w.detach().float(), scale, zero, bits, group_size)
        ctx.save_for_backward(inside)
        return w_hat.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inside, = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def ste_fake_quantize(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    """Differentiable fake quantization of w (out, in) on the grid (scale, zero), see the
    module docstring for the gradient rule."""
    return _FakeQuantSTE.apply(w, scale, zero, bits, group_size)


class FakeQuantLinear(nn.Module):
    """nn.Linear that computes with its weight rounded onto an RTN grid (training only)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool, name: str = "linear"):
        super().__init__()
        if type(linear) is not nn.Linear:
            raise QuantError(f"{name} is a {type(linear).__name__}, not an nn.Linear; QAT fake-quantizes plain "
                             f"linears (prepare_qat on the float model, before adapters)")
        out_f, in_f = linear.weight.shape
        g = in_f if group_size is None else group_size
        if in_f % g:
            raise QuantError(f"{name}: group_size={group_size} does not divide in_features={in_f}; use a group size "
                             f"that divides it, or group_size=None (one group per output channel)")
        if bits == 4 and in_f % 2:
            raise QuantError(f"{name}: INT4 packs two codes per byte, so in_features={in_f} must be even")
        self.weight, self.bias = linear.weight, linear.bias     # the same Parameters: names and optimizer unchanged
        self.base_linear_shape = (out_f, in_f)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    def fake_weight(self) -> Tensor:
        """W_hat (out, in), differentiable in W by the straight-through estimator."""
        g = self.group_size or self.base_linear_shape[1]
        with torch.no_grad():
            scale, zero = grid_params(self.weight, self.bits, g, self.symmetric, self.weight.dtype)
        return ste_fake_quantize(self.weight, scale, zero, self.bits, g)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fake_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """The plain linear over the same Parameters."""
        out_f, in_f = self.base_linear_shape
        lin = nn.Linear(in_f, out_f, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else self.group_size
        return f"in={self.base_linear_shape[1]}, out={self.base_linear_shape[0]}, fake int{self.bits}, group={g}, " \
               f"symmetric={self.symmetric}"


def qat_modules(model: nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def prepare_qat(model: nn.Module, settings: QuantConfig | dict | None = None) -> list[str]:
    """Replace the targeted linears of `model` by FakeQuantLinear, in place; returns their
    names. Every target is checked first (as quantize_model does): nothing changes on error."""
    cfg = qat_config(settings)
    if qat_modules(model):
        raise QuantError("the model already has fake-quantized linears (prepare_qat ran); train it or convert_qat")
    targets = _check_model(model, cfg)
    return replace_linears(model, targets, lambda lin, t: FakeQuantLinear(lin, cfg.bits, cfg.group_size,
                                                                          cfg.symmetric, t.name))


class QAT:
    """The trainer's model transform for QAT: `QAT(settings)(model)` is prepare_qat(model,
    settings). The settings are checked when it is made, before any training starts."""

    def __init__(self, settings: QuantConfig | dict | None = None):
        self.config = qat_config(settings)

    def __call__(self, model: nn.Module) -> list[str]:
        return prepare_qat(model, self.config)

    def __repr__(self) -> str:
        c = self.config
        return f"QAT(bits={c.bits}, group_size={c.group_size}, symmetric={c.symmetric})"


@torch.no_grad()
def convert_qat(model: nn.Module) -> nn.Module:
    """Round the QAT-trained weights: FakeQuantLinear -> IntLinear (RTN with the trained
    setting, recorded as the "quant" transform), in place. Returns the model."""
    mods = qat_modules(model)
    if not mods:
        raise QuantError("the model has no fake-quantized linears; call prepare_qat and train it first")
    settings = {(m.bits, m.group_size, m.symmetric) for _, m in mods}
    if len(settings) != 1:
        raise QuantError(f"fake-quantized linears with different settings {sorted(settings, key=str)}; one "
                         f"convert_qat call converts one setting")
    bits, group_size, symmetric = settings.pop()
    names = [n for n, _ in mods]
    for n, m in mods:
        set_module(model, n, m.to_linear())
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric,
                      targets=tuple(re.escape(n) for n in names))
    try:
        quantize_model(model, cfg)
    except BaseException:
        for n, m in mods:           # never leave the model half converted
            set_module(model, n, m)
        raise
    return model
