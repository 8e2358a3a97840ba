"""Data-parallel training under torchrun: DDP, and FSDP for models that do not fit one device.

    torchrun --nproc-per-node 2 -m lmstack.cli.main train --data DIR --out runs/x
    torchrun --nproc-per-node 8 -m lmstack.cli.main train --distributed fsdp ...

Each rank draws its own stream of batches (`PackedSampler(rank=, world_size=)`); DDP averages
gradients across ranks, so per-rank batch b on W ranks is one optimizer step on a batch of W*b
sequences. The backend is NCCL on CUDA, gloo on CPU. Rank 0 alone writes files.

Checkpoints hold *full* (unsharded, unwrapped) state keyed by parameter names, via
torch.distributed.checkpoint.state_dict: the same format whether a run used one process, DDP
or FSDP, so a checkpoint of any of them resumes under any other.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmstack.utils import LmstackError, pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"          # none | ddp | fsdp
    device: torch.device = torch.device("cpu")
    owns_group: bool = False    # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", mode: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    if mode == "none" or (mode == "auto" and not launched_by_torchrun()):
        return DistInfo(mode="none", device=pick_device(device))
    if not launched_by_torchrun():
        raise LmstackError(f"distributed={mode!r} needs a launcher: run under "
                           f"`torchrun --nproc-per-node N -m lmstack.cli.main train ...`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, "ddp" if mode == "auto" else mode, dev, owns)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the longest nn.ModuleList in the model (`blocks`, `layers`, `h`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP or FSDP around `model` (already on info.device); unchanged when not distributed."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard  # FSDP2: shards each block's parameters over ranks
        for block in find_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce on micro-batches before the last one of an accumulation."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    if skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _ResyncFSDP(model)
    return contextlib.nullcontext()


class _ResyncFSDP(contextlib.AbstractContextManager):
    def __init__(self, model):
        self.model = model

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, full and on CPU, keyed by parameter name. Collective."""
    return get_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                    optim_sd: dict | None) -> None:
    opts = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, model_sd, options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, on every rank (one element when not distributed)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Tear down the process group if `init_distributed` created it; one the caller set up
    (e.g. to run several jobs in one torchrun process) stays theirs. Re-creating a group in
    the same processes right after a teardown hung now and then on gloo."""
    if info.world_size > 1 and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
