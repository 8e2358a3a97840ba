"""QuantConfig: every setting of a weight-only quantization, checked where it is made.

    QuantConfig(method="rtn", bits=8)                         # INT8 per output channel
    QuantConfig(method="rtn", bits=8, act_bits=8)             # W8A8: int8 inputs too (blocks of 32)
    QuantConfig(method="rtn", bits=4, group_size=128)         # INT4, groups of 128 inputs
    QuantConfig(method="nf4")                                 # QLoRA NF4, blocks of 64
    QuantConfig(method="gptq", bits=4, group_size=64, act_order=True)
    QuantConfig(method="awq", bits=4, group_size=64)

GPTQ and AWQ read calibration text: `calib_samples` windows of `calib_seq_len` tokens, cut
one after another from the calibration token stream.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmstack.model.quant_formats import ACT_BITS, INT_BITS, METHODS
from lmstack.model.quantized import QuantError

GROUP_SIZES = (None, 32, 64, 128)


def _positive_int(name: str, value, lo: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise QuantError(f"QuantConfig.{name}={value!r} must be an int >= {lo}")


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"                  # rtn | nf4 | gptq | awq
    bits: int | None = None              # 8 or 4 (None: 4 for nf4, else 8)
    group_size: int | None = None        # None = one group per output channel (nf4: block size, default 64)
    symmetric: bool = True               # symmetric grid around 0, or asymmetric with a zero point
    act_bits: int | None = None          # 8: round each layer's input to int8 too (W8A8; INT8 rtn / gptq)
    targets: str | tuple[str, ...] = "all-linear"   # names for find_linears (the LM head is not in all-linear)
    exclude: tuple[str, ...] = ()        # names to leave in float (e.g. "router")
    # GPTQ (Frantar et al. 2022)
    damp_percent: float = 0.01           # dampening added to H's diagonal, times mean(diag H)
    act_order: bool = False              # quantize columns by decreasing H diagonal (static groups)
    gptq_block_size: int = 128           # columns per lazy-batch update
    # AWQ (Lin et al. 2023)
    awq_grid: int = 20                   # alphas 0, 1/n, ..., (n-1)/n searched for s = mean|x|^alpha
    awq_max_tokens: int = 4096           # activation rows kept per linear for the search
    # calibration (gptq, awq)
    calib_samples: int = 16
    calib_seq_len: int = 128
    calib_batch_size: int = 8

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantError(f"QuantConfig.method={self.method!r} is unknown; choose one of {METHODS}")
        bits = self.bits if self.bits is not None else (4 if self.method == "nf4" else 8)
        object.__setattr__(self, "bits", bits)
        if self.method == "nf4":
            if bits != 4:
                raise QuantError(f"QuantConfig.bits={bits} with method='nf4'; NF4 is a 4-bit format")
            if not self.symmetric:
                raise QuantError("QuantConfig.symmetric=False with method='nf4'; NF4 scales by the absmax of each "
                                 "block (symmetric only)")
            if self.group_size is None:
                object.__setattr__(self, "group_size", 64)
        elif bits not in INT_BITS:
            raise QuantError(f"QuantConfig.bits={bits!r} is not supported; choose one of {INT_BITS}")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"QuantConfig.group_size={self.group_size!r} is not supported; choose one of "
                             f"{GROUP_SIZES} (None = per output channel)")
        if self.act_bits not in ACT_BITS:
            raise QuantError(f"QuantConfig.act_bits={self.act_bits!r} is not supported; choose one of {ACT_BITS}")
        if self.act_bits is not None and (bits != 8 or self.method not in ("rtn", "gptq")):
            raise QuantError(f"QuantConfig.act_bits={self.act_bits} (int8 inputs) goes with bits=8 and method 'rtn' "
                             f"or 'gptq'; got bits={bits}, method={self.method!r}")
        if not isinstance(self.symmetric, bool):
            raise QuantError(f"QuantConfig.symmetric={self.symmetric!r} must be True or False")
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        if not isinstance(targets, (tuple, list)) or not targets or not all(isinstance(t, str) for t in targets):
            raise QuantError(f"QuantConfig.targets={self.targets!r} must be a name or a list of names")
        object.__setattr__(self, "targets", self.targets if isinstance(self.targets, str) else tuple(targets))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.damp_percent, (int, float)) or not 0 < self.damp_percent <= 1:
            raise QuantError(f"QuantConfig.damp_percent={self.damp_percent!r} must be in (0, 1]")
        if not isinstance(self.act_order, bool):
            raise QuantError(f"QuantConfig.act_order={self.act_order!r} must be True or False")
        for name in ("gptq_block_size", "awq_grid", "awq_max_tokens", "calib_samples", "calib_seq_len",
                     "calib_batch_size"):
            _positive_int(name, getattr(self, name))

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")

    @property
    def calib_tokens(self) -> int:
        return self.calib_samples * self.calib_seq_len
