"""Norms and the dense MLP.

- RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, computed in float32
  (as Llama does) and cast back; LayerNorm is torch's, with a bias (GPT-2).
- MLP: fc -> activation -> proj. For the gated kinds (Shazeer 2020: SwiGLU, and T5 v1.1's
  gated GELU) `fc` holds the gate and up projections stacked as rows [gate | up] (one tensor
  to save and convert); the forward uses the two halves as views (see MLP._gated for why);
  the hidden state is act(gate) * up. "gelu" is the tanh approximation (GPT-2's "gelu_new"),
  "gelu_exact" the erf form (BERT's "gelu").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.config import GATED_MLPS, ModelConfig


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


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def activation(kind: str):
    """The elementwise nonlinearity of an `mlp` kind (of the gate, for the gated kinds)."""
    if kind == "swiglu":
        return F.silu
    if kind in ("gelu", "gated_gelu"):
        return gelu_tanh
    if kind == "gelu_exact":
        return F.gelu
    return F.relu


class MLP(nn.Module):
    """Position-wise feed-forward: (B, T, C) -> (B, T, C) through intermediate_size hidden units."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.gated = cfg.mlp in GATED_MLPS
        self.act = activation(cfg.mlp)
        hidden = cfg.intermediate_size
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.gated else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.proj(self._gated(x))
        return self.proj(self.act(self.fc(x)))

    def _gated(self, x: Tensor) -> Tensor:
        """act(x W_gate^T) * (x W_up^T), (..., C) -> (..., hidden).

        The fused [gate | up] weight is used as two row-block views, two matmuls: the GEMMs
        cost the same as one of twice the width, but gate and up then come out contiguous,
        so the activation reads no strided view and the backward pass needs no cat of the two
        halves into one (N, 2*hidden) gradient (measured ~5-10% faster per MLP forward+backward
        on CPU). Without autograd (inference), and for a wrapped or replaced `fc` (LoRA,
        quantized), `fc` is called as a whole instead: one matmul (the decode engine's GEMV)."""
        fc = self.fc
        if type(fc) is not nn.Linear or not torch.is_grad_enabled():   # no backward: one matmul, fewer ops
            gate, up = fc(x).chunk(2, dim=-1)
            return self.act(gate) * up
        w_gate, w_up = fc.weight.chunk(2, dim=0)                      # (hidden, C) views
        b_gate, b_up = fc.bias.chunk(2) if fc.bias is not None else (None, None)
        return self.act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)
