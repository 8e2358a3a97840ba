"""Weight-only quantized linears: the modules a quantized run computes with, at floor 1.

A quantizer (lmstack.quant, floor 3) replaces `nn.Linear` modules through the seam
(replace.py) with one of these. Each keeps its packed codes under the base's state-dict name
`weight` (as bitsandbytes does) and its statistics beside it, so model.safetensors holds the
quantized model and loading rebuilds the structure from the "quant" record, then loads it.

  IntLinear   INT8 / INT4 on a uniform grid, per output channel or in groups of g inputs
      weight        (out, in) uint8 codes (INT8), or (out, in/2) two 4-bit codes per byte
                    (the even column in the high nibble, bitsandbytes' order)
      weight_scale  (out, in/g) float   grid step of each group (g = in: per channel)
      weight_zero   (out, in/g) uint8   zero point (asymmetric only; symmetric: 2^(bits-1))
      awq_scale     (in,) float         AWQ's per-input-channel factor s (method "awq" only)
    W_hat[o, i] = (code[o, i] - zero[o, i // g]) * scale[o, i // g] / s[i]
    act_bits=8 (INT8 weights, rtn / gptq; W8A8): the input is rounded to int8 as well before the
    product, in blocks of b consecutive inputs with one absmax scale each, as llama.cpp rounds
    activations for its quantized matmuls (blocks of 32 for Q8_0, 256 for its K-quants):
    x_hat = round(x / d) * d, d = max|x_block| / 127; b = 128, or 64 / 32 where the weight's
    group is not a multiple of 128 (act_block()). Then y = x_hat @ W_hat^T + bias, which the kernel
    (kernels/quant_linear_a8.cpp) computes with integer dot products (VNNI): 1.3-2.6x faster
    than the weight-only kernel on this CPU (measured with b = 128; b = 32 converts each block's
    integer sum to float and was slower than weight-only).
    symmetric codes lie in [1, 2^bits - 1] (levels -(2^(b-1) - 1) .. 2^(b-1) - 1, zero exact);
    asymmetric codes in [0, 2^bits - 1] with the zero point chosen so 0.0 is on the grid.

  NF4Linear   QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), bit-compatible with
              bitsandbytes' quantize_4bit(quant_type="nf4", compress_statistics=True)
      weight               (out, in/2) uint8 NF4 indices, two per byte (high nibble first)
      weight_absmax        (n_blocks,) uint8  each block's absmax, double-quantized
      weight_absmax_scale  (ceil(n_blocks/256),) float32  scale of each 256-block of absmax
      weight_absmax_offset () float32  mean of all absmax, subtracted before quantizing them
    absmax[b] = DYNAMIC[weight_absmax[b]] * weight_absmax_scale[b // 256] + offset
    W_hat     = NF4[index] * absmax[block]        (blocks of 64 consecutive weights of a row)

Every module computes `forward(x) = F.linear(x, self.dequantize(x.dtype), bias)`, by one of
paths. On CPU in float32, with the compiled kernels built (lmstack/kernels), inference runs
kernels.quant_linear: at decode and small batches it reads the codes and decodes them in
registers, so the weight is read at 8 or 4 bits instead of 32, which is what makes a quantized
model faster than its float32 original; for prefill it feeds MKL's GEMM block by block.
QLoRA training through the layer (a gradient wrt the input) runs `DequantLinear`: F.linear
on the weight dequantized (in one C++ pass where the kernels fit, bit-equal to dequantize()),
saving no float weight for backward, which dequantizes again; so a QLoRA step holds one
layer's float weight at a time, not every layer's until backward. Everything else (bf16,
CUDA, no kernels built) runs F.linear on dequantize(), in PyTorch.
`dequantize()` is the float weight LoRA-on-quantized (QLoRA) and
merging build on. Statistics are float buffers, so
`model.to(torch.bfloat16)` rounds them too (bitsandbytes keeps NF4's in float32; a bf16
NF4 model is then within bf16 rounding of it, not bit-equal).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack import kernels
from lmstack.model.quant_formats import (ABSMAX_BLOCK, ACT_BITS, INT_BITS, METHODS, NF4_BLOCKSIZES, act_block, code_range,
                                         codebook, pack_int4, quantize_activations, unpack_int4)
from lmstack.model.replace import SeamError, find_linears, replace_linears
from lmstack.model.transforms import register_transform


class QuantError(SeamError):
    """A quantization setting that does not fit a layer, or a model that cannot be quantized."""


class QuantLinear(nn.Module):
    """Base of the quantized linears: a frozen weight computed from stored codes by dequantize()."""

    def __init__(self, out_features: int, in_features: int, bias: Tensor | None):
        super().__init__()
        self.base_linear_shape = (out_features, in_features)
        self.bias = bias           # the base linear's Parameter, adopted under the same name (or None)

    @property
    def out_features(self) -> int:
        return self.base_linear_shape[0]

    @property
    def in_features(self) -> int:
        return self.base_linear_shape[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) float weight this module computes with, in `dtype` (default: the
        dtype of its statistics; float32 for NF4, which bitsandbytes computes in float32)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias
        if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
            # QLoRA training through the layer: the weight is a constant, and F.linear would keep
            # the dequantized float weight alive until backward (32 bits per weight per layer on
            # top of the 4 stored); DequantLinear keeps nothing and dequantizes again in backward
            return DequantLinear.apply(x, b, self)
        if not self._kernel_fits(x):
            return F.linear(x, self.dequantize(x.dtype), b)
        if x.dim() == 2:   # (B*T, in) -> (B*T, out); decode calls this once per linear and token
            return self._kernel_linear(x.contiguous())
        y = self._kernel_linear(x.reshape(-1, self.in_features).contiguous())
        return y.view(*x.shape[:-1], self.out_features)

    def compute_weight(self, x: Tensor) -> Tensor:
        """The float weight a forward on `x` multiplies by: dequantize() in x's dtype, by the
        C++ pass where the kernels fit (bit-equal to dequantize())."""
        return self._kernel_dequantize() if self._kernel_fits(x) else self.dequantize(x.dtype)

    def _kernel_fits(self, x: Tensor) -> bool:
        """The compiled kernels serve float32 CPU inputs (and float32 statistics) once built."""
        b = self.bias
        return x.is_cpu and x.dtype == torch.float32 and (b is None or b.dtype == torch.float32) and \
            kernels.available()

    def _kernel_linear(self, x: Tensor) -> Tensor:
        """x (M, in) contiguous float32 -> (M, out) = F.linear(x, dequantize(), bias) by kernels.quant_linear."""
        raise NotImplementedError

    def _kernel_dequantize(self) -> Tensor:
        """dequantize() (float32) by kernels.quant_dequantize, bit for bit."""
        raise NotImplementedError

    def bits_per_param(self) -> float:
        """Stored bits per weight: codes and every statistic (scales, zeros, absmax ...), bias and
        runtime caches (non-persistent buffers) excluded."""
        bits = sum(b.numel() * b.element_size() * 8 for n, b in self.named_buffers()
                   if n not in self._non_persistent_buffers_set)
        return bits / (self.out_features * self.in_features)


class DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W = module.compute_weight(x) for a frozen quantized module, saving no
    float weight for backward: backward dequantizes again (one more pass over the 4- or 8-bit
    codes, cheap next to the matmuls) for dL/dx = dL/dy W; dL/db = dL/dy summed over tokens.
    The codes never get a gradient. Under autocast, x is cast to the autocast dtype first and
    the product runs in it, as F.linear would."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, module: "QuantLinear") -> Tensor:
        ctx.module, ctx.has_bias = module, bias is not None
        return F.linear(x, module.compute_weight(x), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy: Tensor):
        w = ctx.module.compute_weight(gy) if ctx.needs_input_grad[0] else None
        gx = gy @ w if w is not None else None                                      # (..., in)
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return gx, gb, None

    @classmethod
    def apply(cls, x: Tensor, bias: Tensor | None, module: "QuantLinear") -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
            with torch.autocast(x.device.type, enabled=False):
                return super().apply(x, bias, module)
        return super().apply(x, bias, module)


class IntLinear(QuantLinear):
    """INT8 / INT4 round-to-nearest grid (RTN, GPTQ, AWQ all produce this format)."""

    def __init__(self, out_features: int, in_features: int, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True, awq: bool = False, bias: Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device=None, name: str = "linear", act_bits: int | None = None):
        super().__init__(out_features, in_features, bias)
        if bits not in INT_BITS:
            raise QuantError(f"{name}: bits={bits!r} is not supported; integer grids have bits in {INT_BITS}")
        g = in_features if group_size is None else group_size
        if not isinstance(g, int) or g <= 0 or in_features % g:
            raise QuantError(f"{name}: group_size={group_size} does not divide in_features={in_features}; use a "
                             f"group size that divides it, or group_size=None (one group per output channel)")
        if bits == 4 and in_features % 2:
            raise QuantError(f"{name}: INT4 packs two codes per byte, so in_features={in_features} must be even")
        if act_bits not in ACT_BITS:
            raise QuantError(f"{name}: act_bits={act_bits!r} is not supported; choose one of {ACT_BITS}")
        if act_bits is not None:
            if bits != 8 or awq:
                raise QuantError(f"{name}: act_bits=8 (int8 inputs) goes with INT8 weights of method rtn or gptq; got "
                                 f"bits={bits}{', awq' if awq else ''}")
            if act_block(g) is None:
                raise QuantError(f"{name}: act_bits=8 rounds inputs in blocks of 128, 64 or 32, one of which must "
                                 f"divide the weight's group of {g} inputs (in_features={in_features})")
        self.bits, self.group_size, self.symmetric, self.awq = bits, g, bool(symmetric), bool(awq)
        self.act_bits = act_bits
        self.act_block = act_block(g) if act_bits else None
        n_groups = in_features // g
        cols = in_features // 2 if bits == 4 else in_features
        self.register_buffer("weight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, n_groups, dtype=dtype, device=device))
        if not self.symmetric:
            self.register_buffer("weight_zero", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        if self.awq:
            self.register_buffer("awq_scale", torch.ones(in_features, dtype=dtype, device=device))

    @torch.no_grad()
    def set_codes(self, codes: Tensor, scale: Tensor, zero: Tensor | None = None,
                  awq_scale: Tensor | None = None) -> None:
        """Store integer codes (out, in), scales (out, in/g) and, as the format needs them,
        zero points (out, in/g) and the AWQ input scale (in,). Codes must lie on the grid."""
        out_f, in_f = self.base_linear_shape
        lo, hi = code_range(self.bits, self.symmetric)
        if tuple(codes.shape) != (out_f, in_f) or tuple(scale.shape) != tuple(self.weight_scale.shape):
            raise QuantError(f"codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit this "
                             f"{out_f}x{in_f} layer with {self.weight_scale.shape[1]} group(s) per row")
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise QuantError(f"codes must lie in [{lo}, {hi}] for {self.bits}-bit "
                             f"{'symmetric' if self.symmetric else 'asymmetric'} grids, got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        if (zero is None) != self.symmetric or (awq_scale is None) == self.awq:
            raise QuantError("zero points go with asymmetric grids only, awq_scale with method 'awq' only")
        codes = codes.to(torch.uint8)
        self.weight.copy_(pack_int4(codes) if self.bits == 4 else codes)
        self.weight_scale.copy_(scale)
        if zero is not None:
            self.weight_zero.copy_(zero)
        if awq_scale is not None:
            self.awq_scale.copy_(awq_scale)

    def codes(self) -> Tensor:
        """(out, in) uint8 codes."""
        return unpack_int4(self.weight) if self.bits == 4 else self.weight

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        out_f, in_f = self.base_linear_shape
        s = self.weight_scale                                          # (out, G)
        q = self.codes().view(out_f, -1, self.group_size).to(s.dtype)  # (out, G, g)
        z = float(2 ** (self.bits - 1)) if self.symmetric else self.weight_zero.to(s.dtype)[..., None]
        w = ((q - z) * s[..., None]).view(out_f, in_f)
        w = w / self.awq_scale if self.awq else w
        return w if dtype is None else w.to(dtype)

    def _kernel_fits(self, x: Tensor) -> bool:
        return self.weight_scale.dtype == torch.float32 and (not self.awq or self.awq_scale.dtype == torch.float32) \
            and super()._kernel_fits(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is None:
            return super().forward(x)
        b = self.bias
        if self._kernel_fits(x) and not (torch.is_grad_enabled() and (x.requires_grad or (b is not None and
                                                                                          b.requires_grad))):
            zero = None if self.symmetric else self.weight_zero
            y = kernels.quant_linear_a8(x.reshape(-1, self.in_features).contiguous(), self.weight, self.weight_scale,
                                        zero, self.group_size, self.act_block, b)
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(quantize_activations(x, self.act_block))

    def _kernel_linear(self, x: Tensor) -> Tensor:
        if self.awq:   # W_hat = W' / s column-wise, so x @ W_hat^T = (x / s) @ W'^T
            x = x / self.awq_scale
        return kernels.quant_linear(x, self.weight, self.weight_scale, None if self.symmetric else self.weight_zero,
                                    None, self.bits, self.group_size, self.bias)

    def _kernel_dequantize(self) -> Tensor:
        w = kernels.quant_dequantize(self.weight, self.weight_scale, None if self.symmetric else self.weight_zero,
                                     None, self.bits, self.group_size)
        return w / self.awq_scale if self.awq else w

    def extra_repr(self) -> str:
        g = "channel" if self.group_size == self.in_features else self.group_size
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={g}, " \
               f"symmetric={self.symmetric}{', awq' if self.awq else ''}" + \
               (f", act_bits={self.act_bits} (blocks of {self.act_block})" if self.act_bits else "")


class NF4Linear(QuantLinear):
    """4-bit NormalFloat with double-quantized block absmax (QLoRA), bitsandbytes' layout."""

    def __init__(self, out_features: int, in_features: int, blocksize: int = 64, bias: Tensor | None = None,
                 device=None, name: str = "linear"):
        super().__init__(out_features, in_features, bias)
        if blocksize not in NF4_BLOCKSIZES:
            raise QuantError(f"{name}: NF4 block size {blocksize!r} is not one of {NF4_BLOCKSIZES}")
        if in_features % blocksize:
            raise QuantError(f"{name}: NF4 blocks of {blocksize} must divide in_features={in_features} (blocks "
                             f"stay inside a row); choose a block size that divides it")
        self.blocksize = blocksize
        n_blocks = out_features * in_features // blocksize
        n_outer = -(-n_blocks // ABSMAX_BLOCK)
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax_scale", torch.zeros(n_outer, dtype=torch.float32, device=device))
        self.register_buffer("weight_absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        # the kernel's (out, in/blocksize) float32 absmax, decoded from the three buffers above once
        # per load of them; not in the state dict. _absmax_key says which load it was decoded from.
        self.register_buffer("absmax_cache", None, persistent=False)
        self._absmax_key: tuple | None = None

    @torch.no_grad()
    def set_state(self, packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor, absmax_offset: Tensor) -> None:
        """Store what bitsandbytes' quantize_4bit returns (packed bytes, state.absmax,
        state.state2.absmax, state.offset), in any shape with the right number of elements."""
        for buf, t in ((self.weight, packed), (self.weight_absmax, absmax_codes),
                       (self.weight_absmax_scale, absmax_scale), (self.weight_absmax_offset, absmax_offset)):
            if t.numel() != buf.numel():
                raise QuantError(f"NF4 state tensor of {t.numel()} values where {buf.numel()} are needed")
            buf.copy_(t.reshape(buf.shape))

    def absmax(self) -> Tensor:
        """(n_blocks,) float32 block absmax, undoing the double quantization."""
        n = self.weight_absmax.numel()
        outer = torch.arange(n, device=self.weight_absmax.device) // ABSMAX_BLOCK
        dyn = codebook("dynamic", self.weight_absmax.device)
        return dyn[self.weight_absmax.long()] * self.weight_absmax_scale.float()[outer] + \
            self.weight_absmax_offset.float()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        out_f, in_f = self.base_linear_shape
        nf4 = codebook("nf4", self.weight.device)
        w = nf4[unpack_int4(self.weight).long()].view(-1, self.blocksize) * self.absmax()[:, None]  # float32
        return w.view(out_f, in_f) if dtype is None else w.view(out_f, in_f).to(dtype)

    def block_absmax(self) -> Tensor:
        """(out, in/blocksize) float32 absmax(), cached. The key (storage, version counter) of each
        statistic changes with every load: set_state, load_state_dict, in-place weight updates
        (copy_), .to(): so the cache cannot outlive the values it was decoded from."""
        key = tuple((t.data_ptr(), _version(t)) for t in
                    (self.weight_absmax, self.weight_absmax_scale, self.weight_absmax_offset))
        if key != self._absmax_key or self.absmax_cache is None or self.absmax_cache.dtype != torch.float32:
            self.absmax_cache = self.absmax().view(self.out_features, -1).contiguous()
            self._absmax_key = key
        return self.absmax_cache

    def _kernel_linear(self, x: Tensor) -> Tensor:
        return kernels.quant_linear(x, self.weight, self.block_absmax(), None, codebook("nf4", x.device), 4,
                                    self.blocksize, self.bias)

    def _kernel_dequantize(self) -> Tensor:
        return kernels.quant_dequantize(self.weight, self.block_absmax(), None, codebook("nf4", self.weight.device),
                                        4, self.blocksize)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, blocksize={self.blocksize}"


def _version(t: Tensor) -> int:
    """t's in-place version counter; tensors made under inference_mode have none (they can only be
    changed inside inference_mode, where loading does not happen)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def make_quant_linear(linear: nn.Module, name: str, method: str, bits: int, group_size: int | None,
                      symmetric: bool, act_bits: int | None = None) -> QuantLinear:
    """An empty quantized module for `linear` (codes still zero) that adopts its bias.

    The one place a quant record's fields become a module: used by the quantizers and by
    loading. Raises QuantError when the setting does not fit the layer."""
    if isinstance(linear, QuantLinear):
        raise QuantError(f"{name} is already quantized ({type(linear).__name__}); quantize a float model")
    if type(linear) is not nn.Linear:
        raise QuantError(f"{name} is a {type(linear).__name__}, not an nn.Linear; quantize the base model "
                         f"before adding adapters (QLoRA: quantize, then inject LoRA)")
    if method not in METHODS:
        raise QuantError(f"quantization method {method!r} is unknown; choose one of {METHODS}")
    out_f, in_f = linear.weight.shape
    dev = linear.weight.device
    if method == "nf4":
        if bits != 4 or not symmetric:
            raise QuantError(f"NF4 is a 4-bit absmax (symmetric) format; got bits={bits}, symmetric={symmetric}")
        if act_bits is not None:
            raise QuantError(f"act_bits={act_bits} goes with INT8 weights; NF4 layers take float inputs")
        return NF4Linear(out_f, in_f, group_size or 64, linear.bias, device=dev, name=name)
    return IntLinear(out_f, in_f, bits, group_size, symmetric, awq=method == "awq", bias=linear.bias, act_bits=act_bits,
                     dtype=linear.weight.dtype, device=dev, name=name)


def _rebuild(model: nn.Module, rec: dict) -> None:
    names = rec["modules"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise QuantError(f"'modules' must be a non-empty list of module names, got {names!r}")
    found = find_linears(model, [re.escape(n) for n in names])
    if [t.name for t in found] != names:
        raise QuantError(f"the record lists {names} but this model has {[t.name for t in found]}; the "
                         f"quantized weights were made for another model")
    replace_linears(model, found, lambda lin, t: make_quant_linear(
        lin, t.name, rec["method"], rec["bits"], rec["group_size"], rec["symmetric"], rec.get("act_bits")))


register_transform("quant", _rebuild)
