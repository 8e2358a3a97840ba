"""ZeRO stages 1-3 (Rajbhandari et al. 2020, arXiv:1910.02054) on PyTorch's own engines.

Each rank keeps a slice of the training state instead of all of it. With Psi parameters in
fp32 and AdamW (two moments) on N ranks, per rank:

    mode    parameters  gradients  optimizer state   engine
    ddp     4 Psi       4 Psi      8 Psi             DistributedDataParallel
    zero1   4 Psi       4 Psi      8 Psi / N         DDP + torch.distributed.optim.ZeroRedundancyOptimizer
    zero2   4 Psi (*)   4 Psi / N  8 Psi / N         FSDP2 fully_shard(reshard_after_forward=False)
    zero3   4 Psi / N   4 Psi / N  8 Psi / N         FSDP2 fully_shard (reshard_after_forward=True)

zero1: DDP all-reduces whole gradients; ZeroRedundancyOptimizer hands each rank the AdamW
  state of a subset of the parameters (whole tensors, greedily balanced by size, so "1/N" is
  only as even as the tensor sizes allow), steps only those and broadcasts them afterwards.
zero2: (*) FSDP's SHARD_GRAD_OP. Gradients are reduce-scattered (each rank keeps 1/N) and the
  optimizer steps the 1/N shard. A block's parameters are all-gathered once for its forward and
  kept unsharded through the backward (no second all-gather, unlike zero3); after the backward
  they are resharded, so *between* steps they rest at 4 Psi / N as well. The paper's ZeRO-2
  keeps whole parameters at all times; FSDP2 has no such mode, and the difference is only the
  resting copy: the peak (forward -> backward) is the whole model, as in the paper.
zero3: parameters sharded too: each block's are gathered for its forward, freed, gathered
  again for its backward. "fsdp" is the same mode under PyTorch's name.

Checkpoints stay whole: FSDP's through torch.distributed.checkpoint.state_dict (see
distributed.py); ZeroRedundancyOptimizer's state is consolidated on rank 0 and re-keyed by
parameter name here, into the very format that get_state_dict gives for a plain AdamW.
"""
from __future__ import annotations

import torch
from torch import nn

from lmstack.train.optim import param_groups
from lmstack.train.optim_state import load_named_optimizer_state, name_optimizer_state

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}


def shard_model(model: nn.Module, stage: int, blocks: list[nn.Module], mesh=None, device_ids=None) -> nn.Module:
    """DDP (stage 1: its optimizer does the sharding) or FSDP2 per block + root (stages 2, 3).
    `mesh`: the data-parallel DeviceMesh FSDP shards over (None: every rank)."""
    if stage == 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard
    reshard = stage == 3
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)   # the rest: embeddings, final norm, head
    return model


def zero1_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float):
    """AdamW with the same parameter groups as build_optimizer, its state sharded over ranks."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer(param_groups(model, weight_decay), optimizer_class=torch.optim.AdamW,
                                   lr=lr, betas=betas, eps=eps)


def zero1_state_dict(model: nn.Module, optimizer, rank: int) -> dict:
    """The whole optimizer state keyed by parameter name, on rank 0 ({} elsewhere). Collective."""
    optimizer.consolidate_state_dict(to=0)
    if rank != 0:
        return {}
    # indexed by position in the global param_groups (every rank's parameters)
    return name_optimizer_state(model, optimizer.param_groups, optimizer.state_dict())


def zero1_load_state_dict(model: nn.Module, optimizer, optim_sd: dict) -> None:
    """Load a name-keyed whole optimizer state (any mode's checkpoint); each rank keeps its part."""
    load_named_optimizer_state(model, optimizer, optim_sd)
