"""What the Trainer trains: the `model` argument resolved to a module, the default pretraining
objective, and the checks that model, objective and data fit each other (before step 1).

    model = an nn.Module      used as is (perhaps transformed, perhaps partly frozen); checked
                              against the objective's mask and the data's vocabulary
          = a ModelConfig     built, with the objective's mask and the vocabulary it needs
          = None              cfg.model: a preset + cfg.model_overrides, or a model dir to continue
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmstack.train.config import TrainConfig
from lmstack.train.objectives import Objective, build_objective
from lmstack.utils import LmstackError


def check_seq_len(seq_len: int, mcfg, fix: str) -> None:
    if mcfg is not None and seq_len > mcfg.context_length:
        raise LmstackError(f"seq_len={seq_len} exceeds the model's context_length={mcfg.context_length}; "
                           f"lower --seq-len or {fix}")


def preflight(cfg: TrainConfig) -> None:
    """The checks that need no data: a known preset, valid overrides, seq_len within the
    context. The CLI runs them before it builds a default corpus."""
    from lmstack.model import ModelConfig
    if Path(cfg.model).is_dir():
        return                       # the model dir's config is read (and checked) by the Trainer
    try:
        mcfg = ModelConfig.preset(cfg.model, **cfg.model_overrides)
    except (ValueError, TypeError) as e:
        raise LmstackError(str(e)) from None
    check_seq_len(cfg.seq_len, mcfg, f"set model_overrides: {{context_length: {cfg.seq_len}}}")


def build_model(cfg: TrainConfig, given, objective: Objective | None, n_vocab: int | None,
                specials: dict) -> tuple[nn.Module, Objective]:
    """(the model to train, on CPU; the objective: `objective`, else cfg.objective's)."""
    from lmstack.model import ModelConfig, build_model as build_arch, from_pretrained
    init = None
    if isinstance(given, ModelConfig):
        mcfg = given
    elif isinstance(given, nn.Module):
        mcfg = getattr(given, "config", None)
    elif Path(cfg.model).is_dir():  # continue from a saved model (ours or Hugging Face's)
        init = from_pretrained(cfg.model, dtype=torch.float32)
        mcfg = init.config
    else:
        over = dict(cfg.model_overrides)
        if n_vocab is not None:
            over.setdefault("vocab_size", n_vocab)
        mcfg = ModelConfig.preset(cfg.model, **over)
    vocab = n_vocab if n_vocab is not None else getattr(mcfg, "vocab_size", 0)
    if objective is None:
        objective, need_vocab = build_objective(cfg.objective, specials, vocab, cfg.mask_prob)
    else:
        need_vocab = vocab
    mask = objective.model_mask
    arch = getattr(objective, "model_arch", None)     # an objective for another architecture type (span)
    check_seq_len(cfg.seq_len, mcfg, f"set model_overrides: {{context_length: {cfg.seq_len}}}")
    if isinstance(given, nn.Module):  # the caller's model is used as is: check it fits
        if mcfg is not None and mask is not None and mcfg.mask != mask:
            raise LmstackError(f"the objective {objective.name!r} needs a model with mask={mask!r}, but the model "
                               f"passed in has mask={mcfg.mask!r}; build it with mask={mask!r}")
        if mcfg is not None and arch is not None and mcfg.arch != arch:
            raise LmstackError(f"the objective {objective.name!r} needs a model with arch={arch!r}, but the model "
                               f"passed in has arch={mcfg.arch!r}")
        if mcfg is not None and need_vocab > mcfg.vocab_size:
            raise LmstackError(f"the data needs vocab_size >= {need_vocab} but the model passed in has "
                               f"vocab_size={mcfg.vocab_size}; build it with a larger vocabulary")
        return given, objective
    changes = {"mask": mask} if mask is not None else {}
    if arch is not None and mcfg.arch != arch:
        changes["arch"] = arch
        if arch == "encoder-decoder" and not mcfg.n_encoder_layer:
            changes["n_encoder_layer"] = mcfg.n_layer       # a decoder preset: an encoder as deep
    if need_vocab > mcfg.vocab_size:
        changes["vocab_size"] = need_vocab
    if init is not None and all(getattr(mcfg, k) == v for k, v in changes.items()):
        return init, objective       # keeps its transforms and which parameters are frozen
    raw = build_arch(mcfg.replace(**changes))
    if init is not None:
        try:
            raw.load_state_dict(init.state_dict())
        except RuntimeError as e:
            raise LmstackError(f"cannot continue from {cfg.model} with objective {cfg.objective!r} (it changes "
                               f"{sorted(changes)}): {str(e).splitlines()[0]}") from None
    return raw, objective
