"""Batch sources: where the Trainer's micro-batches come from, and the pretraining source.

The protocol (duck-typed; `check_source` checks it at the door):

    raw = source.next_batch()     # anything the objective's prepare() accepts; called once per
                                  # micro-batch, on every rank (each rank draws its own share)
    sd = source.state_dict()      # plain data (numbers, strings, tensors, arrays, nested
    source.load_state_dict(sd)    # dicts/lists): with it the source continues exactly where
                                  # it stopped, so a resumed run sees the same batches

A val source follows the same protocol; the Trainer rewinds it to its first state before
every evaluation, so each one scores the same batches.

Pretraining: with no source passed, `open_pretraining_data` reads the token shards of
`cfg.data` and returns `PackedSampler`s (lmstack.data), which yield packed (x, y) windows.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lmstack.utils import LmstackError

PROTOCOL = ("next_batch", "state_dict", "load_state_dict")


def check_source(source, what: str) -> None:
    missing = [m for m in PROTOCOL if not callable(getattr(source, m, None))]
    if missing:
        raise TypeError(f"{what} must be a batch source with next_batch(), state_dict() and load_state_dict(); "
                        f"a {type(source).__name__} lacks {', '.join(missing)}")


def move_to(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor on `device`: tensors, objects with .to(), dataclasses, dicts,
    lists and tuples (nested); anything else is returned as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_to(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@dataclass
class PretrainingData:
    train: Any                         # PackedSampler over the train split
    make_val: Callable[[], Any] | None  # a fresh PackedSampler over the val split (None: no val split)
    vocab_size: int                    # of the shards' tokenizer
    tokenizer_id: str                  # the shards' tokenizer fingerprint (resume checks)


def open_pretraining_data(data_dir: Path, batch_size: int, seq_len: int, seed: int, rank: int,
                          world_size: int) -> PretrainingData:
    """Packed samplers over DATA_DIR/shards (built by `lmstack data`), after checking them."""
    from lmstack.data import PackedSampler, ShardSet
    shards = data_dir / "shards"
    if not shards.is_dir():
        raise LmstackError(f"{shards} not found; build it with `lmstack data` (write_shards) or fix --data")
    try:
        train = ShardSet(shards, "train")   # checks every shard's size against meta.json
        val = ShardSet(shards, "val") if "val" in train.meta["splits"] else None
    except (ValueError, OSError) as e:
        raise LmstackError(f"cannot read the token shards in {shards}: {e}; rebuild them with `lmstack data`") from None
    if len(train) < seq_len + 1:
        raise LmstackError(f"the train split has {len(train)} tokens, fewer than seq_len+1={seq_len + 1}; "
                           f"lower --seq-len or build more data")
    kw = dict(batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank, world_size=world_size)
    make_val = (lambda: PackedSampler(val, **kw)) if val is not None and len(val) >= seq_len + 1 else None
    return PretrainingData(PackedSampler(train, **kw), make_val, int(train.vocab_size), train.tokenizer_fingerprint)


def rescale_sampler_state(sd: Any, batch_size: int, world_size: int) -> Any:
    """A PackedSampler position saved under another world size. Its position is global: step g
    of W ranks x batch B consumed windows [0, g*W*B). With the same global batch the data order
    continues exactly; otherwise we continue at the first unseen window. Other states: as is."""
    if not (isinstance(sd, dict) and {"step", "batch_size", "world_size"} <= set(sd)):
        return sd
    old, new = sd["batch_size"] * sd["world_size"], batch_size * world_size
    if old != new:
        print(f"note: the checkpoint's global batch was {old} sequences, this run's is {new}; the data order "
              f"continues at the first unseen window but differs from the original run's")
    return {**sd, "batch_size": batch_size, "world_size": world_size, "step": -(-sd["step"] * old // new)}
