"""LoRA adapters on disk in PEFT's format, so adapters move both ways between lmstack and PEFT.

    save_adapter(model, "out/adapter")     # PeftModel.from_pretrained(hf_model, "out/adapter") loads it
    load_adapter(model, "peft/adapter")    # a folder made by us or by PEFT; adds the adapters if absent

A folder holds
    adapter_config.json          PEFT's LoraConfig: r, lora_alpha, lora_dropout, use_rslora,
                                 target_modules (Hugging Face names), bias "none", peft_type "LORA" ...
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in)
                                 base_model.model.<HF module>.lora_B.weight (out, r)
    lmstack_adapter.json         ours only (PEFT never reads it): the base fingerprint, a hash of
                                 the base's tensor names and shapes, so an adapter trained on
                                 another base is refused by name rather than loaded into the
                                 wrong shapes or silently into the wrong model.
PEFT adapts q_proj, k_proj, v_proj as separate linears; our fused qkv holds one adapter per
row slice (model/lora.py), so each slice is one PEFT module, tensors unchanged.

Everything is checked before anything changes: the folder's fields, every tensor name (it
must name a linear of this model), every shape, the fingerprint. Files are written each
atomically, the config last (a reader that finds the config finds whole weights).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.finetune.lora import LoraConfig, LoraError, add_lora, lora_modules
from lmstack.model.hf_config import pick_family
from lmstack.model.hf_names import hf_name_table
from lmstack.model.replace import ROLES, find_linears, linear_roles
from lmstack.utils import LmstackError, atomic_write_bytes, atomic_write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "lmstack_adapter.json"
PREFIX = "base_model.model."          # PEFT's PeftModel -> LoraModel -> the HF model
SUFFIX = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# PEFT features that change what the tensors mean; an adapter using one is refused by name
PEFT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")   # HF families whose projections are plain linears
UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias",
               "use_qalora", "target_parameters", "trainable_token_indices", "fan_in_fan_out")


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model's tensor names and shapes, the same with or without
    adapters, quantized linears, or another dtype (a linear counts as its (out, in) weight)."""
    roles = linear_roles(model)
    entries: dict[str, list[int]] = {}
    for name in roles:
        mod = model.get_submodule(name)
        entries[name + ".weight"] = list(getattr(mod, "base_linear_shape", None) or mod.weight.shape)
        if getattr(mod, "bias", None) is not None:
            entries[name + ".bias"] = list(mod.bias.shape)
    inside = tuple(n + "." for n in roles)
    for key, t in model.state_dict(keep_vars=True).items():
        if not key.startswith(inside):
            entries[key] = list(t.shape)
    return hashlib.sha256(json.dumps(sorted(entries.items())).encode()).hexdigest()[:16]


