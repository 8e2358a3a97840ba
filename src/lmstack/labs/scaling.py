"""Lab 13: scaling laws. Nano -> tiny -> small -> medium (full: + large) models trained alike;
loss against parameters and compute with a fitted power law, extrapolated; memory, throughput
and wall-clock per size; and how small is too small.

Every size (GPT-2-style blocks: GELU MLP, which learns fastest of the MLPs in runs this short)
sees the same tokens (same steps, batch and sequence length) through the Trainer.
  N  parameters that compute (Transformer.num_params(non_embedding=True): the tied token table
     stays, it is the LM head's matmul), as in Kaplan et al. 2020;
  C  training compute = flops_per_token x tokens (6N + attention, PaLM's estimate);
  fit  log L = log a - alpha log N by least squares, i.e. L = a N^-alpha (the irreducible-loss
     term of the full law needs more sizes than a lab trains), with R^2; extrapolated to 10x the
     largest N. The same against C;
  memory  what training holds per parameter in float32 with AdamW: weights, gradients and two
     moments, 16 bytes;
  memory per rank  the same 16 bytes split over W data-parallel ranks as the ZeRO paper's stages
     do (Rajbhandari et al. 2020; `lmstack train --distributed ddp|zero1|zero2|zero3`): DDP
     holds all of it on every rank, ZeRO-1 shards the AdamW moments (4 + 4 + 8/W bytes per
     parameter), ZeRO-2 the gradients too (4 + 12/W), ZeRO-3 / FSDP the weights as well (16/W).
     These are the formulas, not a measurement; benchmarks/bench_parallel.py measures what each
     rank holds in 2 and 4 processes against them;
  too small  the unigram baseline is the loss of predicting every token from its frequency
     alone (lmstack.eval.unigram); what a model gains below it comes from using context. A size
     that gains less than SHARE of what the largest size gains is too small to use its context.
"""
from __future__ import annotations

import numpy as np

from lmstack.eval.unigram import token_counts, unigram_cross_entropy
from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import tiny_lm_config, tinyworld_data, train

SEQ = 32
SHARE = 0.5
SIZES = {"nano": dict(n_layer=1, n_embd=4, n_head=1, mlp="gelu"),
         "tiny": dict(n_layer=1, n_embd=16, n_head=2, mlp="gelu"),
         "small": dict(n_layer=2, n_embd=32, n_head=4, mlp="gelu"),
         "medium": dict(n_layer=2, n_embd=64, n_head=4, mlp="gelu"),
         "large": dict(n_layer=4, n_embd=128, n_head=4, mlp="gelu")}


RANKS = (1, 2, 4, 8)
ZERO = {"ddp": lambda W: 16.0, "zero1": lambda W: 8 + 8 / W, "zero2": lambda W: 4 + 12 / W,
        "zero3": lambda W: 16 / W}     # bytes per parameter per rank (fp32 weights, gradients, AdamW moments)


def per_rank_bytes(params: int) -> dict[str, dict[int, float]]:
    """Training memory per rank for each data-parallel mode and world size (ZERO's formulas)."""
    return {mode: {W: f(W) * params for W in RANKS} for mode, f in ZERO.items()}


