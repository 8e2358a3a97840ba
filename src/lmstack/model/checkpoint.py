"""Model checkpoints on disk: safetensors weights + a JSON config. Never pickle.

Our folder:  model.safetensors   every parameter (a tied LM head is stored once, as wte)
             config.json         {"lmstack_format": 1, ...ModelConfig fields}
A Hugging Face folder is told apart by `model_type` in its config.json and converted by
hf.py. Loading checks names and shapes against the config and names the first mismatch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from lmstack.model.config import ModelConfig
from lmstack.utils import LmstackError, atomic_write_bytes, atomic_write_json, pick_device, pick_dtype

FORMAT_KEY = "lmstack_format"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def state_for_saving(model) -> dict[str, Tensor]:
    """The model's tensors keyed by name, without the tied LM head (it is `wte.weight`)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_pretrained(model, path: str | Path) -> None:
    from safetensors.torch import save
    path = Path(path)
    blob = save(state_for_saving(model), metadata={"format": "pt", FORMAT_KEY: str(FORMAT_VERSION)})
    atomic_write_bytes(path / WEIGHTS, blob)
    atomic_write_json(path / CONFIG, {FORMAT_KEY: FORMAT_VERSION, **model.config.to_dict()})


def read_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / CONFIG if path.is_dir() else path
    if not f.exists():
        raise LmstackError(f"no {CONFIG} in {path}; expected a folder written by save_pretrained or a "
                           f"Hugging Face model folder")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LmstackError(f"{f} is not valid JSON ({e}); the checkpoint is damaged") from None


def load_pretrained(path: str | Path, device=None, dtype=None):
    """Our folder or a HF folder -> Transformer on `device` in `dtype` (None = as stored)."""
    from lmstack.model.transformer import Transformer
    path = Path(path)
    raw = read_config(path)
    if "model_type" in raw:
        from lmstack.model.hf import load_hf
        model = load_hf(path)
    elif FORMAT_KEY in raw:
        if raw[FORMAT_KEY] != FORMAT_VERSION:
            raise LmstackError(f"{path / CONFIG} has {FORMAT_KEY}={raw[FORMAT_KEY]}; this lmstack reads "
                               f"version {FORMAT_VERSION}")
        cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != FORMAT_KEY})
        tensors = read_safetensors(path / WEIGHTS)
        model = Transformer(cfg)
        load_state(model, tensors, source=str(path / WEIGHTS))
        model = model.to(stored_dtype(tensors))
    else:
        raise LmstackError(f"{path / CONFIG} is neither an lmstack config (no {FORMAT_KEY!r}) nor a Hugging "
                           f"Face one (no 'model_type')")
    return _place(model, device, dtype)


def _place(model, device, dtype):
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype)
    if isinstance(device, str):
        device = pick_device(device)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return model.to(device=device, dtype=dtype).eval()


def stored_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """The floating dtype the weights were saved in (float32 if none is floating)."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def read_safetensors(file: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    file = Path(file)
    if not file.exists():
        raise LmstackError(f"weights file {file} not found (expected {WEIGHTS} next to {CONFIG})")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise LmstackError(f"cannot read {file}: {e}; the file is damaged or not safetensors") from None


def load_state(model, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy `tensors` into `model`, keeping the model's dtype. Names and shapes must match the
    model's exactly (the tied LM head may be absent); the first mismatch is reported."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    optional = {"lm_head.weight"} if tied else set()
    for name, want in expected.items():  # in model order, so "first" means first in the network
        if name not in tensors:
            if name in optional:
                continue
            raise LmstackError(f"{source} has no tensor {name!r} that the model needs; it was saved from a "
                               f"different config (e.g. n_layer, bias, tie_embeddings)")
        if tuple(tensors[name].shape) != tuple(want.shape):
            raise LmstackError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the config "
                               f"gives {tuple(want.shape)}; the checkpoint is from another config")
    extra = [name for name in tensors if name not in expected]
    if extra:
        raise LmstackError(f"{source} has tensor {extra[0]!r} that the model does not have; it was saved from a "
                           f"different config")
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers()))
        for name, t in tensors.items():
            if tied and name == "lm_head.weight":
                continue  # same storage as wte.weight (checked equal shape above)
            params[name].copy_(t)
