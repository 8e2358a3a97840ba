"""quantize_model: the "quant" transform. Replace a model's linears by quantized ones.

    names = quantize_model(model, QuantConfig(method="rtn", bits=4, group_size=64))
    names = quantize_model(model, QuantConfig(method="gptq", bits=4), calib=text, tokenizer=tok)
    model.save_pretrained("runs/x-int4")          # LLM("runs/x-int4") loads it quantized

Every target is checked before anything changes: a group size that does not divide a
layer's in_features is an error naming the layer (no silent per-layer fallback, so one
record describes every module), as is quantizing a model that is already quantized, is
fake-quantized for QAT (convert_qat rounds it) or carries adapters, or the LM head when it is
tied to the token embedding. The transform is recorded as {"kind": "quant", "method", "bits",
"group_size", "symmetric", "targets", "exclude", "modules"} (+ "act_bits" when set); loading
rebuilds the modules from it (model/quantized.py).
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.model.quantized import QuantError, QuantLinear, make_quant_linear
from lmstack.model.replace import find_linears, replace_linears
from lmstack.model.transforms import get_transforms, record_transform
from lmstack.quant.awq import ActivationStat, awq_quantize, awq_search
from lmstack.quant.calib import calibration_windows, run_sequential
from lmstack.quant.config import QuantConfig
from lmstack.quant.gptq import HessianStat, gptq_quantize
from lmstack.quant.nf4 import quantize_nf4
from lmstack.quant.rtn import rtn_quantize


def _check_model(model: nn.Module, cfg: QuantConfig) -> list:
    if not isinstance(cfg, QuantConfig):
        raise QuantError(f"quantize_model needs a QuantConfig, got {type(cfg).__name__}")
    done = [r for r in get_transforms(model) if r.get("kind") == "quant"]
    if done or any(isinstance(m, QuantLinear) for m in model.modules()):
        how = f" (method={done[0].get('method')!r}, bits={done[0].get('bits')})" if done else ""
        raise QuantError(f"the model is already quantized{how}; quantize the float model instead")
    from lmstack.quant.qat import qat_modules      # (qat.py builds on this module)
    fake = qat_modules(model)
    if fake:
        m = fake[0][1]
        raise QuantError(f"the model has {len(fake)} fake-quantized (QAT) linear(s), e.g. {fake[0][0]} (int{m.bits}, "
                         f"group {m.group_size or 'channel'}); round them with convert_qat(model), which quantizes "
                         f"with the setting they were trained for, rather than quantize_model")
    targets = find_linears(model, cfg.targets, cfg.exclude)
    for t in targets:
        if t.slices is not None:
            raise QuantError(f"target roles {t.roles} select only some rows of the fused linear {t.name}; "
                             f"quantization replaces whole linears, so target all of {list(t.fused)} or the "
                             f"module name {t.name!r}")
        if t.name == "lm_head" and model.config.tie_embeddings:
            raise QuantError("lm_head shares its weight with the token embedding (tie_embeddings=True); "
                             "quantizing it would untie them, so leave it out ('all-linear' does)")
    return targets


def _filled(linear: nn.Linear, name: str, cfg: QuantConfig, codes, scale, zero=None, awq_scale=None) -> QuantLinear:
    m = make_quant_linear(linear, name, cfg.method, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_bits)
    m.set_codes(codes, scale, zero, awq_scale)
    return m


def _quantize_direct(linear: nn.Linear, name: str, cfg: QuantConfig) -> QuantLinear:
    """RTN or NF4: from the weight alone."""
    if cfg.method == "nf4":
        m = make_quant_linear(linear, name, "nf4", 4, cfg.group_size, True)
        m.set_state(*quantize_nf4(linear.weight, cfg.group_size))
        return m
    codes, scale, zero = rtn_quantize(linear.weight, cfg.bits, cfg.group_size, cfg.symmetric, linear.weight.dtype)
    return _filled(linear, name, cfg, codes, scale, zero)


def _quantize_calibrated(linear: nn.Linear, name: str, cfg: QuantConfig, stat) -> QuantLinear:
    """GPTQ from the Hessian of the linear's inputs, or AWQ from its activations."""
    dt = linear.weight.dtype
    if cfg.method == "gptq":
        H = stat.H if stat.H is not None else torch.zeros(linear.in_features, linear.in_features)
        codes, scale, zero = gptq_quantize(linear.weight, H.to(linear.weight.device), cfg.bits, cfg.group_size,
                                           cfg.symmetric, cfg.damp_percent, cfg.act_order, cfg.gptq_block_size,
                                           dt, name)
        return _filled(linear, name, cfg, codes, scale, zero)
    if stat.n == 0:   # no token reached it (an unused expert): s = 1 is plain RTN
        s = torch.ones(linear.in_features, device=linear.weight.device)
    else:
        s, _, _ = awq_search(linear.weight, stat.X, stat.mean_abs, cfg.bits, cfg.group_size, cfg.symmetric,
                             cfg.awq_grid, dt)
    codes, scale, zero = awq_quantize(linear.weight, s, cfg.bits, cfg.group_size, cfg.symmetric, dt)
    return _filled(linear, name, cfg, codes, scale, zero, awq_scale=s)


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig, calib=None, tokenizer=None, record: bool = True) -> list[str]:
    """Quantize the targeted linears of `model` in place; returns their names (model order).

    calib (GPTQ, AWQ): text (with `tokenizer`) or token ids, at least
    cfg.calib_samples * cfg.calib_seq_len tokens."""
    targets = _check_model(model, cfg)
    names = [t.name for t in targets]
    for t in targets:  # every layer must fit the setting before any is changed
        make_quant_linear(model.get_submodule(t.name), t.name, cfg.method, cfg.bits, cfg.group_size, cfg.symmetric,
                          cfg.act_bits)
    if cfg.needs_calibration:
        windows = calibration_windows(calib, cfg.calib_samples, cfg.calib_seq_len, model.config.vocab_size,
                                      tokenizer, model.config.context_length)
        make_stat = HessianStat if cfg.method == "gptq" else (lambda: ActivationStat(cfg.awq_max_tokens))
        run_sequential(model, names, windows, cfg.calib_batch_size, make_stat,
                       lambda name, lin, stat: _quantize_calibrated(lin, name, cfg, stat))
    else:
        replace_linears(model, targets, lambda lin, t: _quantize_direct(lin, t.name, cfg))
    if record:
        targets_rec = [cfg.targets] if isinstance(cfg.targets, str) else list(cfg.targets)
        record_transform(model, {"kind": "quant", "method": cfg.method, "bits": cfg.bits,
                                 "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                                 "targets": targets_rec, "exclude": list(cfg.exclude), "modules": names,
                                 **({"act_bits": cfg.act_bits} if cfg.act_bits else {})})
    return names

