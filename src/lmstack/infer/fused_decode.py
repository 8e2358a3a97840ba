"""A decode step of the whole model in one compiled op, for rows of one new token each.

At batch-1 decode a small model's forward is ~100 tiny ops; in eager PyTorch each costs
microseconds of Python, module calls and dispatch, several times its arithmetic (issue 20).
For the models most served (a pre-norm RMSNorm + SwiGLU decoder with RoPE: Llama, Mistral,
Qwen2 and our own default config) `kernels.decode_step` (kernels/decode_step.cpp) runs the
step from token ids to logits as one C++ loop over the layers, reusing the library's GEMV
(dense_linear) and paged-attention step:

    fused = FusedDecode(model, cache)                      # once, in the ModelRunner
    logits = fused(ids, positions, tables, max(pos))       # (B, V), or None: take the module forward

`__call__` returns None, having written nothing, whenever the op would not compute exactly
what the model's forward computes, and the runner then runs the model as usual:
- at build time (`why_not`): another architecture or config (LayerNorm, GELU, MoE, ALiBi,
  learned positions, q/k norms, scaled head ...), not float32 on the CPU, an int8 KV cache;
- at every step (the model may change under a live engine): the library unavailable or
  turned off (kernels.disabled()), CPU autocast on, a submodule replaced (LoRA, NF4 or pruned
  linears: anything but a plain nn.Linear, an IntLinear or an RMSNorm), a forward hook or pre-hook anywhere
  in the model (ablate.py's lesions, calibration) or a global one, a `forward` set on a module
  instance, dropout active in training mode.
Quantized linears (model/quantized.py's IntLinear: INT8 / INT4, per channel or grouped, symmetric
or not, RTN / GPTQ / AWQ, weight-only or W8A8) run inside the op by the kernel their forward calls
on float32 CPU inputs, with the same arguments (quant_linear, on x / awq_scale for AWQ;
quant_linear_a8 for act_bits=8), so they compute what the module computes; with grad enabled
(where their forward may take DequantLinear) the op steps aside. Measured (bench_quant.py --peer
--threads 1 --reps 3 --peer-kv f16, batch 1, ratio to llama.cpp Q8_0): module path (load 3-4)
8 x 512 INT8 0.55x, W8A8 0.81x, 6 x 768 INT8 0.41x, W8A8 0.54x; this op (load 1.7) 0.76x, 1.06x,
0.73x, 1.02x. In one process, 1 thread, batch-1 tokens/s of this op / the module path (the op
turned off), medians of 5 interleaved pairs at load 1.5: 1.72x, 2.20x, 1.36x, 1.45x.
The weights are gathered from the modules once and re-gathered whenever one of the (dict,
key) -> object lookups that found them no longer holds (a module or parameter re-assigned) or
a hook appears: one pass of identity tests a step, not a walk of the model. Weights updated
in place (update_weights) are the same tensors, so they need nothing.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

from lmstack import kernels
from lmstack.infer.paged_cache import PagedKVCache
from lmstack.model import Transformer
from lmstack.model.attention import Attention
from lmstack.model.layers import MLP, RMSNorm
from lmstack.model.quantized import IntLinear
from lmstack.model.transformer import Block


# Up to this many rows the op's linears take dense_linear, beyond it MKL's GEMM. Measured with
# the engine's fused weights, one thread, paired interleaved runs (median dense_linear / F.linear
# time): 4 x 256 model 0.81 / 0.79 / 0.89 / 0.95 / 1.56 at 8 / 9 / 12 / 16 / 24 rows; 8 x 768 model
# 0.96 / 0.76 / 1.11 / 0.85 at 8 / 9 / 12 / 16 (best of runs: dense_linear faster at each).
# (fast_linear.MAX_ROWS, 8, is the module forward's own threshold.)
# Raised from 16 to 64 (offline batches of 17-32 decode rows now stay on dense_linear): MKL's GEMM
# parallelises with OpenMP, whose barrier waits for every worker; on a busy machine (load 3+ on
# 2 cores, 2 threads) a woken worker waits for a core and the whole step (bench_engine model,
# 32 rows, context 300) took 107-141 ms on MKL against 7.9 ms on dense_linear (pool.h's threads
# never make the caller wait). At load ~2 MKL was ahead: 4.7 vs 5.4 ms (24 rows) and 5.3 vs 6.4
# (32 rows) on 4 x 256, 39.8 vs 44.1 / 58.5 vs 57.3 ms on 8 x 768 (/tmp-style A/B in one process,
# GEMV_ROWS alternated). End to end (bench_engine 7's workload, 2 threads, medians of 3 interleaved
# runs, ratio to llama.cpp batched in the same runs): 4 x 256 1.80x -> 1.94x (load 3.1-3.5) and
# 1.55x -> 2.23x (load 1.5-2.4); 8 x 768 3.02x -> 3.79x (load 2.7-3.2). Kept for the tail it removes.
GEMV_ROWS = 64


def unsupported(model: nn.Module, cache: PagedKVCache) -> str | None:
    """Why the fused step cannot run this model and cache (None: it can)."""
    if type(model) is not Transformer:
        return f"the model is a {type(model).__name__}, not a decoder-only Transformer"
    cfg = model.config
    checks = {
        "arch": cfg.arch == "decoder" and not cfg.cross_attention, "mask": cfg.mask == "causal",
        "norm": cfg.norm == "rmsnorm", "norm_placement": cfg.norm_placement == "pre", "mlp": cfg.mlp == "swiglu",
        "n_expert": not cfg.n_expert, "pos_emb": cfg.pos_emb in ("rope", "none"), "qk_norm": not cfg.qk_norm,
        "scale_head": not cfg.scale_head, "embed_norm": not cfg.embed_norm, "n_token_types": not cfg.n_token_types,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        return f"config {', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)} is not a pre-norm RMSNorm SwiGLU decoder"
    if cache.quantized or cache.k.dtype != torch.float32 or cache.k.device.type != "cpu":
        return "the KV cache is not float32 on the CPU"
    if model.wte.weight.dtype != torch.float32 or model.wte.weight.device.type != "cpu":
        return "the model is not float32 on the CPU"
    return None


class _Plan:
    """The op's weights as gathered from the modules (`ok`: all of them were what the op
    computes), and what must still hold for the gathering to stand: every (dict, key, value)
    in `expect` (each module where its parent holds it, each parameter where its module holds
    it, also the one that made it fail) and the embedding's dtype (`model.to` converts in
    place). A plan that stands is not gathered again, failed or not: a model the op does not
    cover (NF4, LoRA, pruned) costs one identity pass a step, not a walk. It is used while no
    hook is in any of `hooks` and no instance `forward` is set (checked live, `usable`)."""

    def __init__(self, dtype: torch.dtype):
        self.ok = False
        self.dtype = dtype
        self.weights: list[Tensor] = []
        self.biases: list[Tensor | None] = []
        self.expect: list[tuple[dict, str, object]] = []
        self.hooks: list[dict] = []
        self.instance_dicts: list[dict] = []      # a `forward` set on an instance replaces its class's
        self.linears: list[Tensor] = []           # (_linear's hand-over to _gather)
        self.quant: list[Tensor | None] = []      # 3 a linear: scale, zero, awq_scale (decode_step's quant)
        self.quant_meta: list[int] = []           # 3 a linear: bits (0: float32), group_size, act_block
        self.quantized = False
        self._check: tuple | None = None

    def child(self, parent: nn.Module, name: str, kind: type) -> nn.Module | None:
        m = parent._modules.get(name)
        self.expect.append((parent._modules, name, m))
        if type(m) is not kind:
            return None
        self.hooks += (m._forward_hooks, m._forward_pre_hooks)
        if kind is not nn.Linear:   # (an nn.Linear's instance forward is fast_linear.py's, the same product)
            self.instance_dicts.append(vars(m))
        return m

    def param(self, m: nn.Module, name: str, vector: bool = False) -> Tensor | None:
        """A float32 CPU contiguous parameter (or None, also when absent), recorded as expected."""
        t = m._parameters.get(name)
        self.expect.append((m._parameters, name, t))
        if t is None or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or \
                (t.dim() == 1) != vector:
            return None
        return t

    def stands(self, dtype: torch.dtype) -> bool:
        if self._check is None:   # (dicts, keys, values) as three tuples: the test below runs in C
            self._check = tuple(zip(*self.expect))
        dicts, keys, values = self._check
        return dtype is self.dtype and all(map(operator.is_, map(dict.get, dicts, keys), values))

    def usable(self) -> bool:
        return self.ok and not any(self.hooks) and not any("forward" in d for d in self.instance_dicts)


# IntLinear's settings the op reads; re-assigned ones re-gather the plan
_INT_ATTRS = ("bits", "group_size", "symmetric", "awq", "act_bits", "act_block", "base_linear_shape")


def _linear(plan: _Plan, parent: nn.Module, name: str) -> bool:
    """Append linear `name` of `parent` to the plan: a float32 nn.Linear, or an IntLinear
    (INT8 / INT4 codes, weight-only or W8A8, RTN / GPTQ / AWQ) whose forward runs the compiled
    kernels on float32 inputs; False for anything else (NF4, LoRA, pruned wrappers ...)."""
    m = parent._modules.get(name)
    kind = type(m) if type(m) in (nn.Linear, IntLinear) else nn.Linear
    if plan.child(parent, name, kind) is None:
        return False
    b = m._parameters.get("bias")
    plan.expect.append((m._parameters, "bias", b))
    if b is not None and plan.param(m, "bias", vector=True) is None:
        return False
    if kind is nn.Linear:
        w = plan.param(m, "weight")
        meta, stats = (0, 0, 0), (None, None, None)
    else:   # what IntLinear.forward passes to kernels.quant_linear(_a8) where its _kernel_fits
        d = vars(m)
        plan.expect += [(d, a, d.get(a)) for a in _INT_ATTRS + ("bias",)]
        if d.get("bias") is not None:   # a plain-tensor bias (not a Parameter): not where the op looks
            return False
        bufs = [_buffer(plan, m, n) for n in ("weight", "weight_scale", "weight_zero", "awq_scale")]
        w, scale, zero, awq = bufs
        if w is None or w.dtype != torch.uint8 or scale is None or scale.dtype != torch.float32 or \
                (zero is None) != m.symmetric or (awq is None) == m.awq or (awq is not None and awq.dtype != torch.float32):
            return False
        meta, stats = (m.bits, m.group_size, m.act_block or 0), (scale, zero, awq)
        plan.quantized = True
    if w is None:
        return False
    plan.linears.append(w)
    plan.quant += stats
    plan.quant_meta += meta
    return True


def _buffer(plan: _Plan, m: nn.Module, name: str) -> Tensor | None:
    """A contiguous CPU buffer (or None, also when absent), recorded as expected."""
    t = m._buffers.get(name)
    plan.expect.append((m._buffers, name, t))
    return t if t is not None and t.device.type == "cpu" and t.is_contiguous() else None


def _gather(model: Transformer) -> _Plan:
    """The weights in decode_step's order; ok False where a module is not what the op computes
    (replaced by LoRA / NF4 / pruned modules, a weight not float32)."""
    plan = _Plan(model.wte.weight.dtype)
    plan.hooks += (model._forward_hooks, model._forward_pre_hooks)
    plan.instance_dicts.append(vars(model))
    blocks = plan.child(model, "blocks", nn.ModuleList)
    if blocks is None:
        return plan
    for i in range(len(blocks)):
        block = plan.child(blocks, str(i), Block)
        attn = block and plan.child(block, "attn", Attention)
        mlp = block and plan.child(block, "mlp", MLP)
        if attn is None or mlp is None:
            return plan
        for parent, name in ((block, "attn_norm"), (attn, "qkv"), (attn, "proj"), (block, "mlp_norm"), (mlp, "fc"),
                             (mlp, "proj")):
            if name.endswith("norm"):
                m = plan.child(parent, name, RMSNorm)
                w = m and plan.param(m, "weight", vector=True)
                if w is None:
                    return plan
                plan.weights.append(w)
                continue
            if not _linear(plan, parent, name):
                return plan
            plan.weights.append(plan.linears.pop())
            plan.biases.append(parent._modules[name]._parameters.get("bias"))
    norm_f, wte = plan.child(model, "norm_f", RMSNorm), plan.child(model, "wte", nn.Embedding)
    plan.norm_f = norm_f and plan.param(norm_f, "weight", vector=True)
    plan.wte = wte and plan.param(wte, "weight")
    if plan.norm_f is None or plan.wte is None or not _linear(plan, model, "lm_head") or \
            model.lm_head._parameters.get("bias") is not None:
        return plan
    plan.head = plan.linears.pop()
    if not plan.quantized:
        plan.quant, plan.quant_meta = [], []
    plan.ok = True
    return plan


class FusedDecode:
    def __init__(self, model: nn.Module, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.why_not = unsupported(model, cache)
        if self.why_not is None:
            cfg = model.config
            self.eps = next(iter(model.blocks)).attn_norm.eps
            self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
            self.args = (cfg.n_head, cfg.n_kv_head)
        self.plan: _Plan | None = None
        self.steps = 0          # decode steps taken on the fused op (tests read it)

    def __call__(self, ids: Tensor, positions: Tensor, tables: Tensor, max_pos: int) -> Tensor | None:
        """ids (B, 1), positions (B, 1) int64 (all >= 0, the largest max_pos), tables (B, n_blk)
        int64 -> logits (B, V), with every layer's K/V written; None (nothing written) where the
        op does not apply."""
        m = self.model
        if self.why_not is not None or not kernels.available() or (m.training and m.config.dropout > 0) or (
                nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks) or \
                torch.is_autocast_enabled("cpu"):          # the modules would compute in another dtype
            return None
        plan = self.plan
        if plan is None or not plan.stands(m.wte.weight.dtype):
            plan = self.plan = _gather(m)       # weights replaced, modules swapped, dtype converted
        if not plan.usable():
            return None
        if plan.quantized and torch.is_grad_enabled():   # QuantLinear.forward may take DequantLinear's F.linear
            return None
        cos = sin = None
        if m.rope is not None:
            cos, sin = m.rope.tables(positions.device, max_pos + 1)                # (P, rot)
        c = self.cache
        self.steps += 1
        return kernels.decode_step(ids.view(-1), positions, tables, c.k, c.v, cos, sin, plan.wte, plan.weights,
                                   plan.biases, plan.norm_f, plan.head, *self.args, self.eps, c.block_size,
                                   self.scale, m.config.sliding_window, GEMV_ROWS, plan.quant, plan.quant_meta)
