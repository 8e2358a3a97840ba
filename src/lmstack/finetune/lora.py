"""LoRA finetuning: configure adapters, add them to a model, fold them back in.

    model = Transformer.from_pretrained(run_or_hf_dir)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, targets=["q", "v"]))  # or "all-linear"
    ... train: only the adapters require grad ...
    stats = merge_lora(model)       # W += B @ A * scale; the model is a plain model again

The module (`LoRALinear`) and its transform record live at floor 1 (model/lora.py) so the
engine loads an adapted run; this file is the training-side API. Field names follow PEFT's
`LoraConfig` where they mean the same thing (`r`, `use_rslora`); `alpha` and `dropout` are
PEFT's `lora_alpha` and `lora_dropout`, `targets` its `target_modules` in our role names
(q k v o gate up down, PEFT's `q_proj` ... are accepted too, module-name regexes, or
"all-linear").

Merging into a quantized base (QLoRA) has no float weight to add to: the merged weight is
dequantize() + B @ A * scale, quantized again into a module with the base's state-dict
names, so the model's quantization record still loads it: by `requantize(base, weight)` when
given, else in the base's own format for lmstack's quantized linears (qlora.py), else by the
base's `requantize(weight)` method. The new rounding moves the
logits; merge_lora measures that drift on a probe batch and returns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from lmstack.model.lora import LoRALinear, inject_lora, lora_scale
from lmstack.model.peft_format import LoraError
from lmstack.model.replace import set_module
from lmstack.model.transforms import get_transforms
from lmstack.utils import LmstackError


@dataclass(frozen=True)
class LoraConfig:
    """r: rank; alpha: scale numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora);
    dropout: on the adapter's input while training; targets: roles, module-name regexes or
    "all-linear"; exclude: module names or regexes to leave alone."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ("q", "v")   # PEFT's default for Llama-family models
    use_rslora: bool = False
    exclude: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(f"LoraConfig.r={self.r!r} must be a positive int (the adapter rank)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoraError(f"LoraConfig.alpha={self.alpha!r} must be a number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoraError(f"LoraConfig.dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            raise LoraError(f"LoraConfig.use_rslora={self.use_rslora!r} must be True or False")
        for name in ("targets", "exclude"):
            v = getattr(self, name)
            v = (v,) if isinstance(v, str) else tuple(v)
            if any(not isinstance(t, str) or not t for t in v):
                raise LoraError(f"LoraConfig.{name}={v!r} must hold non-empty strings (roles such as 'q', "
                                f"module names or regexes, or 'all-linear')")
            object.__setattr__(self, name, v)
        if not self.targets:
            raise LoraError("LoraConfig.targets is empty; use e.g. ['q', 'v'] or 'all-linear'")

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model` by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the targeted linears in adapters, freeze everything else, record the transform.

    Returns the adapted module names. Bad targets, a rank larger than a layer, or a model that
    already has adapters are errors raised before anything changes."""
    if not isinstance(config, LoraConfig):
        raise LoraError(f"add_lora needs a LoraConfig, got {type(config).__name__}")
    if getattr(model, "config", None) is None:
        raise LoraError(f"add_lora needs an lmstack Transformer, got {type(model).__name__}")
    have = list(lora_modules(model))
    if have:
        raise LoraError(f"the model already has LoRA adapters on {have[:3]}{' ...' if len(have) > 3 else ''}; "
                        f"merge_lora it first or start from the base model (one adapter per model for now)")
    try:
        names = inject_lora(model, config.r, config.alpha, config.dropout, list(config.targets),
                            config.use_rslora, list(config.exclude))
    except LmstackError as e:
        raise LoraError(str(e)) from None
    for n, p in model.named_parameters():
        p.requires_grad_(is_lora_param(n))   # only adapters train; a tied wte/lm_head stays frozen too
    return names


def default_probe(model: nn.Module) -> Tensor:
    """A fixed batch of token ids (2, <=16) to measure logit drift on, the same every call."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, min(16, cfg.context_length)), generator=g)
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def merge_lora(model: nn.Module, requantize: Callable[[nn.Module, Tensor], nn.Module] | None = None,
               probe: Tensor | None = None) -> dict:
    """Fold every adapter into its base weight and remove the adapters and their record, so
    the model saves and serves as a plain model. Returns stats:

        {"modules": [...], "quantized": [...], "max_abs_logit_drift": float, "probe_tokens": int}

    where the drift is max |logits(merged) - logits(unmerged)| on `probe` (token ids, (B, T);
    a fixed random batch by default). Quantized bases: see the module docstring; `requantize`
    gets the old base and the merged float weight (out, in) and returns the new base module."""
    mods = lora_modules(model)
    if not mods:
        raise LoraError("the model has no LoRA adapters to merge; add_lora or load_adapter first")
    if requantize is not None and not callable(requantize):
        raise LoraError(f"requantize must be a callable (base, merged_weight) -> module, got {requantize!r}")
    ids = default_probe(model) if probe is None else probe
    was_training = model.training
    model.eval()  # no dropout in the probe
    try:
        before = model(ids).float()
        new_bases = {}
        for name, m in mods.items():      # build every new base first: a failing requantizer changes nothing
            if m.quantized:
                new_bases[name] = _requantized(name, m, requantize)
        for name, m in mods.items():
            if m.quantized:
                set_module(model, name, new_bases[name])
            else:
                m.merge()                 # W[rows] += B @ A * scale, in place on the shared weight
                set_module(model, name, m.base)
        model.transforms = [r for r in get_transforms(model) if r["kind"] != "lora"]
        drift = (model(ids).float() - before).abs().max().item()
    finally:
        model.train(was_training)
    return {"modules": list(mods), "quantized": list(new_bases), "max_abs_logit_drift": drift,
            "probe_tokens": int(ids.numel())}


def _requantized(name: str, m: LoRALinear, requantize) -> nn.Module:
    """The quantized base of `m` with its adapters folded in: requantize(dequantize() + deltas)."""
    if requantize is None:
        from lmstack.finetune.qlora import default_requantizer
        requantize = default_requantizer(m.base)
        if requantize is None:
            raise LoraError(f"{name} has a quantized base ({type(m.base).__name__}) that lmstack cannot "
                            f"requantize and that has no requantize(weight) method; pass "
                            f"merge_lora(model, requantize=fn) with fn(base, merged_weight) -> module")
    w = m.base.dequantize()                                   # (out, in), the compute dtype
    merged = w.to(torch.float32, copy=True)                   # add in fp32, round once
    for role, (a, b) in m.slices.items():
        merged[a:b] += m.delta_weight(role).float()
    new = requantize(m.base, merged.to(w.dtype))
    if not isinstance(new, nn.Module):
        raise LoraError(f"requantize returned {type(new).__name__} for {name}; it must return an nn.Module")
    shape = tuple(getattr(new, "base_linear_shape", None) or new.weight.shape)
    if shape != m.base_linear_shape:
        raise LoraError(f"requantize returned a base of shape {shape} for {name}, expected {m.base_linear_shape}")
    missing = sorted(set(m.base.state_dict(keep_vars=True)) - set(new.state_dict(keep_vars=True)))
    if missing:
        raise LoraError(f"requantize for {name} returned a module without the base's state-dict name(s) "
                        f"{missing}; the quantization record would no longer load it")
    return new
