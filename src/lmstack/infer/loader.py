"""Resolve what `LLM(model, tokenizer=...)` was given into (model, tokenizer, eos id).

`model` may be a run directory (tokenizer.json + our model.safetensors/config.json), a
Hugging Face checkpoint folder (config.json + *.safetensors, tokenizer.json if present), or
an in-memory `Transformer` (then pass `tokenizer=` for text prompts; token-id prompts work
without one).

A model's vocab may be larger than its tokenizer's: checkpoints pad the embedding to a
multiple of 64 or 128 (fast matmuls) or reserve ids for later. Those ids can be sampled;
they decode to no text (detokenizer.py). Loading such a model logs one warning.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lmstack.utils import LmstackError

log = logging.getLogger("lmstack.infer")


def model_config(model: torch.nn.Module):
    """The model's ModelConfig (our Transformer keeps it as `.config`; `.cfg` also accepted)."""
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "context_length"):
        raise LmstackError(f"{type(model).__name__} has no ModelConfig (.config with context_length); "
                           f"pass an lmstack Transformer or a model directory")
    return cfg


def _eos_from_hf_config(path: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if isinstance(eos, int):
                return eos
    return None


def load(model, tokenizer=None, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Return (model in eval mode on device/dtype, tokenizer or None, eos_token_id or None)."""
    eos = None
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_dir():
            raise LmstackError(f"model path {str(path)!r} does not exist or is not a directory; pass a run "
                               f"directory (runs/NAME), a Hugging Face checkpoint folder, or a Transformer")
        if not (path / "config.json").is_file():
            raise LmstackError(f"{path} has no config.json; it is not a run directory or a Hugging Face "
                               f"checkpoint folder (expected config.json + model.safetensors)")
        from lmstack.model import Transformer
        model = Transformer.from_pretrained(path, device=device, dtype=dtype)
        if tokenizer is None and (path / "tokenizer.json").is_file():
            from lmstack.tokenizer import Tokenizer
            tokenizer = Tokenizer.load(path / "tokenizer.json")
        eos = _eos_from_hf_config(path)
    elif not isinstance(model, torch.nn.Module):
        raise LmstackError(f"LLM(model=...) takes a path or a Transformer, got {type(model).__name__}")
    model_config(model)
    if device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if eos is None and tokenizer is not None and getattr(tokenizer, "eot_token", None) is not None:
        eos = tokenizer.eot_token
    _check_vocab(model_config(model).vocab_size, tokenizer)
    return model, tokenizer, eos


def _check_vocab(vocab_size: int, tokenizer) -> None:
    n_vocab = getattr(tokenizer, "n_vocab", None)
    if isinstance(n_vocab, int) and vocab_size > n_vocab:
        log.warning("the model's vocab_size=%d is larger than its tokenizer's n_vocab=%d: ids %d..%d have no "
                    "text and decode to nothing if sampled (a padded vocabulary)",
                    vocab_size, n_vocab, n_vocab, vocab_size - 1)
