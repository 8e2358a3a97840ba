"""The linear-replacement seam: swap selected `nn.Linear` modules for other modules by name.

LoRA adapters and quantized linears change a model without forking it (STYLE.md §13): they
replace `nn.Linear` modules in place, and the replacement keeps the original's state-dict
names (`weight`, and `bias` where there was one) so a base checkpoint still loads into the
transformed model and the model file never learns the replacement exists.

    targets = find_linears(model, ["q", "v"])             # PEFT's default for Llama
    targets = find_linears(model, "all-linear")           # every linear but the LM head
    replace_linears(model, targets, lambda linear, target: MyLinear(linear, target.slices))

Names a target may use, matched against each linear of the Transformer:
  - a role: q k v o gate up down router lm_head (Llama's names; `q_proj`, `o_proj`,
    `gate_proj` ... are accepted too). Our projections are fused: `attn.qkv` holds the rows
    [q | k | v] and a SwiGLU `mlp.fc` holds [gate | up]. Asking for "q" and "v" selects the
    qkv linear once with those two row slices, so an adapter or a per-channel scale treats
    q, k and v as separate matrices, exactly as PEFT targets `q_proj` and `v_proj`.
  - a module name or a regular expression matched in full against module names
    (`blocks.0.attn.qkv`, `blocks\\.[0-3]\\..*`); a match selects the whole linear.
  - "all-linear": every linear but the LM head (PEFT's meaning of the word).
A target that matches nothing is an error that lists what would have matched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from lmstack.model.config import GATED_MLPS
from lmstack.utils import LmstackError

# role -> the role names of a fused linear's row slices it may be one of
ROLE_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}
ROLES = ("q", "k", "v", "o", "gate", "up", "down", "router", "lm_head")


class SeamError(LmstackError, ValueError):
    """A replacement target that matches nothing, or a replacement that breaks the contract."""


@dataclass(frozen=True)
class LinearTarget:
    """One linear selected for replacement.

    name:    its module name in the model (`blocks.0.attn.qkv`)
    slices:  the selected row slices of a fused linear, role -> (start, stop) in rows of
             `weight` (out_features); the whole linear when None
    fused:   every row slice the linear has (role -> (start, stop)), selected or not; a
             plain linear is one slice named by its role
    """
    name: str
    slices: dict[str, tuple[int, int]] | None
    fused: dict[str, tuple[int, int]]

    @property
    def roles(self) -> list[str]:
        return list(self.slices or self.fused)


def linear_roles(model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """Every `nn.Linear`-like module of a Transformer -> its row slices by role.

    `blocks.{i}.attn.qkv` -> {q: (0, H*D), k: (H*D, (H+KV)*D), v: ((H+KV)*D, (H+2KV)*D)};
    a cross-attention's `kv` -> {k: (0, KV*D), v: (KV*D, 2KV*D)} (its `q` is role q, as PEFT's
    "q" also selects T5's EncDecAttention.q); a gated `fc` -> {gate: (0, I), up: (I, 2I)};
    other linears are one slice named by role."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SeamError(f"replace_linears needs an lmstack Transformer (with .config), got {type(model).__name__}")
    H, KV, D, I = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if not _is_linear(module) or any(name.startswith(n + ".") for n in out):
            continue  # (a linear inside a replacement, e.g. the base a LoRA wraps, is not another target)
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if leaf == "qkv":
            out[name] = {"q": (0, H * D), "k": (H * D, (H + KV) * D), "v": ((H + KV) * D, (H + 2 * KV) * D)}
        elif leaf == "kv" and parent == "cross_attn":   # cross-attention: q alone, k and v fused
            out[name] = {"k": (0, KV * D), "v": (KV * D, 2 * KV * D)}
        elif leaf == "fc" and cfg.mlp in GATED_MLPS:
            out[name] = {"gate": (0, I), "up": (I, 2 * I)}
        else:
            rows = module.weight.shape[0]
            role = {"fc": "up", "router": "router", "lm_head": "lm_head"}.get(leaf)
            if leaf == "proj":
                role = "o" if parent in ("attn", "cross_attn") else "down"
            out[name] = {role or leaf: (0, rows)}
    return out


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a module that already replaced one (it carries `base_linear_shape`)."""
    return isinstance(module, nn.Linear) or hasattr(module, "base_linear_shape")


def find_linears(model: nn.Module, targets: str | Iterable[str], exclude: Iterable[str] = ()) -> list[LinearTarget]:
    """Resolve target names (see the module docstring) to the linears they select, in model order."""
    roles = linear_roles(model)
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise SeamError("no target modules given; pass roles such as ['q', 'v'], 'all-linear' or module names")
    chosen: dict[str, set[str] | None] = {}     # name -> selected roles (None = whole linear)
    for t in targets:
        if not isinstance(t, str) or not t:
            raise SeamError(f"target {t!r} must be a non-empty string")
        hits = _match(t, roles)
        if not hits:
            valid = sorted({r for sl in roles.values() for r in sl}) + ["all-linear"]
            raise SeamError(f"target {t!r} matches no linear of this model; roles here: {valid}, or a module "
                            f"name such as {next(iter(roles), '?')!r} (a regular expression matched in full)")
        for name, sel in hits.items():
            if sel is None or (name in chosen and chosen[name] is None):
                chosen[name] = None
            else:
                chosen[name] = (chosen.get(name) or set()) | sel
    excluded = {n for e in exclude for n in _match(e, roles)}
    result = []
    for name, fused in roles.items():            # model order
        if name not in chosen or name in excluded:
            continue
        sel = chosen[name]
        whole = sel is None or set(sel) == set(fused)
        slices = None if whole else {r: fused[r] for r in fused if r in sel}
        result.append(LinearTarget(name, slices, dict(fused)))
    if not result:
        raise SeamError(f"targets {targets} with exclude {list(exclude)} leave no linear to replace")
    return result


def _match(target: str, roles: dict[str, dict[str, tuple[int, int]]]) -> dict[str, set[str] | None]:
    """One target -> {module name: selected roles, None = whole linear}."""
    role = ROLE_ALIASES.get(target, target)
    if target == "all-linear":
        return {n: None for n, sl in roles.items() if "lm_head" not in sl}
    if role in ROLES:
        return {n: {role} for n, sl in roles.items() if role in sl}
    try:
        rx = re.compile(target)
    except re.error as e:
        raise SeamError(f"target {target!r} is neither a role {list(ROLES)} nor a valid regular expression "
                        f"({e})") from None
    return {n: None for n in roles if rx.fullmatch(n)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def replace_linears(model: nn.Module, targets: list[LinearTarget],
                    factory: Callable[[nn.Module, LinearTarget], nn.Module]) -> list[str]:
    """Replace each target by `factory(old_linear, target)`; returns the replaced names.

    The new module must keep the old one's state-dict names for its weight and bias (its
    own tensors come in addition) and expose `base_linear_shape` = (out_features,
    in_features) so later passes still recognise it as a linear. Checked before anything
    is replaced: a factory that breaks the contract leaves the model untouched."""
    built = []
    for t in targets:
        old = model.get_submodule(t.name)
        new = factory(old, t)
        if not isinstance(new, nn.Module):
            raise SeamError(f"factory returned {type(new).__name__} for {t.name}; it must return an nn.Module")
        old_keys = set(old.state_dict(keep_vars=True))
        new_keys = set(new.state_dict(keep_vars=True))
        missing = sorted(old_keys - new_keys)
        if missing:
            raise SeamError(f"replacement {type(new).__name__} for {t.name} drops the state-dict name(s) {missing}; "
                            f"keep the base weight's name so base checkpoints still load")
        if not hasattr(new, "base_linear_shape"):
            raise SeamError(f"replacement {type(new).__name__} for {t.name} has no base_linear_shape attribute")
        built.append((t.name, new))
    for name, new in built:
        set_module(model, name, new)
    return [name for name, _ in built]
