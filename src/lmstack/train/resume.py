"""Which weights a run trains and saves, and the checks that a checkpoint fits the run resuming it.

A model handed to the Trainer may be partly frozen (`requires_grad=False`): a LoRA base, a
quantized base, everything but the last block. Only trainable parameters get AdamW state.
With `save_weights="trainable"` a checkpoint stores only those tensors; the frozen base
comes from the caller on resume. So the checkpoint records a fingerprint of that base and
resume refuses a different one (another seed, another pretrained model, other transforms)
with a one-line error instead of silently training adapters on the wrong weights.

The fingerprint hashes each frozen tensor's name, shape and dtype and a fixed sample of its
values (up to 64 evenly spaced elements, converted to float64 exactly): cheap on any model
size, identical on CPU and GPU (no reduction whose order could differ), and different for
any two bases that differ in more than a few scattered elements.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from lmstack.utils import LmstackError

SAVE_WEIGHTS = ("all", "trainable")
_SAMPLE = 64


def trainable_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that require grad (both names of a tied parameter)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def frozen_fingerprint(model: nn.Module, trainable: set[str]) -> str:
    """sha256 over every state-dict tensor that is not trainable (frozen params and buffers)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in trainable:
            continue
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.reshape(-1)
        if flat.numel():
            idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLE, flat.numel()), dtype=torch.float64)
            sample = flat[idx.round().long().to(flat.device)].to(torch.float64).cpu()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _names(names, n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _with_defaults(saved: dict) -> dict:
    """A saved model config with the fields this lmstack added since filled in by their
    defaults (rebuilt through ModelConfig), so a new field does not make old runs unresumable."""
    from lmstack.model import ModelConfig
    try:
        return ModelConfig.from_dict(saved).to_dict()
    except (ValueError, TypeError):   # e.g. a field this lmstack does not know: compare as saved
        return saved


def check_checkpoint_fits(path, meta: dict, model_config: dict | None, tokenizer_id: str | None,
                          trainable: set[str], fingerprint: str) -> None:
    """Raise a one-line LmstackError when checkpoint `path` (its state.json `meta`) cannot be
    resumed by this run: another model config, tokenizer, set of trainable parameters or base."""
    saved = meta.get("model_config")
    if saved and model_config is not None:
        saved = _with_defaults(saved)
        diff = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
        if diff:
            pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {model_config.get(k)!r}" for k in diff)
            raise LmstackError(f"cannot resume {path}: it was trained with another model config ({pairs}); use "
                               f"the same model settings or a new --out")
    if meta.get("tokenizer") and tokenizer_id and meta["tokenizer"] != tokenizer_id:
        raise LmstackError(f"cannot resume {path}: it was trained on data from another tokenizer than this "
                           f"run's; use the run's original --data or a new --out")
    if "trainable" in meta and set(meta["trainable"]) != trainable:
        was, now = set(meta["trainable"]), trainable
        raise LmstackError(f"cannot resume {path}: it trained other parameters (only in the checkpoint: "
                           f"{_names(was - now) or '-'}; only in this model: {_names(now - was) or '-'}); freeze "
                           f"the same parameters as the original run or use a new --out")
    if meta.get("save_weights") == "trainable" and meta.get("frozen_fingerprint") != fingerprint:
        raise LmstackError(f"cannot resume {path}: it holds only the trainable weights and was trained on "
                           f"another frozen base (fingerprint {str(meta.get('frozen_fingerprint'))[:12]}, the "
                           f"model passed in has {fingerprint[:12]}); pass the same base model (same weights "
                           f"and transforms) or use a new --out")
