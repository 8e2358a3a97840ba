"""Reading LoRA adapters in PEFT's folder format: what the engine needs to load one, at floor 1.

    adapter = read_peft_adapter(model, "peft/adapter")   # every check below, nothing changed
    adapter.pairs[("blocks.3.attn.qkv", "q")]            # {"A": (r, in), "B": (rows, r)}
    adapter.r, adapter.alpha, adapter.rslora, adapter.scale

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

Reading checks the folder's fields, every tensor name (it must name a linear of this model),
every shape, and the fingerprint, and returns the tensors; it never touches the model. Two
users: finetune.load_adapter (floor 3) puts them into trainable LoRALinears, the engine's
multi-adapter serving (infer/lora.py, floor 2) into MultiLoRALinears. Writing adapters is
training's job (finetune/adapters.py), with the names and constants defined here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from lmstack.model.hf_config import pick_family
from lmstack.model.hf_names import hf_name_table
from lmstack.model.lora import lora_scale
from lmstack.model.replace import linear_roles
from lmstack.utils import LmstackError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "lmstack_adapter.json"
PREFIX = "base_model.model."          # PEFT's PeftModel -> LoraModel -> the HF model
SUFFIX = {".lora_A.weight": "A", ".lora_B.weight": "B"}
PEFT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")   # HF families whose projections are plain linears
# PEFT features that change what the tensors mean; an adapter using one is refused by name
UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias",
               "use_qalora", "target_parameters", "trainable_token_indices", "fan_in_fan_out")


class LoraError(LmstackError, ValueError):
    """Bad LoRA settings, or an adapter that does not fit the model."""


@dataclass
class PeftAdapter:
    """One PEFT adapter folder's contents, checked against a model."""
    path: Path
    config: dict                                       # adapter_config.json
    pairs: dict[tuple[str, str], dict[str, Tensor]]    # (our linear, role) -> {"A": (r, in), "B": (rows, r)}

    @property
    def r(self) -> int:
        return self.config["r"]

    @property
    def alpha(self) -> float:
        return self.config["lora_alpha"]

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def dropout(self) -> float:
        return float(self.config.get("lora_dropout") or 0.0)

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)

    def selection(self) -> dict[str, set[str]]:
        """Adapted linear -> its adapted roles."""
        out: dict[str, set[str]] = {}
        for name, role in self.pairs:
            out.setdefault(name, set()).add(role)
        return out


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


def read_peft_adapter(model: nn.Module, path: str | Path) -> PeftAdapter:
    """Read and check the PEFT adapter folder `path` against `model` (left unchanged)."""
    path = Path(path)
    cfg = _read_config(path)
    tensors = _read_weights(path)
    side = _read_sidecar(path)
    if side is not None:
        fp = base_fingerprint(model)
        if side.get("base_fingerprint") != fp:
            raise LoraError(f"{path} was trained on another base model (base fingerprint "
                            f"{side.get('base_fingerprint')!r}, this model {fp!r}: the tensor names or shapes differ)")
    return PeftAdapter(path, cfg, _match_tensors(model, tensors, cfg["r"], path))


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
