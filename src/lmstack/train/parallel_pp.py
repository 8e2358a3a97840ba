"""Pipeline parallelism on torch.distributed.pipelining: a PipelineStage per rank, driven by
ScheduleGPipe (GPipe, Huang et al. 2019) or Schedule1F1B (PipeDream-Flush, Narayanan et al.
2019; Megatron's default).

Each of p ranks keeps one stage of whole blocks (n_layer split as evenly as possible): stage 0
also the embeddings, the last stage the final norm and LM head. The rest of the model is
dropped from that rank (`keep_stage`), and the names of what is kept do not change
(`blocks.5.attn.qkv.weight` stays so), so checkpoints merge into the whole model's state.

Micro-batches: the `grad_accum` micro-batches of one optimizer step are the pipeline's m
micro-batches (the schedule gets their concatenation and splits it back), so a step does the
arithmetic of one process accumulating the same micro-batches: each micro-batch's mean loss,
gradients scaled by 1/m. Every rank draws the same batches; stage 0 reads the ids, the last
stage the targets. Between stages only the hidden states (mb, T, C) travel (send/recv); each
stage rebuilds the attention context (positions, RoPE tables) itself.

Schedules: GPipe runs all m forwards, then all m backwards (holds m micro-batches of
activations); 1F1B, after a warm-up of p-1-s forwards on stage s, alternates one forward and
one backward (holds at most p - s), and needs m >= p. Both idle each rank for the same bubble,
(p - 1) / (m + p - 1) of the step, with equal stage times.

Tied embeddings (wte = lm_head): stage 0 and the last stage each hold a copy. After the
backward their gradients are summed over those two ranks (Megatron's embedding group), so the
copies take identical steps; the gradient norm counts the tensor once.

The loss must be a function of (logits, targets): the token objectives (causal, masked) are.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmstack.model.attention import AttnContext, make_slopes
from lmstack.train.objectives import token_loss
from lmstack.train.optim_state import load_named_optimizer_state, named_optimizer_state
from lmstack.utils import LmstackError, autocast

def stage_bounds(n_layer: int, n_stages: int, stage: int) -> tuple[int, int]:
    """Blocks [lo, hi) of `stage`: contiguous, sizes differ by at most one (earlier stages larger)."""
    base, extra = divmod(n_layer, n_stages)
    lo = stage * base + min(stage, extra)
    return lo, lo + base + (stage < extra)


def keep_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Drop from `model` (in place) every module another stage owns; names stay the whole model's."""
    lo, hi = stage_bounds(len(model.blocks), n_stages, stage)
    for i in list(range(len(model.blocks))):
        if not lo <= i < hi:
            del model.blocks._modules[str(i)]   # not `del blocks[i]`: that would renumber the rest
    if stage > 0:
        for name in ("wte", "wpe", "wtt", "norm_emb"):
            if getattr(model, name, None) is not None:
                setattr(model, name, None)
    if stage < n_stages - 1:
        model.norm_f = model.lm_head = None
    return model


class StageForward(nn.Module):
    """The stage's forward: ids -> hidden (first), hidden -> hidden, hidden -> logits (last)."""

    def __init__(self, model: nn.Module, first: bool, last: bool):
        super().__init__()
        self.model, self.first, self.last = model, first, last

    def context(self, x: torch.Tensor) -> AttnContext:
        """What Transformer._embed builds for a plain forward (default positions, no cache) of
        a (B, T) batch; the door checks (parallel.py) keep pp to the cases this covers."""
        cfg, (B, T) = self.model.config, x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        plain = cfg.pos_emb != "alibi" and (cfg.sliding_window is None or cfg.sliding_window >= T)
        ctx = AttnContext(positions=positions, mask_kind=cfg.mask, window=cfg.sliding_window,
                          slopes=make_slopes(cfg), causal_fast=plain and cfg.mask in ("causal", "prefix"),
                          no_mask=plain and cfg.mask == "bidirectional")
        if self.model.rope is not None:
            dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            ctx.cos, ctx.sin = self.model.rope.cos_sin(positions, dt)
        return ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.first:
            x, ctx = m._embed(x, None, None, None)      # ids (mb, T) -> (mb, T, C)
        else:
            ctx = self.context(x)
        for block in m.blocks:
            x = block(x, ctx)
        return m.logits(m.norm_f(x)) if self.last else x


