"""Scalar heads: a Transformer whose LM head is replaced by a linear to one score per position
(reward models, PPO value models), recorded as the "score_head" transform so a saved reward
model loads back with `Transformer.from_pretrained`.

    rm = add_score_head(Transformer.from_pretrained("runs/sft"))   # lm_head: n_embd -> 1
    scores = rm(ids, logits_indices=last)                           # (N, 1): the score at each index

The seam is the LM head itself (STYLE.md §13): everything below it is untouched, so the
score at position t reads the final hidden state after norm_f there, exactly as HF's
`AutoModelForSequenceClassification` does. A tied LM head shares wte's weight; the score
head is a new tensor, so the model's config says tie_embeddings=False from then on.
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.model.transforms import get_transforms, record_transform, register_transform
from lmstack.utils import LmstackError

KIND = "score_head"


def has_score_head(model: nn.Module) -> bool:
    return any(r.get("kind") == KIND for r in get_transforms(model))


def _replace_head(model: nn.Module, n_out: int) -> None:
    cfg = model.config
    if cfg.tie_embeddings:                   # untie: the head gets a tensor of its own
        model.config = cfg.replace(tie_embeddings=False)
    head = nn.Linear(cfg.n_embd, n_out, bias=False)
    old = model.lm_head.weight
    head.to(device=old.device, dtype=old.dtype)
    nn.init.normal_(head.weight, std=1.0 / (cfg.n_embd + 1) ** 0.5)   # TRL/HF's score-head init scale
    model.lm_head = head


def add_score_head(model: nn.Module, n_out: int = 1) -> nn.Module:
    """Replace `model.lm_head` (n_embd -> vocab) by a fresh linear n_embd -> n_out, in place."""
    if not hasattr(model, "lm_head") or not hasattr(model, "config"):
        raise LmstackError(f"add_score_head needs an lmstack Transformer (lm_head + config), "
                           f"got {type(model).__name__}")
    if has_score_head(model):
        raise LmstackError("the model already has a score head")
    if not isinstance(n_out, int) or n_out < 1:
        raise LmstackError(f"add_score_head: n_out={n_out!r} must be a positive int")
    _replace_head(model, n_out)
    record_transform(model, {"kind": KIND, "n_out": n_out})
    return model


def _rebuild(model: nn.Module, record: dict) -> None:
    _replace_head(model, int(record["n_out"]))


@torch.no_grad()
def last_token_indices(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Flat indices b * T + lengths[b] - 1 of each row's last real token (right padding)."""
    return torch.arange(lengths.numel(), device=lengths.device) * T + lengths - 1


register_transform(KIND, _rebuild)
