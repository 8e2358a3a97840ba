"""Resolve what `LLM(model, tokenizer=...)` was given into (model, tokenizer, eos id).

`model` may be a run directory (tokenizer.json + our model.safetensors/config.json), a
training checkpoint inside one (RUN/checkpoints/step_N: model.safetensors + state.json, which
holds the model config; the tokenizer is the run's, found by the hash the checkpoint
records), a Hugging Face checkpoint folder (config.json + *.safetensors, tokenizer.json if
present), or an in-memory `Transformer` (then pass `tokenizer=` for text prompts; token-id
prompts work without one).

A model's vocab may be larger than its tokenizer's: checkpoints pad the embedding to a
multiple of 64 or 128 (fast matmuls) or reserve ids for later. Those ids can be sampled;
they decode to no text (detokenizer.py). Loading such a model logs one warning.
"""
from __future__ import annotations

import hashlib
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
        tokenizer_file = path / "tokenizer.json"
        if not (path / "config.json").is_file() and (path / "state.json").is_file():
            model, tokenizer_file = _load_training_checkpoint(path)
        elif not (path / "config.json").is_file():
            raise LmstackError(f"{path} has no config.json; it is not a run directory, a checkpoint "
                               f"(RUN/checkpoints/step_N) or a Hugging Face checkpoint folder (expected "
                               f"config.json + model.safetensors)")
        else:
            from lmstack.model import Transformer
            model = Transformer.from_pretrained(path, device=device, dtype=dtype)
        if tokenizer is None and tokenizer_file is not None and tokenizer_file.is_file():
            from lmstack.tokenizer import Tokenizer
            tokenizer = Tokenizer.load(tokenizer_file)
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


def _load_training_checkpoint(path: Path):
    """(model, its tokenizer.json or None) from a trainer checkpoint (train/checkpoint.py's
    layout: weights in model.safetensors, tied tensors stored once and named in state.json's
    `aliases`, the model config in its `model_config`). The tokenizer is looked for in the
    checkpoint, its run directory (two levels up) and the data directory it was trained on.
    The checkpoint's `tokenizer` is the file's SHA-256 (64 hex digits) when training was fed
    batches, else the shards' encoding fingerprint, which the trainer already checked against
    the run's tokenizer on every resume: a SHA-256 must match, a fingerprint takes the first
    tokenizer.json found."""
    from safetensors.torch import load_file

    from lmstack.model import ModelConfig, build_model
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "model.safetensors"))
    except Exception as e:   # a damaged file: json or safetensors errors of several types
        raise LmstackError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(meta.get("model_config"), dict):
        raise LmstackError(f"checkpoint {path} records no model_config in state.json; load its run directory")
    if meta.get("save_weights") == "trainable":
        raise LmstackError(f"checkpoint {path} holds only the trained parameters (save_weights='trainable'), "
                           f"not a whole model; load the run's final model or merge them into the base")
    for name, canonical in meta.get("aliases", {}).items():
        weights[name] = weights[canonical]
    model = build_model(ModelConfig.from_dict(meta["model_config"]))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise LmstackError(f"checkpoint {path} does not fit the model its state.json describes (missing "
                           f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); a transformed model "
                           f"(LoRA, QAT) loads from its run directory")
    data = (meta.get("config") or {}).get("data")
    candidates = [path / "tokenizer.json", path.parent.parent / "tokenizer.json"]
    candidates += [Path(data) / "tokenizer.json"] if data else []
    want = meta.get("tokenizer")
    want = want if isinstance(want, str) and len(want) == 64 else None
    found = next((c for c in candidates if c.is_file() and (want is None or
                                                            hashlib.sha256(c.read_bytes()).hexdigest() == want)), None)
    if found is None:
        log.warning("no tokenizer.json matching checkpoint %s found (looked in %s); pass tokenizer=", path,
                    ", ".join(str(c.parent) for c in candidates))
    return model, found


def _check_vocab(vocab_size: int, tokenizer) -> None:
    n_vocab = getattr(tokenizer, "n_vocab", None)
    if isinstance(n_vocab, int) and vocab_size > n_vocab:
        log.warning("the model's vocab_size=%d is larger than its tokenizer's n_vocab=%d: ids %d..%d have no "
                    "text and decode to nothing if sampled (a padded vocabulary)",
                    vocab_size, n_vocab, n_vocab, vocab_size - 1)
