"""The engine's greedy output against a plain no-cache loop, under every scheduling path."""
from __future__ import annotations

import random

import pytest
import torch

from lmstack.infer import LLM, SamplingParams
from tests.infer.conftest import plain_greedy, tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("variant", [
    dict(),                                                   # RoPE + GQA
    dict(pos_emb="learned", norm="layernorm", mlp="gelu", n_kv_head=4),
    dict(pos_emb="alibi", n_kv_head=1),
    dict(sliding_window=8),
])
def test_greedy_equals_plain_loop(variant):
    model = tiny_model(1, **variant)
    llm = LLM(model, block_size=4, kv_cache_tokens=512, max_num_batched_tokens=24)   # chunked prefill
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7] * 30, list(range(40, 53))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == plain_greedy(model, p, 12)
        assert o.outputs[0].finish_reason == "length"


def test_64_concurrent_requests_match_running_alone(model):
    """Small cache (preemption), shared prefixes (prefix cache), chunked prefill, mixed lengths."""
    rng = random.Random(0)
    shared = [rng.randrange(96) for _ in range(40)]
    prompts, params = [], []
    for i in range(64):
        body = [rng.randrange(96) for _ in range(rng.randrange(1, 60))]
        prompts.append(shared + body if i % 2 else body)
        params.append(SamplingParams(max_tokens=rng.randrange(1, 40), **GREEDY))
    alone = LLM(model, block_size=8, kv_cache_tokens=256)
    expected = [alone.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    llm = LLM(model, block_size=8, kv_cache_tokens=400, max_num_seqs=32, max_num_batched_tokens=64)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["prefix_cache_hit_tokens"] > 0
    assert any(o.num_cached_tokens > 0 for o in outs)
    llm.engine.block_manager.check_no_leaks()
    # and the "alone" runs equal the plain loop (spot check)
    for i in (0, 1, 17):
        assert expected[i] == plain_greedy(model, prompts[i], params[i].max_tokens)


def test_prefix_cache_hit_gives_same_output(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    prompt = list(range(10, 40))
    a = llm.generate([prompt], SamplingParams(max_tokens=8, **GREEDY))[0]
    b = llm.generate([prompt], SamplingParams(max_tokens=8, **GREEDY))[0]
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 28   # (30 - 1) // 4 full blocks
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == plain_greedy(model, prompt, 8)
    assert llm.stats()["prefix_cache_hit_rate"] > 0


def test_n_siblings_share_prompt_blocks(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    prompt = list(range(5, 19))   # 14 tokens: the last block is partial -> copy-on-write
    outs = llm.generate([prompt], SamplingParams(n=3, max_tokens=6, **GREEDY))[0]
    want = plain_greedy(model, prompt, 6)
    assert [c.index for c in outs.outputs] == [0, 1, 2]
    assert all(c.token_ids == want for c in outs.outputs)
    sampled = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3))[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1     # siblings draw independently
    llm.engine.block_manager.check_no_leaks()


def test_seed_is_deterministic_whatever_the_batch(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=1024)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = llm.generate([[1, 2, 3]], sp)[0].outputs[0].token_ids
    others = [[9] * k for k in range(1, 8)]
    batch = llm.generate(others + [[1, 2, 3]], [SamplingParams(temperature=1.0, max_tokens=20)] * 7 + [sp])
    assert batch[-1].outputs[0].token_ids == alone
    assert llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=16, seed=99))[0] \
        .outputs[0].token_ids != alone


def test_logprobs_match_model(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    prompt = [4, 8, 15, 16, 23, 42]
    out = llm.generate([prompt], SamplingParams(max_tokens=3, logprobs=2, **GREEDY))[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].log_softmax(-1)
    for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert lp[tok].rank == 1 and abs(lp[tok].logprob - float(row[tok])) < 1e-4
        top2 = row.topk(2).indices.tolist()
        assert set(top2) <= set(lp)
    assert abs(out.cumulative_logprob - sum(lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs))) < 1e-4


def test_max_tokens_beyond_context_finishes_with_length():
    model = tiny_model(2, context_length=32)
    llm = LLM(model, block_size=4)
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=100, **GREEDY))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 27
    assert out.token_ids == plain_greedy(model, [1, 2, 3, 4, 5], 27)


def test_kv_stats_blocks_and_waste_at_peak(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=256, enable_prefix_caching=False)
    out = llm.generate([list(range(10))], SamplingParams(max_tokens=3, **GREEDY))[0]
    m = out.metrics
    assert 0 < m["time_to_first_token"] <= m["finished_time"] - m["arrival_time"]
    assert m["inter_token_latency"] > 0 and m["tokens_per_s"] > 0 and m["num_generated_tokens"] == 3
    s = llm.stats()
    # prefill of 10 tokens takes 3 blocks (12 slots, 2 empty); decoding fills them, no 4th block
    assert s["kv_peak_blocks_used"] == 3 and abs(s["kv_waste_at_peak"] - 2 / 12) < 1e-9
    assert s["kv_blocks_used"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] == 64
    assert s["generation_tokens"] == 3 and s["prompt_tokens"] == 10 and s["steps"] == 3


def test_sampled_siblings_see_their_own_kv(model):
    """n=4 sampled siblings share the prompt's blocks; each one's reported logprobs must equal a
    plain forward over its own tokens (a missing copy-on-write would mix siblings' K/V)."""
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    prompt = list(range(5, 19))      # 14 tokens: siblings' first tokens land in the shared partial block
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=0, logprobs=0,
                                                ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        with torch.no_grad():
            ref = model(torch.tensor([prompt + c.token_ids]))[0].log_softmax(-1)
        for j, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            assert abs(lp[tok].logprob - float(ref[len(prompt) - 1 + j, tok])) < 1e-4
