"""Norms and the dense MLP.

- RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, computed in float32
  (as Llama does) and cast back; LayerNorm is torch's, with a bias (GPT-2).
- MLP: fc -> activation -> proj. For SwiGLU (Shazeer 2020) `fc` holds the gate and up
  projections stacked as rows [gate | up] so both come from one matmul; the hidden state is
  silu(gate) * up. GELU uses the tanh approximation (GPT-2's "gelu_new").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # low precision: normalise in float32 (the mean of squares loses too much in bf16)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class MLP(nn.Module):
    """Position-wise feed-forward: (B, T, C) -> (B, T, C) through intermediate_size hidden units."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.intermediate_size
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.proj(h)
