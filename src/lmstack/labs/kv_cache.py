"""Lab 6: the KV cache. Time, FLOPs and memory per generated token, with and without it, and
the prefix cache's hits and misses.

  - Without a cache, generating the token after L tokens means running the model over all L
    (the plain forward). With `ContiguousKVCache` (model/cache.py) the L tokens' keys and
    values are kept, and the step runs one token attending to the L cached ones. Both paths are
    timed (best of several repeats: the machine is shared) and their FLOPs counted with
    torch's FlopCounterMode, which a noisy machine cannot disturb.
  - Memory: the cache holds K and V for every layer and position, 2 * n_layer * n_kv_head *
    head_dim * bytes per token: the tensors' real sizes are read back and checked against the
    formula, and the engine's paged cache is read from `llm.stats()` (blocks in use at peak).
  - Prefix cache: requests that share a long prefix go through the engine one after another,
    with prefix caching on and off; each request's cached prompt tokens (num_cached_tokens)
    and llm.stats()'s hit rate show which blocks were computed and which were reused.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.paged_cache import PagedKVCache
from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import build_model
from lmstack.model import ContiguousKVCache, ModelConfig


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def decode_step_costs(model, L: int, repeats: int, seed: int) -> dict:
    """Cost of producing the token after L tokens: the full forward vs one cached step."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, L + 1), generator=g)
    cache = ContiguousKVCache(cfg.n_layer, 1, L + 1, cfg.n_kv_head, cfg.head_dim)
    model(ids[:, :L], cache=cache)                                         # prefill: the L cached tokens
    last, pos = ids[:, L:], torch.tensor([[L]])

    def cached():   # writes position L again each time: the same values, so every repeat is the same step
        return model(last, positions=pos, cache=cache)

    def uncached():
        return model(ids)

    diff = float((cached()[0, -1] - uncached()[0, -1]).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"the cached step's logits differ from the full forward's by {diff}")
    return {"max_logit_diff": diff, "time_cached_s": _best_time(cached, repeats),
            "time_uncached_s": _best_time(uncached, repeats),
            "flops_cached": _flops(cached), "flops_uncached": _flops(uncached),
            "cache_bytes": int(cache.k.nbytes + cache.v.nbytes)}


def run(ctx: LabContext) -> LabResult:
    lengths = ctx.pick([16, 64, 256], [16, 32, 64, 128, 256, 512, 1024])
    cfg = ModelConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=128, context_length=max(lengths) + 1)
    model = build_model(cfg, ctx.seed).eval()
    repeats = ctx.pick(5, 20)
    costs = {}
    for L in lengths:
        ctx.log(f"  decode after {L} tokens")
        costs[L] = decode_step_costs(model, L, repeats, ctx.seed)
    per_token = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 4                # fp32 K and V, all layers
    formula_ok = all(costs[L]["cache_bytes"] == per_token * (L + 1) for L in lengths)

    # the engine's paged cache: blocks in use at the peak of one request of each length
    block = 16
    paged = {}
    for L in lengths:
        llm = LLM(model, device="cpu", block_size=block, kv_cache_tokens=2 * (max(lengths) + 32))
        prompt = [1 + i % (cfg.vocab_size - 1) for i in range(L)]
        llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
        paged[L] = llm.stats()["kv_peak_blocks_used"] * block * PagedKVCache.bytes_per_token(
            cfg.n_layer, cfg.n_kv_head, cfg.head_dim, torch.float32)

    prefix = _prefix_runs(model, cfg, ctx)
    Lmax = max(lengths)
    c = costs[Lmax]
    flop_ratio = c["flops_uncached"] / c["flops_cached"]
    time_ratio = c["time_uncached_s"] / c["time_cached_s"]
    on, off = prefix["on"], prefix["off"]
    holds = (flop_ratio > Lmax / 4 and time_ratio > 1.5 and formula_ok and on["cached_tokens"] > 0
             and off["cached_tokens"] == 0)
    insight = Insight(
        "The KV cache makes each new token cost one token's compute instead of the whole sequence's, for memory "
        "that grows linearly with the sequence; a shared prefix is computed once",
        holds, f"after {Lmax} tokens a cached step takes {flop_ratio:.0f}x fewer FLOPs and runs {time_ratio:.1f}x "
               f"faster than recomputing; the cache holds {per_token} bytes per token ({per_token * Lmax / 1024:.0f} "
               f"KiB at {Lmax}); with prefix caching {on['cached_tokens']} of {on['prompt_tokens']} prompt tokens "
               f"came from the cache (hit rate {on['hit_rate']:.0%}), without it {off['cached_tokens']}")
    numbers = {"model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                         "params": model.num_params()},
               "per_length": {str(L): {**costs[L], "paged_cache_bytes_at_peak": paged[L]} for L in lengths},
               "flops_ratio_at_max_length": flop_ratio, "time_ratio_at_max_length": time_ratio,
               "cache_bytes_per_token": per_token, "cache_size_matches_formula": formula_ok,
               "prefix_cache": prefix}
    figures = [
        Figure("time_per_token", "Time to produce one token after L tokens, with and without the KV cache (best of "
               f"{repeats})", png=plot.curves_png(
                   {"no cache (full forward)": (lengths, [1e3 * costs[L]["time_uncached_s"] for L in lengths]),
                    "KV cache (one-token step)": (lengths, [1e3 * costs[L]["time_cached_s"] for L in lengths])},
                   "time per generated token", "sequence length L", "ms", logx=True, logy=True,
                   styles={"no cache (full forward)": "o-", "KV cache (one-token step)": "o-"})),
        Figure("flops_per_token", "FLOPs of that step (counted by torch's FlopCounterMode)", png=plot.curves_png(
            {"no cache": (lengths, [costs[L]["flops_uncached"] for L in lengths]),
             "KV cache": (lengths, [costs[L]["flops_cached"] for L in lengths])},
            "FLOPs per generated token", "sequence length L", "FLOPs", logx=True, logy=True,
            styles={"no cache": "o-", "KV cache": "o-"})),
        Figure("memory", "KV cache memory against sequence length: contiguous cache tensors, the engine's paged "
               "blocks at peak, and the formula", png=plot.curves_png(
                   {"contiguous (measured)": (lengths, [costs[L]["cache_bytes"] / 1024 for L in lengths]),
                    "paged, blocks at peak": (lengths, [paged[L] / 1024 for L in lengths]),
                    "2 x layers x kv heads x head_dim x 4 B x L": (lengths, [per_token * L / 1024 for L in lengths])},
                   "KV cache memory", "sequence length L", "KiB",
                   styles={"contiguous (measured)": "o-", "paged, blocks at peak": "s--",
                           "2 x layers x kv heads x head_dim x 4 B x L": ":"})),
        Figure("prefix_cache", "Prefix cache, request by request: each cell is one 16-token block of the prompt, "
               "green = reused from the cache, red = computed", png=_prefix_png(prefix, block)),
    ]
    built = [f"a {cfg.n_layer}-layer width-{cfg.n_embd} decoder (untrained: timing does not need training)",
             f"decode steps after {lengths} tokens, with ContiguousKVCache and by full recomputation, checked to give "
             f"the same logits, timed and FLOP-counted",
             "the engine (LLM) with its paged cache and prefix caching on and off, read through llm.stats()"]
    return LabResult(built, numbers, figures, insight)


