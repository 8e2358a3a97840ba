"""Training under torchrun: data parallel (DDP, ZeRO-1/2/3), tensor parallel, pipeline parallel.

    torchrun --nproc-per-node 2 -m lmstack.cli.main train --data DIR --out runs/x
    torchrun --nproc-per-node 4 -m lmstack.cli.main train --distributed tp+dp --tp-size 2 ...

The modes and their door checks are in parallel.py, each mode's engine in parallel_zero.py,
parallel_tp.py, parallel_pp.py; this file is what the Trainer calls, whatever the mode.

Each data-parallel rank draws its own stream of batches (`PackedSampler(rank=dp_rank,
world_size=dp_size)`); gradients are averaged across them, so per-rank batch b on dp ranks is
one optimizer step on a batch of dp*b sequences. Ranks of one tensor-parallel group or
pipeline draw the same batches. The backend is NCCL on CUDA, gloo on CPU. Rank 0 alone writes
files.

Checkpoints hold *full* (unsharded, unwrapped) state keyed by parameter names, in the model's
own layout: the same format whatever the mode, so a checkpoint of any mode resumes under any
other, or on one process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmstack.train.optim import build_optimizer, param_groups
from lmstack.train.parallel import WHOLE_MODEL_MODES, check_model, degrees, planned_model_config  # noqa: F401
from lmstack.train.parallel_pp import Pipelined, keep_stage
from lmstack.train.parallel_tp import apply_tensor_parallel, permute_state
from lmstack.train.parallel_zero import (ZERO_STAGES, shard_model, zero1_load_state_dict, zero1_optimizer,
                                         zero1_state_dict)
from lmstack.utils import LmstackError, pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"          # none | one of parallel.MODES
    device: torch.device = torch.device("cpu")
    owns_group: bool = False    # we initialised the process group, so we tear it down
    tp: int = 1                 # tensor-parallel degree
    pp: int = 1                 # pipeline stages (pp mode: every rank is one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many distinct streams of batches the run draws."""
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp if self.pp == 1 else 0

    @property
    def whole_model(self) -> bool:
        """Each rank holds the whole model unsharded (it can sample, save as it is)."""
        return self.mode in WHOLE_MODEL_MODES

    @property
    def data_weight(self) -> float:
        """This rank's share in sums over the data: ranks holding the same batches count once
        together (1/tp each; under pp the last stage, which has the losses, alone)."""
        if self.pp > 1:
            return float(self.rank == self.world_size - 1)
        return 1.0 / self.tp


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", mode: str = "auto", tp_size: int = 0) -> DistInfo:
    """Join the process group torchrun set up (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
    after checking that `mode` fits the world size (no process has built anything yet)."""
    if mode == "none" or (mode == "auto" and not launched_by_torchrun()):
        return DistInfo(mode="none", device=pick_device(device))
    if not launched_by_torchrun():
        raise LmstackError(f"distributed={mode!r} needs a launcher: run under "
                           f"`torchrun --nproc-per-node N -m lmstack.cli.main train ...`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    mode = "ddp" if mode == "auto" else mode
    tp, pp = degrees(mode, world, tp_size)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, mode, dev, owns, tp, pp)


BLOCK_LIST_NAMES = ("blocks", "layers", "h")   # ours; Llama/Mistral-style; GPT-2-style


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, the units that FSDP shards and activation checkpointing recomputes:
    the outermost ModuleList whose children are all our `Block`s, else the outermost one named
    blocks / layers / h. Not simply the longest list: an MoE model's `experts` lists (inside
    each block) can be longer than the list of blocks."""
    from lmstack.model.transformer import Block
    lists = [(name.count(".") if name else -1, name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)]
    ours = [x for x in lists if all(isinstance(c, Block) for c in x[2])]
    named = [x for x in lists if x[1].rsplit(".", 1)[-1] in BLOCK_LIST_NAMES]
    for found in (ours, named):
        if found:
            return list(min(found, key=lambda x: x[0])[2])
    return []


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block's activations during backward (memory for compute)."""
    from torch.utils.checkpoint import checkpoint
    blocks = find_blocks(model)
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)
    return len(blocks)


