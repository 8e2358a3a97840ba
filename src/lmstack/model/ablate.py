"""Ablations: break a trained or untrained model on purpose, in place, without a second model class.

    hooks = lesion_qkv(model, "zero_v")   # every self-attention's values zeroed (forward hooks)
    hooks.remove()                         # ... and restored
    strip_norms(model)                     # every RMSNorm / LayerNorm -> identity
    strip_activations(model)               # every MLP nonlinearity -> identity

Experiments (the labs) ask "what if this part were missing or wired wrongly?". Each answer is
applied here to the one Transformer, so an experiment adds no model code of its own:

lesion_qkv(model, kind): a forward hook on each self-attention's fused `qkv` linear rewrites its
output (B, T, (H + 2 KV) * D), rows [q | k | v], before attention reads it:
    swap_qk   queries and keys trade places (n_kv_head must equal n_head: same shapes)
    swap_kv   keys and values trade places
    zero_q    q = 0: every score is 0, attention is uniform over the visible keys
    zero_k    k = 0: the same uniform attention, reached from the other side
    zero_v    v = 0: attention outputs nothing; the block is its MLP alone
The hooks act in training and inference alike and change no parameter, so a model can train
with a lesion, or get one after training; `remove()` undoes them.

strip_norms / strip_activations replace modules or functions in place; they cannot be undone
(build the model again) and the stripped norms' weights leave the state dict. For a gated MLP
(SwiGLU, gated GELU) strip_activations leaves act(gate) * up as gate * up, still a product of
two projections; a plain MLP (gelu, relu) becomes linear.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.model.attention import Attention
from lmstack.model.layers import MLP, RMSNorm
from lmstack.utils import LmstackError
from lmstack.utils.hooks import HookHandles

LESIONS = ("swap_qk", "swap_kv", "zero_q", "zero_k", "zero_v")


def _rewire(kind: str, H: int, KV: int, D: int):
    def hook(module: nn.Module, inputs, out: Tensor) -> Tensor:
        q, k, v = out.split([H * D, KV * D, KV * D], dim=-1)               # (B, T, H*D), (B, T, KV*D) x 2
        if kind == "swap_qk":
            q, k = k, q
        elif kind == "swap_kv":
            k, v = v, k
        elif kind == "zero_q":
            q = torch.zeros_like(q)
        elif kind == "zero_k":
            k = torch.zeros_like(k)
        else:
            v = torch.zeros_like(v)
        return torch.cat([q, k, v], dim=-1)
    return hook


def lesion_qkv(model: nn.Module, kind: str) -> HookHandles:
    """Apply lesion `kind` (one of LESIONS) to every self-attention of `model`."""
    if kind not in LESIONS:
        raise LmstackError(f"unknown lesion {kind!r}; valid: {', '.join(LESIONS)}")
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if not attns:
        raise LmstackError(f"{type(model).__name__} has no self-attention to lesion")
    handles = []
    for a in attns:
        if kind == "swap_qk" and a.n_kv_head != a.n_head:
            raise LmstackError(f"swap_qk needs as many key heads as query heads; this model has n_head={a.n_head}, "
                               f"n_kv_head={a.n_kv_head}")
        handles.append(a.qkv.register_forward_hook(_rewire(kind, a.n_head, a.n_kv_head, a.head_dim)))
    return HookHandles(handles)


def strip_norms(model: nn.Module) -> int:
    """Replace every RMSNorm and LayerNorm of `model` by an identity; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (RMSNorm, nn.LayerNorm))]
    for name, _ in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    return len(targets)


def strip_activations(model: nn.Module) -> int:
    """Make every MLP's nonlinearity the identity (see the module docstring); returns how many."""
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    for m in mlps:
        m.act = nn.Identity()
    return len(mlps)
