"""Sparse Mixture of Experts: a top-k router over n_expert MLPs (Switch / Mixtral style).

Each token's router logits give a softmax over all experts; the k most probable experts
process the token and their outputs are mixed with the selected probabilities renormalised
to sum to one. (Softmax over all then renormalising the top k equals a softmax over the
selected logits, which is how the Mixtral paper writes it.)

The layer keeps, from its last forward, the router logits and the chosen experts so the
model can compute the auxiliary losses (`load_balancing_loss`, `router_z_loss`) and expose
per-expert token counts for plots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.config import ModelConfig
from lmstack.model.layers import MLP


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_expert, self.top_k = cfg.n_expert, cfg.n_expert_per_token
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_expert))
        self.last_logits: Tensor | None = None   # (N, E) router logits of the last forward
        self.last_experts: Tensor | None = None  # (N, k) chosen experts
        self.last_counts: Tensor | None = None   # (E,) tokens routed to each expert

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        xf = x.reshape(-1, C)                                       # (N, C), N = B*T
        logits = self.router(xf)                                    # (N, E)
        probs = logits.float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)           # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        # group the N*k (token, expert) assignments by expert: one matmul per expert
        flat = experts.flatten()                                    # (N*k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_expert)
        token_of = order // self.top_k                              # token index of each sorted assignment
        weight_of = weights.flatten()[order]
        out = torch.zeros_like(xf)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                idx = token_of[start:start + n]
                y = self.experts[e](xf[idx]) * weight_of[start:start + n, None]
                out.index_add_(0, idx, y.to(out.dtype))
                start += n
        self.last_logits, self.last_experts, self.last_counts = logits, experts, counts
        return out.view(B, T, C)


def load_balancing_loss(logits: Tensor, experts: Tensor, n_expert: int) -> Tensor:
    """Switch Transformer / Mixtral auxiliary loss: n_expert * sum_e f_e * P_e.

    logits (N, E) router logits and experts (N, k) chosen experts, over all tokens of all
    MoE layers concatenated (as Hugging Face's Mixtral does). f_e is the fraction of tokens
    whose top-k includes e (summed over the k choices, so sum_e f_e = k), P_e the mean router
    probability of e. Minimal (= k) when routing is uniform."""
    probs = logits.float().softmax(dim=-1)
    f = F.one_hot(experts, n_expert).float().mean(dim=0)            # (k, E)
    P = probs.mean(dim=0)                                           # (E,)
    return n_expert * (f * P[None]).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return logits.float().logsumexp(dim=-1).square().mean()