def wrap_model(model: nn.Module, info: DistInfo, cfg=None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`model` (already on info.device) made parallel as info.mode says; unchanged when not
    distributed. tp, pp and tp+dp change `model` in place (sharded, or cut to this rank's
    stage); pp returns a `Pipelined` runner around it. `cfg`: the TrainConfig (pp's schedule
    and micro-batches)."""
    mode, mcfg = info.mode, getattr(model, "config", None)
    ids = [info.device.index] if info.device.type == "cuda" else None
    if mode in ("tp", "pp", "tp+dp"):   # again with the built model: a model dir is only read now
        check_model(mode, mcfg, info.tp, info.pp, None, getattr(cfg, "grad_accum", 1),
                    getattr(cfg, "pp_schedule", "1f1b"))
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=ids)
    if mode in ZERO_STAGES:
        return shard_model(model, ZERO_STAGES[mode], find_blocks(model), device_ids=ids)
    if mode in ("tp", "tp+dp"):
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(info.device.type, (info.dp_size, info.tp), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
        return shard_model(model, 3, find_blocks(model), mesh=mesh["dp"]) if mode == "tp+dp" else model
    if mode == "pp":
        if dtype == torch.float16:   # the schedule runs the backward itself, unscaled by a GradScaler
            raise LmstackError("--distributed pp does not support dtype=float16 (GradScaler); use bfloat16")
        keep_stage(model, info.rank, info.pp)
        return Pipelined(model, info.rank, info.pp, cfg.grad_accum, cfg.pp_schedule, info.device, dtype)
    return model


def make_optimizer(model: nn.Module, info: DistInfo, lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters (a stage's, a shard's): ZeroRedundancyOptimizer under zero1."""
    if info.mode == "zero1":
        return zero1_optimizer(model, lr, weight_decay, betas, eps)
    if info.pp > 1 and model.wte is None and model.lm_head is not None and model.config.tie_embeddings:
        # The last stage's copy of the tied embedding sits in lm_head alone, and param_groups tells
        # embeddings (no weight decay) by their module: put it where stage 0's copy is.
        decay, no_decay = param_groups(model, weight_decay)
        tied = model.lm_head.weight
        decay["params"] = [p for p in decay["params"] if p is not tied]
        no_decay["params"].append(tied)
        return torch.optim.AdamW([decay, no_decay], lr=lr, betas=betas, eps=eps, fused=True)
    if info.tp > 1:   # DTensor shards beside whole norms (or shards on two meshes under tp+dp): the
        # fused and foreach kernels take one list of like tensors and refuse the mix; step each one
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=False)
    return build_optimizer(model, lr, weight_decay, betas, eps)


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


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo | None = None,
               trainable_only: bool = False) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, full, on CPU, keyed by parameter name, in the model's own
    layout (rank 0 holds them; other ranks may get {}). Collective.
    trainable_only: leave out frozen parameters (never gathered: a frozen FSDP base stays sharded)."""
    mode = info.mode if info is not None else "none"
    if mode == "pp":
        return model.full_state(optimizer, info.world_size, trainable_only)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    if mode == "zero1":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(model, options=opts), zero1_state_dict(model.module, optimizer, info.rank)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    if info is not None and info.tp > 1:      # the fused rows back from shard order
        mcfg = model.config
        model_sd = permute_state(model_sd, mcfg, info.tp, inverse=True)
        if optim_sd:
            optim_sd = {**optim_sd, "state": permute_state(optim_sd["state"], mcfg, info.tp, inverse=True)}
    return model_sd, optim_sd


STEP_IMPL = ("foreach", "fused", "capturable", "differentiable")


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                    optim_sd: dict | None, info: DistInfo | None = None, strict: bool = True) -> None:
    """Load full state dicts (any mode's); strict=False for a partial model state (the trainable weights)."""
    mode = info.mode if info is not None else "none"
    if optim_sd is not None and optimizer is not None:
        # How to step (fused or foreach kernels) is this run's choice, not the checkpoint's: a
        # sharded run cannot take the fused kernel a single-process run saved in its groups.
        optim_sd = {**optim_sd, "param_groups": [{**saved, **{k: mine[k] for k in STEP_IMPL if k in mine}}
                                                 for saved, mine in zip(optim_sd["param_groups"],
                                                                        optimizer.param_groups)]}
    if mode == "pp":
        return model.load_full_state(optimizer, model_sd, optim_sd, strict)
    if mode == "zero1":
        model.module.load_state_dict(model_sd, strict=strict)
        return zero1_load_state_dict(model.module, optimizer, optim_sd)
    if info is not None and info.tp > 1:
        model_sd = permute_state(model_sd, model.config, info.tp)
        if optim_sd is not None:
            optim_sd = {**optim_sd, "state": permute_state(optim_sd["state"], model.config, info.tp)}
    opts = StateDictOptions(full_state_dict=True, strict=strict)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, model_sd, options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def clip_grad_norm_(model: nn.Module, params: list, max_norm: float, info: DistInfo) -> float:
    """Scale the gradients so that their global L2 norm is at most max_norm (inf: only measure
    it); return the norm before clipping. Gradients may be whole tensors, DTensors on any mesh
    (FSDP shards, tensor-parallel shards, replicated norms) or a pipeline stage's own; as
    torch.nn.utils.clip_grad_norm_, whose _foreach kernels refuse such a mix."""
    from torch.distributed.tensor import DTensor
    skip = getattr(model, "norm_excluded", set())         # pp: the last stage's copy of a tied weight
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append((g, id(p) in skip))
    norms = []
    for key, gs in groups.items():   # the same order on every rank: params come in model order
        counted = [g for g, skipped in gs if not skipped]
        n = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=info.device)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else \
        (norms[0] if norms else torch.zeros((), device=info.device))
    if info.pp > 1:                   # stages hold disjoint parameters: add their squares
        sq = total.double().square()
        dist.all_reduce(sq)
        total = sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)        # torch's clip_grads_with_norm_
    for gs in groups.values():
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g, _ in gs], coef)
    return float(total)


def gather_objects(obj, info: DistInfo) -> list:
    """Each data-parallel rank's `obj` (from the first rank of its group), on every rank, in
    dp_rank order (one element when not distributed). Collective."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, (info.dp_rank, obj))
    first = {}
    for dp_rank, o in out:
        first.setdefault(dp_rank, o)
    return [first[d] for d in range(info.dp_size)]


def data_sum(values: list[float], info: DistInfo) -> list[float]:
    """Elementwise sum of per-rank `values` over the data, in float64 and one collective:
    ranks holding the same batches (a tensor-parallel group, a pipeline) count once."""
    if info.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device) * info.data_weight
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Tear down the process group if `init_distributed` created it; one the caller set up
    (e.g. to run several jobs in one torchrun process) stays theirs. Re-creating a group in
    the same processes right after a teardown hung now and then on gloo."""
    if info.world_size > 1 and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