def peft_names(model: nn.Module) -> dict[tuple[str, str], str]:
    """(our linear, role) -> the HF module PEFT keys its adapter by, for every row slice of
    every linear: ("blocks.3.attn.qkv", "q") -> "model.layers.3.self_attn.q_proj". From
    model/hf_names.py's table for the family export_hf would write."""
    cfg = model.config
    family = pick_family(cfg)
    if family not in PEFT_FAMILIES:
        raise LoraError(f"PEFT adapter files are supported for Hugging Face families {list(PEFT_FAMILIES)}; this "
                        f"model exports as {family!r}")
    try:
        table = hf_name_table(cfg, family)
    except LmstackError as e:
        raise LoraError(f"PEFT adapter files use Hugging Face module names, and this model has none: {e}") from None
    names = {(e.ours.removesuffix(".weight"), p.role): p.name.removesuffix(".weight")
             for e in table if e.ours.endswith(".weight") for p in e.parts if p.role}
    names["lm_head", "lm_head"] = "lm_head"  # a tied head stores no tensor of its own, but it is a module
    return names


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
    model changes."""
    path = Path(path)
    cfg = _read_config(path)
    tensors = _read_weights(path)
    side = _read_sidecar(path)
    if side is not None:
        fp = base_fingerprint(model)
        if side.get("base_fingerprint") != fp:
            raise LoraError(f"{path} was trained on another base model (base fingerprint "
                            f"{side.get('base_fingerprint')!r}, this model {fp!r}: the tensor names or shapes differ)")
    r, alpha, rslora = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora", False))
    pairs = _match_tensors(model, tensors, r, path)
    selection: dict[str, set[str]] = {}
    for name, role in pairs:
        selection.setdefault(name, set()).add(role)

    existing = lora_modules(model)
    if existing:
        have = {n: set(m.slices) for n, m in existing.items()}
        first = next(iter(existing.values()))
        if have != selection or (first.r, first.scale) != (r, LoraConfig(r, alpha, use_rslora=rslora).scale):
            raise LoraError(f"the model already has adapters (r={first.r}, scale={first.scale:g}, on {sorted(have)}) "
                            f"that differ from {path} (r={r}, lora_alpha={alpha}, use_rslora={rslora}, on "
                            f"{sorted(selection)}); load it into the base model instead")
    else:
        targets, exclude = _as_targets(model, selection, path)
        config = LoraConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=targets,
                            use_rslora=rslora, exclude=exclude)
        add_lora(model, config)
    mods = lora_modules(model)
    with torch.no_grad():
        for (name, role), ab in pairs.items():
            mods[name].lora_A[role].copy_(ab["A"])
            mods[name].lora_B[role].copy_(ab["B"])
    return list(mods)


def _read_config(path: Path) -> dict:
    f = path / ADAPTER_CONFIG
    if not f.is_file():
        raise LoraError(f"no {ADAPTER_CONFIG} in {path}; expected a PEFT LoRA adapter folder (save_adapter or "
                        f"PeftModel.save_pretrained)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise LoraError(f"{f} has peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}; "
                        f"only LoRA adapters (peft_type 'LORA') are supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LoraError(f"{f} has r={r!r}; expected a positive int")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise LoraError(f"{f} has lora_alpha={alpha!r}; expected a number > 0")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{f} has bias={cfg['bias']!r}; only bias 'none' is supported (adapters train no biases)")
    for key in UNSUPPORTED:
        if cfg.get(key):
            raise LoraError(f"{f} uses {key}={cfg[key]!r}, a PEFT feature lmstack does not support; "
                            f"only plain LoRA (and rsLoRA) adapters load")
    return cfg


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    f = path / ADAPTER_WEIGHTS
    if not f.is_file():
        pickled = (path / "adapter_model.bin").exists()
        raise LoraError(f"no {ADAPTER_WEIGHTS} in {path}" + ("; adapter_model.bin is a pickle, which lmstack never "
                        "loads: re-save it with safe_serialization=True" if pickled else ""))
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own types for damaged files
        raise LoraError(f"cannot read {f}: {e}; the file is damaged or not safetensors") from None


def _read_sidecar(path: Path) -> dict | None:
    f = path / SIDECAR
    if not f.exists():
        return None  # an adapter made by PEFT: only names and shapes are checked
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{f} is not valid JSON ({e})") from None


def _match_tensors(model: nn.Module, tensors: dict[str, Tensor], r: int, path: Path) -> dict:
    """Adapter tensors -> {(our module, role): {"A": (r, in), "B": (rows, r)}}, all names and
    shapes checked against the model."""
    roles = linear_roles(model)
    names = peft_names(model)
    by_hf = {hf: ours for ours, hf in names.items()}
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        end = next((s for s in SUFFIX if key.endswith(s)), None)
        if not key.startswith(PREFIX) or end is None:
            raise LoraError(f"{path / ADAPTER_WEIGHTS} has tensor {key!r}; expected PEFT LoRA names "
                            f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
        hf = key[len(PREFIX):-len(end)]
        if hf not in by_hf:
            raise LoraError(f"{path}: adapter tensor {key!r} is for module {hf!r}, which this model does not have "
                            f"(it has e.g. {next(iter(by_hf), '?')!r}); the adapter was made for another base")
        pairs.setdefault(by_hf[hf], {})[SUFFIX[end]] = t
    if not pairs:
        raise LoraError(f"{path / ADAPTER_WEIGHTS} holds no adapter tensors")
    for (name, role), ab in pairs.items():
        hf = names[name, role]
        a, b = roles[name][role]
        mod = model.get_submodule(name)
        in_f = (getattr(mod, "base_linear_shape", None) or mod.weight.shape)[1]
        for part, want in (("A", (r, in_f)), ("B", (b - a, r))):
            if part not in ab:
                raise LoraError(f"{path}: {hf} ({name}, {role}) has no lora_{part} tensor; the file is incomplete")
            if tuple(ab[part].shape) != want:
                raise LoraError(f"{path}: lora_{part} of {hf} ({name}, {role}) has shape {tuple(ab[part].shape)}, "
                                f"this model needs {want} (r={r}); the adapter was made for another base or rank")
    return pairs


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
