"""GPTQ (Frantar et al. 2022): quantize a linear's weight one input column at a time, moving
each column's rounding error onto the columns not yet quantized so the layer output on the
calibration inputs X changes as little as possible.

    minimise || W X^T - Q X^T ||^2   with   H = 2 X^T X / N   (in, in), X (N, in)

Per column j (in quantization order), with U the upper Cholesky factor of H^-1:
    q_j   = nearest grid point of w_j                     (the RTN grid of rtn.py)
    err_j = (w_j - q_j) / U[j, j]
    w_k  -= err_j * U[j, k]    for the columns k > j
Updates are applied lazily: inside a batch of `block_size` columns at once, to later columns
with one matmul per batch (the paper's "lazy batch" trick, §4 step 2).

Dampening: H + lambda I with lambda = damp_percent * mean(diag H). A Hessian that is still
not positive definite (too few or degenerate inputs) gets lambda x 10 and another try, up to
6 times, instead of a crash. Inputs that were always zero (diag H = 0) get H[j, j] = 1: their
column is then plain RTN and sends no error elsewhere. (The reference also zeroes such
columns of W; we keep them, so inputs unseen in calibration still get the float weights'
rounding.)

Groups: without act-order, a group's scale and zero point are chosen when its first column
is reached, from the weights as updated so far (the reference's behaviour). With act-order
(columns by decreasing diag H, the paper's "desc_act"), groups would no longer be contiguous
in the stored order, so their parameters are fixed up front from the original weights
("static groups"), which keeps the module format the same as RTN's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lmstack.model.quantized import QuantError
from lmstack.quant.rtn import from_codes, grid_params, to_codes

DAMP_RETRIES = 6


class HessianStat:
    """Running H = 2 X^T X / N over every input row a linear sees (float32, (in, in))."""

    def __init__(self):
        self.H: Tensor | None = None
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()                  # (N, in)
        if self.H is None:
            self.H = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        n_new = x.shape[0]
        if n_new == 0:
            return
        self.H.mul_(self.n / (self.n + n_new))                  # keep it an average as rows arrive
        self.n += n_new
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


def _inverse_cholesky(H: Tensor, damp_percent: float, name: str) -> Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, raising lambda until it exists."""
    H = H.double()
    mean_diag = H.diagonal().mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = damp_percent
    for _ in range(DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U.float()
        damp *= 10
    raise QuantError(f"GPTQ on {name}: the Hessian stays singular after dampening up to {damp / 10:g} x "
                     f"mean(diag H); the calibration inputs are degenerate (NaN or infinite activations?)")


@torch.no_grad()
def gptq_quantize(weight: Tensor, H: Tensor, bits: int, group_size: int | None, symmetric: bool,
                  damp_percent: float = 0.01, act_order: bool = False, block_size: int = 128,
                  dtype: torch.dtype = torch.float32, name: str = "linear"
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """weight (out, in), H (in, in) -> codes (out, in) long, scale (out, G), zero (out, G) long or None."""
    W = weight.detach().float().clone()
    out_f, in_f = W.shape
    g = group_size or in_f
    H = H.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0                      # (no input at all: H = I, and GPTQ is exactly RTN)
    static = act_order or g == in_f          # all group parameters from the original weights
    scale = torch.zeros(out_f, in_f // g, device=W.device)
    zero = None if symmetric else torch.zeros(out_f, in_f // g, device=W.device)
    if static:
        scale, zero = grid_params(W, bits, g, symmetric, dtype)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    # per-column grid parameters in quantization order (out, in); dynamic groups fill theirs on arrival
    S = scale[:, perm // g] if static else torch.zeros_like(W)
    Z = None if zero is None else (zero[:, perm // g] if static else torch.zeros_like(W))
    U = _inverse_cholesky(H, damp_percent, name)
    codes = torch.zeros(out_f, in_f, device=W.device)
    B = -(-block_size // g) * g if not static else block_size   # a group never spans two batches
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % g == 0:    # a new group: parameters from its current weights
                s, z = grid_params(W1[:, i:i + g], bits, g, symmetric, dtype)
                scale[:, j // g], S[:, j:j + g] = s[:, 0], s
                if zero is not None:
                    zero[:, j // g], Z[:, j:j + g] = z[:, 0], z
            s_col, z_col = S[:, j], None if Z is None else Z[:, j]
            w = W1[:, i]
            q = to_codes(w, s_col, z_col, bits)
            codes[:, j] = q
            err = (w - from_codes(q, s_col, z_col, bits)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]    # the lazy batch update of all later columns
    codes = codes[:, torch.argsort(perm)]    # back to the stored column order
    return codes.long(), scale, None if zero is None else zero.long()
