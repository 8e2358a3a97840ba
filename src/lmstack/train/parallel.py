"""The parallel modes of `--distributed` and their door checks: a mode the launch's world size
cannot hold, or a model the tensor-parallel degree or the pipeline cannot split, fails here with
a one-line error, before any process builds the model.

    mode            ranks (W = torchrun's world size)                    file
    ddp             W data-parallel replicas                            distributed.py
    zero1 zero2     W data-parallel ranks, state sharded (ZeRO stages)  parallel_zero.py
    zero3 (= fsdp)
    tp              one tensor-parallel group of W ranks                parallel_tp.py
    pp              W pipeline stages                                   parallel_pp.py
    tp+dp           W / tp_size data-parallel groups of tp_size ranks:  parallel_tp.py + zero3
                    a (dp, tp) DeviceMesh, rank = dp_rank * tp_size + tp_rank

Ranks of one tensor-parallel group or pipeline see the same batches: the data is split over
the dp = W / (tp * pp) data-parallel ranks only.
"""
from __future__ import annotations

from pathlib import Path

from lmstack.utils import LmstackError

MODES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "tp", "pp", "tp+dp")
WHOLE_MODEL_MODES = ("none", "ddp", "zero1")     # every rank holds the whole model, unwrapped


def degrees(mode: str, world_size: int, tp_size: int = 0) -> tuple[int, int]:
    """(tensor-parallel degree, pipeline stages) of `mode` on `world_size` ranks."""
    launch = "launch with `torchrun --nproc-per-node N ...`"
    if mode == "tp":
        if world_size < 2:
            raise LmstackError(f"--distributed tp needs at least 2 processes (one per shard), got {world_size}; "
                               f"{launch}, N >= 2")
        if tp_size not in (0, world_size):
            raise LmstackError(f"--tp-size {tp_size} under --distributed tp must equal the world size {world_size} "
                               f"(or 0); for tensor parallelism inside data-parallel groups use --distributed tp+dp")
        return world_size, 1
    if mode == "tp+dp":
        if tp_size < 2 or world_size % tp_size or world_size // tp_size < 2:
            raise LmstackError(f"--distributed tp+dp needs --tp-size T >= 2 and a world size that is a multiple "
                               f"2T, 3T, ... of it (at least 2 data-parallel groups); got tp_size={tp_size}, world "
                               f"size {world_size}; e.g. 4 processes with --tp-size 2")
        return tp_size, 1
    if mode == "pp":
        if world_size < 2:
            raise LmstackError(f"--distributed pp needs at least 2 processes (one per stage), got {world_size}; "
                               f"{launch}, N >= 2")
        return 1, world_size
    if tp_size not in (0, 1):
        raise LmstackError(f"--tp-size {tp_size} only applies to --distributed tp or tp+dp, not {mode!r}")
    return 1, 1


def check_model(mode: str, mcfg, tp: int, pp: int, objective=None, grad_accum: int = 1,
                schedule: str = "1f1b") -> None:
    """Raise if the model config (and, for pp, the objective and micro-batches) cannot be split."""
    if mcfg is None:
        if tp > 1 or pp > 1:
            raise LmstackError(f"--distributed {mode} needs an lmstack Transformer (a model with a ModelConfig)")
        return
    if (tp > 1 or pp > 1) and getattr(mcfg, "arch", "decoder") != "decoder":
        raise LmstackError(f"--distributed {mode} splits decoder-only models; arch={mcfg.arch!r} is not supported")
    if tp > 1:
        for field in ("n_head", "n_kv_head", "intermediate_size"):
            value = getattr(mcfg, field)
            if value % tp:
                ok = [d for d in range(2, value + 1) if value % d == 0]
                raise LmstackError(f"{field}={value} is not divisible by the tensor-parallel degree {tp}; "
                                   f"each rank must hold whole heads / equal slices: use a degree in {ok} "
                                   f"or change {field}")
        if mcfg.n_expert:
            raise LmstackError(f"--distributed {mode}: mixture-of-experts layers (n_expert={mcfg.n_expert}) are "
                               f"not tensor-parallel here; use ddp or zero1/2/3")
        if mcfg.pos_emb in ("alibi", "relative"):
            raise LmstackError(f"--distributed {mode}: pos_emb={mcfg.pos_emb!r} adds a per-head bias that is not "
                               f"split over ranks; use rope, learned, sinusoidal or none")
    if pp > 1:
        if pp > mcfg.n_layer:
            raise LmstackError(f"--distributed pp with {pp} stages needs at least {pp} blocks, the model has "
                               f"n_layer={mcfg.n_layer}; launch at most {mcfg.n_layer} processes")
        if mcfg.n_expert or mcfg.pos_emb == "relative":
            what = f"n_expert={mcfg.n_expert}" if mcfg.n_expert else "pos_emb='relative'"
            raise LmstackError(f"--distributed pp: {what} is not supported across stages; use ddp or zero1/2/3")
        _check_pipeline_objective(objective)
        if schedule == "1f1b" and grad_accum < pp:
            raise LmstackError(f"--pp-schedule 1f1b needs at least as many micro-batches (--grad-accum, now "
                               f"{grad_accum}) as stages ({pp}); raise --grad-accum or use --pp-schedule gpipe")


def _check_pipeline_objective(objective) -> None:
    """pp computes the loss on the last stage as token_loss(logits, targets); only objectives
    whose loss is exactly that qualify (checked by name when the objective is not built yet)."""
    from lmstack.train.objectives import CausalLM, MaskedLM
    if objective is None or isinstance(objective, str):
        name = objective or "causal"
        if name not in ("causal", "masked"):
            raise LmstackError(f"--distributed pp supports the objectives causal and masked, not {name!r}")
        return
    if type(objective) not in (CausalLM, MaskedLM):
        raise LmstackError(f"--distributed pp computes token cross-entropy on the last stage, so it supports the "
                           f"causal and masked objectives only, not {getattr(objective, 'name', objective)!r}")


def planned_model_config(cfg, model_arg):
    """The model config a run will build, when it is known without building it (else None)."""
    from torch import nn

    from lmstack.model import ModelConfig
    if isinstance(model_arg, ModelConfig):
        return model_arg
    if isinstance(model_arg, nn.Module):
        return getattr(model_arg, "config", None)
    if Path(cfg.model).is_dir():
        return None                 # read when the model dir is loaded; checked then, before sharding
    try:
        return ModelConfig.preset(cfg.model, **cfg.model_overrides)
    except (ValueError, TypeError) as e:
        raise LmstackError(str(e)) from None


def check_launch(cfg, world_size: int) -> None:
    """Every door check of cfg.distributed on `world_size` ranks that needs no data: the CLI runs
    it before it builds a default corpus (the Trainer runs the same checks itself)."""
    mode = cfg.distributed
    if world_size < 1 and mode not in ("auto", "none"):
        raise LmstackError(f"distributed={mode!r} needs a launcher: run under "
                           f"`torchrun --nproc-per-node N -m lmstack.cli.main train ...`")
    if world_size < 1 or mode == "none":
        return
    mode = "ddp" if mode == "auto" else mode
    tp, pp = degrees(mode, world_size, cfg.tp_size)
    check_model(mode, planned_model_config(cfg, None), tp, pp, cfg.objective, cfg.grad_accum, cfg.pp_schedule)