def power_fit(x: list[float], y: list[float]) -> dict:
    """L = a x^-alpha fitted in log-log space: {"a", "alpha", "r2"}."""
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + slope * lx
    ss_res, ss_tot = float(((ly - pred) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    return {"a": float(np.exp(intercept)), "alpha": float(-slope), "r2": 1 - ss_res / ss_tot if ss_tot else 0.0}


def predict(fit: dict, x: float) -> float:
    return fit["a"] * x ** -fit["alpha"]


def run(ctx: LabContext) -> LabResult:
    names = ctx.pick(["nano", "tiny", "small", "medium"], list(SIZES))
    steps, batch = ctx.pick(120, 1000), ctx.pick(8, 16)
    data = tinyworld_data(ctx.seed, size_mb=ctx.pick(0.2, 1.0))
    unigram = unigram_cross_entropy(token_counts(data.tokens("train"), data.vocab_size), data.tokens("val"))
    res = {}
    for name in names:
        r = train(ctx, name, tiny_lm_config(data.vocab_size, context_length=SEQ, **SIZES[name]), steps=steps,
                  data=data, seq_len=SEQ, batch_size=batch, lr=6e-3, eval_every=max(1, steps // 5), eval_batches=8)
        m = r.model
        n = m.num_params(non_embedding=True)
        tokens = r.result["tokens"]
        res[name] = {"params": n, "params_total": m.num_params(), "val_loss": r.result["val_loss"],
                     "compute_flops": float(m.flops_per_token(SEQ)) * tokens, "tokens": tokens,
                     "train_memory_bytes": 16 * m.num_params(), "per_rank_bytes": per_rank_bytes(m.num_params()),
                     "tokens_per_s": r.result["tokens_per_s"],
                     "wall_clock_s": r.result["elapsed_s"], "beats_unigram_by": unigram - r.result["val_loss"],
                     "curve": r.curve("val")}
    N = [res[k]["params"] for k in names]
    C = [res[k]["compute_flops"] for k in names]
    L = [res[k]["val_loss"] for k in names]
    fit_n, fit_c = power_fit(N, L), power_fit(C, L)
    n_next = 10 * N[-1]
    best_gain = res[names[-1]]["beats_unigram_by"]
    for k in names:
        res[k]["share_of_largest_gain"] = res[k]["beats_unigram_by"] / best_gain
    too_small = [k for k in names if res[k]["share_of_largest_gain"] < SHARE]
    holds = (fit_n["alpha"] > 0 and fit_n["r2"] > 0.8 and all(a > b for a, b in zip(L, L[1:]))
             and bool(too_small) and names[-1] not in too_small)
    insight = Insight(
        "Loss falls as a power law in parameters and compute, and below some size a model barely beats counting "
        "token frequencies",
        holds, f"L = {fit_n['a']:.2f} N^-{fit_n['alpha']:.3f} (R^2 {fit_n['r2']:.2f}) over N = "
               f"{', '.join(f'{x:,}' for x in N)}, extrapolating to {predict(fit_n, n_next):.2f} at {n_next:,}; "
               f"against compute, alpha {fit_c['alpha']:.3f} (R^2 {fit_c['r2']:.2f}); the unigram baseline is "
               f"{unigram:.2f} and " + (f"{', '.join(too_small)} gain{'s' if len(too_small) == 1 else ''} less than "
                                        f"{SHARE:.0%} of what {names[-1]} gains below it: too small" if too_small
                                        else f"every size gains at least {SHARE:.0%} of what {names[-1]} gains"))
    numbers = {"steps": steps, "batch_size": batch, "seq_len": SEQ, "unigram_baseline": unigram,
               "too_small_share": SHARE, "too_small": too_small,
               "sizes": {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in res.items()},
               "fit_params": fit_n, "fit_compute": fit_c,
               "extrapolated": {"params": n_next, "val_loss": predict(fit_n, n_next)}}
    figures = [
        Figure("loss_vs_params", "Val loss against parameters (log-log) with the fitted power law, extrapolated",
               png=_fit_png(N, L, fit_n, n_next, "non-embedding parameters N", unigram, names)),
        Figure("loss_vs_compute", "Val loss against training compute (log-log) with the fitted power law",
               png=_fit_png(C, L, fit_c, 10 * C[-1], "training FLOPs C", unigram, names)),
        Figure("cost", "Per size: training memory (weights, gradients, AdamW moments), throughput, wall-clock",
               png=_cost_png(res, names)),
        Figure("memory_per_rank", "Training memory per rank when the largest size is trained on 1-8 data-parallel "
               "ranks: DDP, ZeRO-1, ZeRO-2, ZeRO-3 (the ZeRO paper's formulas)", png=_ranks_png(res[names[-1]],
                                                                                                names[-1])),
        Figure("curves", "Val loss during training, per size", png=plot.curves_png(
            {k: res[k]["curve"] for k in names}, "training curves", "step", "loss (nats/token)",
            styles={k: "o-" for k in names}, hlines={"unigram baseline": unigram})),
    ]
    built = [f"{len(names)} tiny tinyworld LMs ({', '.join(f'{k}: {SIZES[k]}' for k in names)}), each trained "
             f"{steps} steps of {batch}x{SEQ} tokens by the Trainer", "power-law fits of loss against parameters and "
             "compute (least squares in log-log)", "the unigram baseline from lmstack.eval.unigram"]
    return LabResult(built, numbers, figures, insight)


def _fit_png(x: list[float], y: list[float], fit: dict, x_next: float, xlabel: str, unigram: float,
             names: list[str]) -> bytes:
    fig, ax = plot.subplots(width=7.0, height=4.2)
    ax.plot(x, y, "o", color=plot.COLORS[0], markersize=8, label="measured")
    for xi, yi, n in zip(x, y, names):
        ax.annotate(n, (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=8)
    xs = np.geomspace(min(x) / 1.5, x_next, 50)
    ax.plot(xs, [predict(fit, v) for v in xs], "--", color=plot.COLORS[1],
            label=f"L = {fit['a']:.2f} x^-{fit['alpha']:.3f} (R^2 {fit['r2']:.2f})")
    ax.plot([x_next], [predict(fit, x_next)], "*", color=plot.COLORS[1], markersize=12, label="extrapolated")
    ax.axhline(unigram, linestyle=":", color="#555", label="unigram baseline")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return plot.to_png(fig)


def _cost_png(res: dict, names: list[str]) -> bytes:
    fig, axes = plot.subplots(ncols=3, width=12.0, height=3.6)
    for ax, key, title, scale in zip(axes, ("train_memory_bytes", "tokens_per_s", "wall_clock_s"),
                                     ("training memory (KiB)", "throughput (tokens/s)", "wall-clock (s)"),
                                     (1 / 1024, 1, 1)):
        vals = [res[k][key] * scale for k in names]
        ax.bar(names, vals, color=plot.COLORS[: len(names)])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    return plot.to_png(fig)


def _ranks_png(size: dict, name: str) -> bytes:
    series = {mode: (list(RANKS), [size["per_rank_bytes"][mode][W] / 1024 for W in RANKS]) for mode in ZERO}
    return plot.curves_png(series, f"training memory per rank, {name} ({size['params_total']:,} parameters)",
                           "data-parallel ranks W", "KiB per rank", logx=True, styles={m: "o-" for m in ZERO})