def _prefix_runs(model, cfg: ModelConfig, ctx: LabContext) -> dict:
    """Requests sharing a 64-token prefix, sent one at a time, with prefix caching on and off."""
    g = np.random.default_rng(ctx.seed)
    shared = g.integers(1, cfg.vocab_size, 64).tolist()
    prompts = [shared + g.integers(1, cfg.vocab_size, int(g.integers(8, 24))).tolist()
               for _ in range(ctx.pick(5, 10))]
    prompts.insert(2, g.integers(1, cfg.vocab_size, 70).tolist())      # one request with nothing in common
    out = {}
    for mode, on in (("on", True), ("off", False)):
        llm = LLM(model, device="cpu", block_size=16, kv_cache_tokens=4096, enable_prefix_caching=on)
        reqs = []
        for p in prompts:
            r = llm.generate([p], SamplingParams(max_tokens=4, ignore_eos=True))[0]
            reqs.append({"prompt_tokens": len(p), "cached_tokens": r.num_cached_tokens})
        stats = llm.stats()
        out[mode] = {"requests": reqs, "prompt_tokens": sum(r["prompt_tokens"] for r in reqs),
                     "cached_tokens": sum(r["cached_tokens"] for r in reqs),
                     "hit_rate": stats["prefix_cache_hit_rate"], "hit_tokens": stats["prefix_cache_hit_tokens"]}
    return out


def _prefix_png(prefix: dict, block: int) -> bytes:
    reqs = prefix["on"]["requests"]
    fig, ax = plot.subplots(width=7.5, height=0.45 * len(reqs) + 1.2)
    for i, r in enumerate(reqs):
        n_blocks = -(-r["prompt_tokens"] // block)
        hits = r["cached_tokens"] // block
        for b in range(n_blocks):
            ax.add_patch(plot.pyplot().Rectangle((b, i), 0.92, 0.8, color="#2ca02c" if b < hits else "#d62728"))
        ax.text(n_blocks + 0.2, i + 0.4, f"{r['cached_tokens']}/{r['prompt_tokens']} cached", va="center", fontsize=8)
    ax.set_xlim(0, max(-(-r["prompt_tokens"] // block) for r in reqs) + 3)
    ax.set_ylim(len(reqs), -0.2)
    ax.set_yticks([i + 0.4 for i in range(len(reqs))], [f"request {i}" for i in range(len(reqs))])
    ax.set_xlabel("prompt block")
    ax.set_title(f"prefix cache on: hit rate {prefix['on']['hit_rate']:.0%} (off: {prefix['off']['hit_rate']:.0%})")
    return plot.to_png(fig)
