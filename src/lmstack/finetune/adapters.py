"""LoRA adapters on disk in PEFT's format, so adapters move both ways between lmstack and PEFT.

    save_adapter(model, "out/adapter")     # PeftModel.from_pretrained(hf_model, "out/adapter") loads it
    load_adapter(model, "peft/adapter")    # a folder made by us or by PEFT; adds the adapters if absent

The format (adapter_config.json, adapter_model.safetensors with PEFT's key names, our
lmstack_adapter.json with the base fingerprint) and its reader live at floor 1, in
model/peft_format.py, because the engine loads adapters too; this file writes folders and
puts what the reader returns into trainable adapters. Everything is checked before anything
changes. Files are written each atomically, the config last (a reader that finds the config
finds whole weights).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.finetune.lora import LoraConfig, LoraError, add_lora, lora_modules
from lmstack.model.peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, SIDECAR, base_fingerprint,
                                       peft_names, read_peft_adapter)
from lmstack.model.replace import ROLES, find_linears
from lmstack.utils import LmstackError, atomic_write_bytes, atomic_write_json

__all__ = ["save_adapter", "load_adapter", "base_fingerprint", "peft_names"]


# ---- save ---------------------------------------------------------------------------
def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter folder; returns the folder."""
    from safetensors.torch import save
    mods = lora_modules(model)
    if not mods:
        raise LoraError("the model has no LoRA adapters to save; add_lora or load_adapter first")
    merged = [n for n, m in mods.items() if m.merged]
    if merged:
        raise LoraError(f"adapters of {merged[:3]} are merged into the base weights; unmerge() them before "
                        f"saving, or save the merged model with save_pretrained")
    names = peft_names(model)
    first = next(iter(mods.values()))
    hyper = (first.r, first.alpha, first.rslora, _dropout(first))
    tensors: dict[str, Tensor] = {}
    chosen: dict[str, list[str]] = {}
    for name, m in mods.items():
        if (m.r, m.alpha, m.rslora, _dropout(m)) != hyper:
            raise LoraError(f"{name} has r={m.r}, alpha={m.alpha}, use_rslora={m.rslora} but "
                            f"{next(iter(mods))} has r={first.r}, alpha={first.alpha}, use_rslora={first.rslora}; "
                            f"a PEFT adapter file holds one setting")
        chosen[name] = sorted(m.slices, key=lambda role: m.slices[role])
        for role in chosen[name]:
            if (name, role) not in names:
                raise LoraError(f"{name} ({role}) has no Hugging Face module for a PEFT adapter to sit on "
                                f"(e.g. a router); leave it out of the targets to save in PEFT format")
            hf = names[name, role]
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A[role].detach().cpu().contiguous()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = m.lora_B[role].detach().cpu().contiguous()
    r, alpha, rslora, dropout = hyper
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "use_rslora": rslora, "target_modules": _target_modules(names, chosen), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False,
    }
    sidecar = {"lmstack_adapter": 1, "base_fingerprint": base_fingerprint(model), "modules": chosen}
    blob = save(tensors, metadata={"format": "pt"})
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"cannot save an adapter to {out}: it is a file, not a folder")
    atomic_write_bytes(out / ADAPTER_WEIGHTS, blob)
    atomic_write_json(out / SIDECAR, sidecar)
    atomic_write_json(out / ADAPTER_CONFIG, config)
    return out


def _dropout(m) -> float:
    return float(getattr(m.drop, "p", 0.0))


def _target_modules(names: dict[tuple[str, str], str], chosen: dict[str, list[str]]) -> list[str] | str:
    """PEFT's target_modules: leaf names (`q_proj`) when they select exactly the adapted
    modules, on every layer; else a regex that full-matches exactly the adapted modules."""
    picked = {names[n, role] for n, roles in chosen.items() for role in roles}
    leaves = {h.rsplit(".", 1)[-1] for h in picked}
    if {h for h in names.values() if h.rsplit(".", 1)[-1] in leaves} == picked:
        return sorted(leaves)
    return "(" + "|".join(re.escape(h) for h in sorted(picked)) + ")"


# ---- load ---------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Load a PEFT-format LoRA adapter folder into `model`; returns the adapted module names.

    Adds the adapters (add_lora with the folder's settings) when the model has none; if it
    has some, they must be the same modules, rank and scale. Every check runs before the
    model changes (model/peft_format.py reads and checks the folder)."""
    path = Path(path)
    adapter = read_peft_adapter(model, path)
    r, alpha, rslora = adapter.r, adapter.alpha, adapter.rslora
    selection = adapter.selection()
    existing = lora_modules(model)
    if existing:
        have = {n: set(m.slices) for n, m in existing.items()}
        first = next(iter(existing.values()))
        if have != selection or (first.r, first.scale) != (r, adapter.scale):
            raise LoraError(f"the model already has adapters (r={first.r}, scale={first.scale:g}, on {sorted(have)}) "
                            f"that differ from {path} (r={r}, lora_alpha={alpha}, use_rslora={rslora}, on "
                            f"{sorted(selection)}); load it into the base model instead")
    else:
        targets, exclude = _as_targets(model, selection, path)
        add_lora(model, LoraConfig(r=r, alpha=alpha, dropout=adapter.dropout, targets=targets, use_rslora=rslora,
                                   exclude=exclude))
    mods = lora_modules(model)
    with torch.no_grad():
        for (name, role), ab in adapter.pairs.items():
            mods[name].lora_A[role].copy_(ab["A"])
            mods[name].lora_B[role].copy_(ab["B"])
    return list(mods)


def _as_targets(model: nn.Module, selection: dict[str, set[str]], path: Path) -> tuple[list[str], list[str]]:
    """The adapted (module, roles) as add_lora targets: the roles, minus the linears left out
    (an adapter on some layers only). Roles that differ from layer to layer cannot be said so."""
    targets = [role for role in ROLES if any(role in s for s in selection.values())]
    found = find_linears(model, targets)
    exclude = [re.escape(t.name) for t in found if t.name not in selection]
    for t in found:
        if t.name in selection and set(t.slices or t.fused) != selection[t.name]:
            raise LoraError(f"{path} adapts {sorted(selection[t.name])} of {t.name} but {targets} elsewhere; "
                            f"adapters whose roles differ from layer to layer are not supported")
    return targets, exclude
