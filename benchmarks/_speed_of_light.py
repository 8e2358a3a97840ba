"""The CPU's limits and how close the engine's linears come to them (bench_engine.py prints it).

    copy_rate()            GB/s of a large float32 copy (bytes read + written)
    read_rate()            GB/s of a large float32 sum (bytes read only): the bound of a GEMV,
                           which streams its weight and writes almost nothing
    gemm_rate()            GFLOP/s of a 1024^3 float32 matmul (MKL): the compute bound
    linear_rates(model)    the model's nn.Linear layers as the engine runs them (infer/fast_linear.py)
                           at 1 row (decode: GB/s of weight) and 256 rows (prefill: GFLOP/s),
                           and F.linear (MKL) at 1 row beside them

At batch-1 decode a linear reads each weight once for 2 flops: bandwidth-bound, so its GB/s
against the read rate is the distance to the limit (a copy also writes, so a pure read stream
can beat the copy rate; both are printed). A small model's weights fit the caches and
can beat the DRAM copy rate; the big model's do not.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn


def _best(fn, reps: int = 5, inner: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def copy_rate(mb: int = 256) -> float:
    a = torch.ones(mb << 18)                 # mb MiB of float32
    b = torch.empty_like(a)
    return 2 * a.nbytes / _best(lambda: b.copy_(a)) / 1e9


def read_rate(mb: int = 256) -> float:
    a = torch.ones(mb << 18)                 # mb MiB of float32
    return a.nbytes / _best(lambda: a.sum()) / 1e9


def gemm_rate(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _best(lambda: a @ b) / 1e9


@torch.inference_mode()
def linear_rates(model: nn.Module, fast) -> dict:
    """fast: the engine runner's DecodeLinears (its active() routes the few-row linears)."""
    lins = [m for m in model.modules() if type(m) is nn.Linear]
    nbytes = sum(m.weight.nbytes for m in lins)
    n_w = sum(m.weight.numel() for m in lins)
    out = {"weights_mb": nbytes / 1e6, "n_linears": len(lins)}
    for rows in (1, 256):
        xs = [torch.randn(rows, m.in_features) for m in lins]
        with fast.active():
            t = _best(lambda: [m(x) for m, x in zip(lins, xs)], inner=20 if rows == 1 else 2)
        out[rows] = (nbytes / t / 1e9, 2 * rows * n_w / t / 1e9, t * 1e3)      # GB/s, GFLOP/s, ms
    xs = [torch.randn(1, m.in_features) for m in lins]
    t = _best(lambda: [F.linear(x, m.weight, m.bias) for m, x in zip(lins, xs)], inner=20)
    out["mkl_1"] = (nbytes / t / 1e9, 2 * n_w / t / 1e9, t * 1e3)
    return out


def report(model: nn.Module, fast, label: str, copy_gbs: float, gemm_gflops: float, read_gbs: float) -> str:
    r = linear_rates(model, fast)
    (gb1, _, ms1), (_, gf256, _), (mkl_gb, _, mkl_ms) = r[1], r[256], r["mkl_1"]
    return (f"speed of light, {label} (load average {os.getloadavg()[0]:.1f}: above ~2 on 2 cores, compare the "
            f"ratios, not the GB/s): {r['n_linears']} linears, {r['weights_mb']:.1f} MB of float32 weights. "
            f"Decode (1 row): {ms1:.2f} ms a token, {gb1:.1f} GB/s = {gb1 / read_gbs:.0%} of the read rate "
            f"{read_gbs:.1f} GB/s ({gb1 / copy_gbs:.0%} of the copy rate {copy_gbs:.1f} GB/s; F.linear/MKL: "
            f"{mkl_ms:.2f} ms, {mkl_gb:.1f} GB/s; ours {mkl_ms / ms1:.2f}x it). "
            f"Prefill (256 rows): {gf256:.1f} GFLOP/s = {gf256 / gemm_gflops:.0%} of the GEMM rate "
            f"{gemm_gflops:.1f} GFLOP/s")
