"""AdamW with parameter groups, and learning-rate schedules.

Weight decay pulls weights towards zero; that is a prior on the matrices of linear layers,
not on gains and shifts. So norms' weights, biases (every parameter with fewer than 2 dims)
and embeddings (nn.Embedding tables, incl. a tied LM head that shares one) get no decay.

Schedules return a multiplier of the peak lr for optimizer step `step` (0-based, the step
about to be taken), so resuming needs nothing but the step number:

    cosine  linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio`
    linear  linear warmup, then linear from 1 down to `min_ratio`
    wsd     warmup-stable-decay: warmup, hold 1, then decay linearly to `min_ratio` over
            the last `decay_frac` of the steps (MiniCPM, arXiv:2404.06395)
    constant  warmup, then 1
"""
from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices of linear layers (decayed) and everything else (not decayed)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.add(id(module.weight))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in no_decay_ids or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel where torch has one (CUDA, and CPU in torch>=2.4)."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = all(p.dtype.is_floating_point for g in groups for p in g["params"])
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    except (RuntimeError, TypeError):  # an older torch or a device without a fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_multiplier(step: int, max_steps: int, schedule: str = "cosine", warmup: int = 0,
                  min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Multiplier of the peak lr at 0-based optimizer step `step`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * max_steps))
        start = max(warmup, max_steps - decay_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / max(1, max_steps - start))
        return 1.0 - (1.0 - min_ratio) * progress
    span = max(1, max_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)  # 0 at the first step after warmup, 1 at the last
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