class Pipelined(nn.Module):
    """The trainer's `model` under pp: runs one optimizer step's micro-batches through the
    schedule (`train_step`) or a forward-only pass (`eval_values`). The stage's Transformer is
    `model` (registered through StageForward, so train()/eval() reach it)."""

    def __init__(self, model: nn.Module, stage: int, n_stages: int, n_micro: int, schedule: str,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        self.stage, self.n_stages, self.device, self.dtype = stage, n_stages, device, dtype
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.fwd = StageForward(model, self.first, self.last)
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        # loss_fn(logits, targets) on the last stage: each micro-batch's mean; grads scaled by 1/n_micro
        self.schedule = kind(PipelineStage(self.fwd, stage, n_stages, device), n_micro, loss_fn=token_loss)
        # forward-only, one micro-batch: evaluation batches need not split into n_micro pieces
        self.eval_schedule = ScheduleGPipe(PipelineStage(self.fwd, stage, n_stages, device), 1, loss_fn=token_loss)
        tied = model.config.tie_embeddings
        # new_group is collective: every rank creates it, only stage 0 and the last use it
        self.embed_group = dist.new_group([0, n_stages - 1]) if tied else None
        self.tied = (model.wte.weight if self.first else model.lm_head.weight) if tied and (
            self.first or self.last) else None
        self.norm_excluded = {id(self.tied)} if self.tied is not None and not self.first else set()

    @property
    def module(self) -> nn.Module:
        return self.fwd.model

    def _run(self, schedule, batches: list, train: bool) -> torch.Tensor:
        ids = torch.cat([b.input_ids for b in batches]).to(self.device)
        targets = torch.cat([b.targets for b in batches]).to(self.device)
        losses: list[torch.Tensor] = []
        args = (ids,) if self.first else ()
        kw = dict(target=targets, losses=losses) if self.last else {}
        with autocast(self.device, self.dtype):
            (schedule.step if train else schedule.eval)(*args, **kw)
        total = torch.stack(losses).detach().float().sum() if self.last else torch.zeros((), device=self.device)
        return torch.stack([total, torch.zeros_like(total)])      # [loss, MoE aux] summed over micro-batches

    def train_step(self, batches: list) -> torch.Tensor:
        """Forward + backward of the step's micro-batches; (2,) [sum of micro-batch losses, 0]
        on the last stage, zeros elsewhere. Leaves the stage's gradients (tied ones summed)."""
        out = self._run(self.schedule, batches, train=True)
        if self.tied is not None and self.tied.grad is not None:
            dist.all_reduce(self.tied.grad, group=self.embed_group)
        return out

    @torch.no_grad()
    def eval_values(self, batch) -> torch.Tensor:
        return self._run(self.eval_schedule, [batch], train=False)

    # ---- checkpoints: each stage's part, merged into the whole model's state on rank 0
    def full_state(self, optimizer, world_size: int, trainable_only: bool) -> tuple[dict, dict]:
        """The whole model's weights and name-keyed optimizer state on rank 0 ({} elsewhere). Collective."""
        model = self.module
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if trainable_only else set()
        model_sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
        optim_sd = named_optimizer_state(model, optimizer)
        if self.norm_excluded:        # the last stage's copy of a tied weight: stage 0 saves its state
            drop = {n for n, p in model.named_parameters() if id(p) in self.norm_excluded}
            optim_sd["state"] = {k: v for k, v in optim_sd["state"].items() if k not in drop}
            for g in optim_sd["param_groups"]:
                g["params"] = [n for n in g["params"] if n not in drop]
        parts = [None] * world_size if dist.get_rank() == 0 else None
        dist.gather_object((model_sd, optim_sd), parts, dst=0)
        if parts is None:
            return {}, {}
        merged_model, merged_optim = {}, {"state": {}, "param_groups": []}
        for m_sd, o_sd in parts:          # stages in order: the groups list parameters in model order
            merged_model.update(m_sd)
            merged_optim["state"].update(o_sd["state"])
            for i, g in enumerate(o_sd["param_groups"]):
                if i == len(merged_optim["param_groups"]):
                    merged_optim["param_groups"].append({**g, "params": []})
                merged_optim["param_groups"][i]["params"] += g["params"]
        return merged_model, merged_optim

    def load_full_state(self, optimizer, model_sd: dict, optim_sd: dict | None, strict: bool) -> None:
        """Load this stage's part of a whole-model state (any mode's checkpoint)."""
        model = self.module
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in model_sd.items() if k in own}, strict=strict)
        if optim_sd is not None:
            # the last stage's copy of a tied weight continues the state saved under its first name
            rename = {n: "wte.weight" for n, p in model.named_parameters() if id(p) in self.norm_excluded}
            load_named_optimizer_state(model, optimizer, optim_sd, rename)

    def forward(self, *args, **kwargs):
        raise LmstackError("a pipeline stage has no whole-model forward; use train_step or eval_values")
