"""Weight pruning: magnitude (unstructured) and 2:4 semi-structured, in place, recorded.

    masks = prune_model(model, PruneConfig("magnitude", sparsity=0.5))   # half of each linear's weights -> 0
    masks = prune_model(model, PruneConfig("2:4"))     # 2 of every 4 consecutive inputs -> 0 (Ampere's format)
    hold_masks(model)                                  # then a short recovery finetune with the one Trainer:
    Trainer(cfg, model, objective, batches).fit()      # pruned weights stay exactly 0

magnitude  per layer: the round(sparsity * out * in) weights of smallest |w| become 0
           (ties at equal |w|: the earlier weight in row-major order goes first).
2:4        in every group of 4 consecutive input weights of a row (w[o, 4j:4j+4]) the two of
           largest |w| are kept (ties: the earlier input stays); sparsity is 0.5 by construction
           and in_features must be a multiple of 4.

The weights are multiplied by their masks in place and the run records
{"kind": "prune", "method", "sparsity", "targets", "exclude", "modules"} (model/pruned.py), so
`save_pretrained` writes the zeros and any loader reloads the run. Masks (True = kept) are
returned; after a reload `pruning_masks(model)` recovers them from the zeros.

Recovery finetune. `hold_masks` registers a gradient hook on each pruned weight that
multiplies its gradient by the mask. A pruned weight then starts at 0 with gradient 0 at every
step, so AdamW's moments for it stay 0, its update m / (sqrt(v) + eps) is 0, and decoupled
weight decay of 0 is 0: it stays exactly 0 through the Trainer (clipping only rescales a 0).
This holds for one process and DDP (hooks run before gradients are reduced); an optimizer
state carried over from before pruning would move them, and FSDP's flattened parameters do
not run these hooks.

Quantizing a pruned model keeps its zeros with RTN (0.0 is on every grid); GPTQ's error
feedback writes into them (SparseGPT's joint prune-and-quantize is not done here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmstack.model.pruned import PRUNE_METHODS, PruneError
from lmstack.model.quantized import QuantLinear
from lmstack.model.replace import find_linears
from lmstack.model.transforms import get_transforms, record_transform
from lmstack.utils.hooks import HookHandles


@dataclass(frozen=True)
class PruneConfig:
    method: str = "magnitude"               # magnitude | 2:4
    sparsity: float = 0.5                   # fraction of each layer's weights set to 0 (2:4: 0.5)
    targets: str | tuple[str, ...] = "all-linear"
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in PRUNE_METHODS:
            raise PruneError(f"PruneConfig.method={self.method!r} is unknown; choose one of {PRUNE_METHODS}")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise PruneError(f"PruneConfig.sparsity={s!r} must be a number in [0, 1) (the fraction of weights set "
                             f"to 0; 1 would remove the layer)")
        if self.method == "2:4" and s != 0.5:
            raise PruneError(f"PruneConfig.sparsity={s!r} with method='2:4'; 2:4 keeps 2 of every 4 weights, so its "
                             f"sparsity is 0.5")
        object.__setattr__(self, "sparsity", float(s))
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise PruneError(f"PruneConfig.targets={self.targets!r} must be a name or a list of names")
        object.__setattr__(self, "targets", self.targets if isinstance(self.targets, str) else targets)
        object.__setattr__(self, "exclude", tuple(self.exclude))


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """(out, in) bool, False at the round(sparsity * numel) entries of smallest |w|."""
    k = round(sparsity * w.numel())
    order = torch.sort(w.detach().abs().flatten(), stable=True).indices     # ascending |w|, ties by index
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    keep[order[:k]] = False
    return keep.view_as(w)


def semi_structured_mask(w: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """(out, in) bool keeping the n of largest |w| in every m consecutive inputs of a row."""
    out_f, in_f = w.shape
    groups = w.detach().abs().reshape(out_f, in_f // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices   # ties: earlier input first
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.view(out_f, in_f)


def _check(model: nn.Module, cfg: PruneConfig) -> list[str]:
    if not isinstance(cfg, PruneConfig):
        raise PruneError(f"prune_model needs a PruneConfig, got {type(cfg).__name__}")
    targets = find_linears(model, cfg.targets, cfg.exclude)
    for t in targets:
        lin = model.get_submodule(t.name)
        if isinstance(lin, QuantLinear):
            raise PruneError(f"{t.name} is quantized ({type(lin).__name__}); prune the float model, then quantize")
        if type(lin) is not nn.Linear:
            raise PruneError(f"{t.name} is a {type(lin).__name__}, not an nn.Linear; prune the base model before "
                             f"adding adapters or fake quantization")
        if t.slices is not None:
            raise PruneError(f"target roles {t.roles} select only some rows of the fused linear {t.name}; pruning "
                             f"works on whole linears, so target all of {list(t.fused)} or {t.name!r}")
        if t.name == "lm_head" and model.config.tie_embeddings:
            raise PruneError("lm_head shares its weight with the token embedding (tie_embeddings=True); pruning "
                             "it would prune the embedding too, so leave it out ('all-linear' does)")
        if cfg.method == "2:4" and lin.in_features % 4:
            raise PruneError(f"{t.name}: 2:4 pruning needs in_features divisible by 4, got {lin.in_features}")
    return [t.name for t in targets]


@torch.no_grad()
def prune_model(model: nn.Module, cfg: PruneConfig, record: bool = True) -> dict[str, Tensor]:
    """Zero the pruned weights of the targeted linears in place; returns {name: mask}
    (bool (out, in), True = kept), in model order. Every target is checked first."""
    names = _check(model, cfg)
    masks = {}
    for n in names:
        w = model.get_submodule(n).weight
        masks[n] = magnitude_mask(w, cfg.sparsity) if cfg.method == "magnitude" else semi_structured_mask(w)
    for n, mask in masks.items():
        model.get_submodule(n).weight.mul_(mask)
    if record:
        targets = [cfg.targets] if isinstance(cfg.targets, str) else list(cfg.targets)
        record_transform(model, {"kind": "prune", "method": cfg.method, "sparsity": cfg.sparsity,
                                 "targets": targets, "exclude": list(cfg.exclude), "modules": names})
    return masks


def pruning_masks(model: nn.Module) -> dict[str, Tensor]:
    """{name: weight != 0} for every linear a "prune" record names (e.g. after a reload)."""
    names = [n for r in get_transforms(model) if r.get("kind") == "prune" for n in r["modules"]]
    if not names:
        raise PruneError("the model carries no 'prune' transform; call prune_model first")
    found = {t.name for t in find_linears(model, [re.escape(n) for n in dict.fromkeys(names)])}
    return {n: model.get_submodule(n).weight.detach() != 0 for n in dict.fromkeys(names) if n in found}


def hold_masks(model: nn.Module, masks: dict[str, Tensor] | None = None) -> HookHandles:
    """Keep pruned weights at 0 while training: zero their gradients (see the module
    docstring). `masks`: what prune_model returned (default: pruning_masks(model))."""
    masks = pruning_masks(model) if masks is None else masks
    handles = []
    for n, mask in masks.items():
        w = model.get_submodule(n).weight
        if tuple(mask.shape) != tuple(w.shape):
            raise PruneError(f"mask for {n} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
        keep = mask.to(device=w.device, dtype=w.dtype)
        handles.append(w.register_hook(lambda g, keep=keep: g * keep.to(g.device, g.dtype)))
    return HookHandles(handles)


def sparsity_of(model: nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Fraction of exact zeros in the weight of each named linear (default: every pruned one)."""
    names = list(pruning_masks(model)) if names is None else names
    return {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in names}
