"""Lab 9: grouped-query attention. Convert a trained MHA model to GQA and MQA by mean-pooling
its K/V heads (`lmstack.model.gqa.to_gqa`, the GQA paper's conversion), then measure what the
fewer K/V heads buy and cost:
  - KV cache bytes per token: 2 x n_layer x n_kv_head x head_dim x 4 B, read from the cache;
  - decode latency and throughput at a large batch: one step of B sequences over a P-token
    ContiguousKVCache (best of several repeats), tokens/s = B / step time;
  - quality: held-out loss right after conversion and after a short uptraining through the
    Trainer (the paper uptrains for 5% of the original steps; here 5%, at least 10 steps). The
    MHA model is not trained further, so part of what uptraining recovers is just more training.
On a CPU with a micro model, a decode step's time is mostly the weight matmuls and Python,
not reading the cache, so the speed-up the cache saving brings on a GPU at long context may
not show: the page reports what this machine measured.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import position_losses, tiny_lm_config, tinyworld_data, train
from lmstack.model import ContiguousKVCache
from lmstack.model.gqa import to_gqa

N_HEAD = 8


@torch.no_grad()
def decode_step(model, batch: int, prefill: int, repeats: int, seed: int) -> tuple[float, int]:
    """(best seconds per decode step of `batch` rows after `prefill` cached tokens, cache bytes)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prefill + 1), generator=g)
    cache = ContiguousKVCache(cfg.n_layer, batch, prefill + 1, cfg.n_kv_head, cfg.head_dim)
    model(ids[:, :prefill], cache=cache)
    pos = torch.full((batch, 1), prefill)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids[:, prefill:], positions=pos, cache=cache)
        best = min(best, time.perf_counter() - t0)
    return best, int(cache.k.nbytes + cache.v.nbytes)


def run(ctx: LabContext) -> LabResult:
    data = tinyworld_data(ctx.seed)
    seq = ctx.pick(32, 64)
    steps = ctx.pick(150, 800)
    cfg = tiny_lm_config(data.vocab_size, context_length=256, n_head=N_HEAD)
    mha = train(ctx, "mha", cfg, steps=steps, data=data, seq_len=seq, batch_size=ctx.pick(8, 16), lr=6e-3)
    held = np.concatenate([data.tokens("val"), data.tokens("test")])
    batch, prefill, repeats = ctx.pick(32, 128), ctx.pick(64, 192), ctx.pick(5, 20)
    uptrain = max(10, steps // 20)
    groups = [N_HEAD, 4, 2, 1]
    res = {}
    for G in groups:
        model = mha.model if G == N_HEAD else to_gqa(mha.model, G).eval()
        loss = float(position_losses(model, held, seq, ctx.pick(60, 300)).mean())
        step_s, cache_bytes = decode_step(model, batch, prefill, repeats, ctx.seed)
        res[G] = {"val_loss": loss, "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s,
                  "cache_bytes_per_token": cache_bytes // (batch * (prefill + 1)), "params": model.num_params()}
        if G != N_HEAD:   # the paper's recipe: convert, then continue pretraining briefly
            up = train(ctx, f"uptrain-{G}", to_gqa(mha.model, G), steps=uptrain, data=data, seq_len=seq,
                       batch_size=ctx.pick(8, 16), lr=1e-3)
            res[G]["val_loss_uptrained"] = float(position_losses(up.model, held, seq, ctx.pick(60, 300)).mean())
    name = {G: "MHA" if G == N_HEAD else "MQA" if G == 1 else f"GQA-{G}" for G in groups}
    exact = all(res[G]["cache_bytes_per_token"] * N_HEAD == res[N_HEAD]["cache_bytes_per_token"] * G for G in groups)
    losses = [res[G]["val_loss"] for G in groups]
    holds = exact and losses[-1] > losses[0] and all(b >= a - 0.02 for a, b in zip(losses, losses[1:]))
    insight = Insight(
        "Sharing key/value heads shrinks the KV cache in proportion, at a quality cost that grows as the groups "
        "shrink (before any uptraining)",
        holds, f"cache per token {res[N_HEAD]['cache_bytes_per_token']} B with {N_HEAD} K/V heads, "
               f"{res[1]['cache_bytes_per_token']} B with 1; held-out loss "
               + ", ".join(f"{name[G]} {res[G]['val_loss']:.3f}" for G in groups))
    speed = res[1]["tokens_per_s"] / res[N_HEAD]["tokens_per_s"]
    notes = [f"Decode at batch {batch} after {prefill} cached tokens: MQA runs at {speed:.2f}x MHA's tokens/s on this "
             f"machine ({res[N_HEAD]['tokens_per_s']:,.0f} vs {res[1]['tokens_per_s']:,.0f} tokens/s). "
             + ("Fewer K/V heads paid off here." if speed > 1.05 else
                "At this size the step is dominated by weight matmuls and Python overhead, not by reading the "
                "cache, so the saving does not show as speed; it does where decoding is memory-bound (GPUs, long "
                "contexts, large batches).")]
    numbers = {"n_head": N_HEAD, "steps": steps, "uptrain_steps": uptrain, "cache_matches_formula": exact,
               "decode": {"batch": batch, "prefill": prefill, "repeats": repeats},
               "by_kv_heads": {name[G]: {"n_kv_head": G, **res[G]} for G in groups}, "mqa_speedup": speed}
    figures = [
        Figure("tradeoff", "K/V heads against cache size, decode throughput and held-out loss",
               png=_tradeoff_png(groups, res, uptrain)),
    ]
    built = [f"a {N_HEAD}-head MHA tiny tinyworld LM trained {steps} steps by the Trainer",
             f"GQA with {groups[1:-1]} K/V heads and MQA (1), converted by mean-pooling K/V heads (model/gqa.py)",
             f"decode steps at batch {batch} over a {prefill}-token ContiguousKVCache, timed",
             f"held-out loss of every conversion, before and after {uptrain} steps of uptraining"]
    return LabResult(built, numbers, figures, insight, notes)


def _tradeoff_png(kv: list[int], res: dict, uptrain: int) -> bytes:
    fig, axes = plot.subplots(ncols=3, width=13.0, height=3.8)
    axes[0].bar([str(g) for g in kv], [res[g]["cache_bytes_per_token"] for g in kv], color=plot.COLORS[0])
    axes[0].set_title("KV cache bytes per token")
    axes[1].bar([str(g) for g in kv], [res[g]["tokens_per_s"] for g in kv], color=plot.COLORS[2])
    axes[1].set_title("decode throughput (tokens/s)")
    axes[2].plot([str(g) for g in kv], [res[g]["val_loss"] for g in kv], "o-", color=plot.COLORS[1],
                 label="converted")
    axes[2].plot([str(g) for g in kv[1:]], [res[g]["val_loss_uptrained"] for g in kv[1:]], "s--",
                 color=plot.COLORS[3], label=f"uptrained {uptrain} steps")
    axes[2].set_title("held-out loss")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("K/V heads")
        ax.grid(alpha=0.3)
    return plot.to_png(fig)
