"""AWQ (Lin et al. 2023): protect the weights of salient input channels by scaling them up
before round-to-nearest and the input down by the same factor.

    y = x W^T = (x diag(s)^-1) (W diag(s))^T,  quantize W diag(s) with RTN
    s = mean_tokens |x| ^ alpha,   normalised by sqrt(max(s) * min(s))

alpha is searched over 0, 1/n, ..., (n-1)/n on calibration activations X to minimise the
output error || X W^T - X (Q(W diag(s)) diag(s)^-1)^T ||^2 (alpha = 0 is plain RTN, so the
search never does worse than RTN on its calibration data). Input channels with large
activations get s > 1: their weights are rounded with a relatively finer step.

Where s goes: we keep it inside the module as `awq_scale` (the effective weight is
Q(W diag(s)) diag(s)^-1) instead of folding 1/s into the preceding norm or linear. Folding
saves one multiply per input but only works for some layers (a pre-norm before qkv or fc,
not a post-norm block or the MoE router's shared input) and would change weights that are
not in the quantized module; keeping it makes every AWQ linear self-contained. The
reference's extra weight-clipping search (auto_clip) is not done.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lmstack.quant.rtn import fake_quantize, rtn_quantize


class ActivationStat:
    """Mean |x| per input channel over every row, and up to `max_rows` rows kept for the search."""

    def __init__(self, max_rows: int = 4096):
        self.max_rows = max_rows
        self.abs_sum: Tensor | None = None
        self.n = 0
        self.rows: list[Tensor] = []
        self.kept = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()                  # (N, in)
        s = x.abs().sum(dim=0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += x.shape[0]
        take = min(self.max_rows - self.kept, x.shape[0])
        if take > 0:
            self.rows.append(x[:take])
            self.kept += take

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def X(self) -> Tensor:
        return torch.cat(self.rows)


def awq_scales(mean_abs: Tensor, alpha: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """s (in,) = mean|x|^alpha, normalised so max(s) * min(s) = 1, rounded to the storage dtype."""
    s = mean_abs.float().clamp(min=1e-4).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.to(dtype).float()


@torch.no_grad()
def awq_search(weight: Tensor, X: Tensor, mean_abs: Tensor, bits: int, group_size: int | None,
               symmetric: bool, n_grid: int = 20, dtype: torch.dtype = torch.float32
               ) -> tuple[Tensor, float, list[float]]:
    """Best s (in,) for weight (out, in) on activations X (N, in); also its alpha and the
    output error of every alpha tried (mean squared, alpha = k / n_grid)."""
    W = weight.detach().float()
    X = X.float()
    Y = X @ W.t()                                                   # (N, out) float outputs
    errors, best = [], (float("inf"), None, 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = awq_scales(mean_abs, alpha, dtype)
        Wq = fake_quantize(W * s, bits, group_size, symmetric, dtype) / s
        err = (X @ Wq.t() - Y).pow(2).mean().item()
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], errors


def awq_quantize(weight: Tensor, s: Tensor, bits: int, group_size: int | None, symmetric: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor | None]:
    """RTN of W diag(s): codes (out, in), scale (out, G), zero or None."""
    return rtn_quantize(weight.detach().float() * s, bits, group_size, symmetric, dtype)
