"""Training checkpoints: safetensors + JSON, written atomically, the last N kept. No pickle.

Layout of one checkpoint (a directory renamed into place only once complete):

    out/checkpoints/step_0000200/
        model.safetensors   model weights (tied tensors stored once; aliases in state.json)
        state.safetensors   every other tensor: optimizer moments, RNG states, ...
        state.json          step, config, model config, tokenizer hash, and the rest of the
                            training state with each tensor replaced by {"__tensor__": key}

Any nested state (the optimizer's state_dict, RNG states of torch / numpy / python, the
sampler's state) goes through `flatten_state`, which splits tensors and numpy arrays out to
safetensors and keeps the structure (dict keys of any type, tuples) in JSON.

A SIGKILL at any instant leaves every complete checkpoint intact: `atomic_dir` builds
`.step_N.<random>.tmp` and renames it; pruning renames an old checkpoint to
`.step_N.<random>.trash` (one atomic step) before deleting it, so a kill mid-delete never
leaves a half-deleted `step_N`. `recover()` at start-up removes temp and trash dirs, restores
a `.step_N.old` left by a kill during a same-name replacement, and removes any `step_N`
that is not complete (all three files), e.g. one half-deleted by an older lmstack.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmstack.utils import LmstackError, atomic_dir

_STEP_DIR = re.compile(r"^step_(\d{7,})$")
FILES = ("model.safetensors", "state.safetensors", "state.json")


# --------------------------------------------------------------------------- nested state <-> tensors + JSON

def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split `obj` into (tensors by key, a JSON-able skeleton that refers to them)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = str(len(tensors))
            arr = x.astype(np.int64) if x.dtype.kind == "u" else x  # safetensors lacks some unsigned types
            tensors[key] = torch.from_numpy(np.ascontiguousarray(arr)).clone()
            return {"__ndarray__": key, "dtype": str(x.dtype)}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v) for k, v in x.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint (only tensors, arrays, "
                        f"dicts, lists, tuples, numbers, strings)")

    return tensors, walk(obj)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy().astype(skeleton["dtype"])
        if "__items__" in skeleton:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# --------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load

def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): store each once."""
    out, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out, aliases


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint dir so that a kill at any instant leaves it whole or invisible:
    rename it to a trash name first (atomic), then delete the trash."""
    trash = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.trash")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover(root: str | Path) -> None:
    """Clean up after a kill: drop half-written temp dirs and half-deleted trash, restore a
    replaced-but-not-deleted checkpoint, remove incomplete step dirs."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(".step_") and p.name.endswith(".old"):
            target = root / p.name[1:-4]
            if not target.exists() and is_complete(p):
                p.rename(target)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".step_") and p.name.endswith((".tmp", ".trash")):
            shutil.rmtree(p, ignore_errors=True)
    # After the .old restore above: a step dir that lacks a file is never resumed from nor
    # pruned (list_checkpoints skips it), so it would stay forever.
    for p in root.iterdir():
        if _STEP_DIR.match(p.name) and p.is_dir() and not is_complete(p):
            remove_checkpoint(p)


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict,
                    meta: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    path = step_dir(Path(root), step)
    weights, aliases = _dedupe(model_state)
    tensors, skeleton = flatten_state(train_state)
    try:
        with atomic_dir(path) as tmp:
            save_file(weights, str(tmp / "model.safetensors"))
            save_file(tensors, str(tmp / "state.safetensors"))
            doc = {**meta, "step": step, "aliases": aliases, "state": skeleton}
            (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as e:  # SafetensorError (e.g. a full disk in save_file) is no OSError
        raise LmstackError(f"could not write checkpoint {path}: {write_error(e)}; the previous checkpoint is "
                           f"intact; free disk space or choose another --out") from None
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            remove_checkpoint(old)
    return path


def write_error(e: Exception) -> str:
    """The first line of an OSError's or SafetensorError's message, for a one-line error."""
    text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0]


def read_meta(path: str | Path) -> dict:
    p = Path(path) / "state.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmstackError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an older one") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Any, dict]:
    """(model state with aliases restored, training state, meta JSON)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise LmstackError(f"checkpoint {path} is damaged ({e}); delete it to resume from an older one") from None
    for name, canonical in meta.get("aliases", {}).items():
        weights[name] = weights[canonical]
    return weights, unflatten_state(meta["state"], tensors), meta
