"""The INT8 KV cache: per-token, per-head absmax codes within half a step, old tokens of a block
untouched by later writes, the engine's greedy output equal to a plain loop over a
fake-quantized cache, prefix caching and preemption unchanged, ~4x / ~2x the blocks of an
fp32 / bf16 cache in the same bytes, and a clear error for an unknown dtype."""
import random

import pytest
import torch
from conftest import tiny_model

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.paged_cache import PagedKVCache, dequantize_kv, quantize_kv
from lmstack.model import ContiguousKVCache
from lmstack.utils import LmstackError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_codes_are_within_half_a_step_of_the_values():
    torch.manual_seed(0)
    x = torch.randn(50, 4, 16) * torch.logspace(-3, 2, 50)[:, None, None]   # rows of very different size
    x[3, 1] = 0.0                                                           # an all-zero head
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (50, 4)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    back = dequantize_kv(q, s, torch.float32)
    step = s.float()[..., None]
    assert bool(((back - x).abs() <= step / 2 + 1e-12 * x.abs()).all())
    assert torch.equal(back[3, 1], torch.zeros(16))
    # the scale is the bf16 rounding of absmax / 127, per token and head
    assert torch.equal(s, (x.abs().amax(-1) / 127).to(torch.bfloat16))


def test_filling_a_block_token_by_token_keeps_old_tokens_exact():
    torch.manual_seed(1)
    cache = PagedKVCache(n_layer=1, num_blocks=2, block_size=8, n_kv_head=2, head_dim=4, kv_cache_dtype="int8")
    table, seen = [1], []                                   # one sequence in block 1: slots 8..15
    for p in range(8):
        k = torch.randn(1, 2, 1, 4) * (1 + 10 * p)          # each new token is larger: one block scale would grow
        v = torch.randn(1, 2, 1, 4)
        slot = torch.tensor([table[0] * 8 + p])
        cache.bind(None, slot, torch.arange(8, 9 + p).view(1, -1), torch.arange(p + 1).view(1, -1))
        k_all, v_all, _ = cache.update(0, k, v, torch.tensor([[p]]))
        q, s = quantize_kv(k[0].transpose(0, 1))            # the token alone, (1, H, D)
        seen.append(dequantize_kv(q, s, torch.float32)[0])
        assert torch.equal(k_all[0].transpose(0, 1), torch.stack(seen))   # every earlier token, bit for bit
    assert cache.k.dtype == torch.int8 and cache.k_scale.shape == (1, 16, 2)


class FakeInt8Cache(ContiguousKVCache):
    """Reference: a contiguous cache that stores each token's K/V quantized and dequantized."""

    def update(self, layer_idx, k, v, positions):
        return super().update(layer_idx, self._round(k), self._round(v), positions)

    @staticmethod
    def _round(x):
        B, H, T, D = x.shape
        q, s = quantize_kv(x.transpose(1, 2).reshape(B * T, H, D))
        return dequantize_kv(q, s, x.dtype).view(B, T, H, D).transpose(1, 2)


@torch.no_grad()
def int8_greedy(model, prompt, n):
    """The plain loop (prefill, then one token per step) over the fake-quantized cache."""
    c = model.config
    cache = FakeInt8Cache(c.n_layer, 1, len(prompt) + n, c.n_kv_head, c.head_dim)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache=cache)
    out = []
    for i in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([[len(prompt) + i]]), cache=cache)
    return out


def test_engine_equals_the_fake_quantized_plain_loop(model):
    prompts = [[5], list(range(3, 40)), [7, 7, 7, 7, 1, 2]]
    llm = LLM(model, kv_cache_tokens=512, kv_cache_dtype="int8")
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == int8_greedy(model, p, 20)


def test_prefix_caching_and_preemption_are_unchanged():
    model = tiny_model()
    rng = random.Random(0)
    shared = [rng.randrange(96) for _ in range(40)]
    prompts = [shared + [rng.randrange(96) for _ in range(rng.randrange(1, 30))] if i % 2 else
               [rng.randrange(96) for _ in range(rng.randrange(1, 50))] for i in range(24)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 30), **GREEDY) for _ in prompts]
    alone = LLM(model, block_size=8, kv_cache_tokens=256, enable_prefix_caching=False, kv_cache_dtype="int8")
    expected = [alone.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    llm = LLM(model, block_size=8, kv_cache_tokens=320, max_num_seqs=16, max_num_batched_tokens=64,
              kv_cache_dtype="int8")
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    llm.engine.block_manager.check_no_leaks()
    # a hit reads the blocks the first request wrote: same output as computing them
    again = llm.generate([prompts[1]], params[1])[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == expected[1]
    assert expected[1] == int8_greedy(model, prompts[1], params[1].max_tokens)


def test_int8_holds_about_4x_the_fp32_and_2x_the_bf16_blocks_in_the_same_bytes():
    model = tiny_model(context_length=64)            # head_dim 16, 2 KV heads, 2 layers
    budget = 1 << 20
    blocks = {}
    for name, m, kv in (("fp32", model, "auto"), ("int8", model, "int8"),
                        ("bf16", tiny_model(context_length=64).to(torch.bfloat16), "auto"),
                        ("bf16+int8", tiny_model(context_length=64).to(torch.bfloat16), "int8")):
        blocks[name] = LLM(m, kv_cache_bytes=budget, kv_cache_dtype=kv).stats()["kv_blocks_total"]
    per_token = {"fp32": 2 * 2 * 2 * 16 * 4, "bf16": 2 * 2 * 2 * 16 * 2, "int8": 2 * 2 * 2 * (16 + 2)}
    assert blocks["fp32"] == budget // (16 * per_token["fp32"])
    assert blocks["int8"] == blocks["bf16+int8"] == budget // (16 * per_token["int8"])
    assert blocks["int8"] / blocks["fp32"] == pytest.approx(4 * 16 / 18, rel=0.01)   # 3.56x at head_dim 16
    assert blocks["int8"] / blocks["bf16"] == pytest.approx(2 * 16 / 18, rel=0.01)   # 1.78x (64: 3.88x, 1.94x)
    cache = LLM(model, kv_cache_bytes=budget, kv_cache_dtype="int8").engine.cache
    stored = sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale))
    assert stored <= budget and stored == blocks["int8"] * 16 * per_token["int8"]


def test_bf16_model_with_int8_cache_stays_close_to_its_bf16_cache():
    model = tiny_model().to(torch.bfloat16)
    prompts = [list(range(i, i + 12)) for i in range(0, 40, 5)]
    a = LLM(model, kv_cache_tokens=512).generate(prompts, SamplingParams(max_tokens=16, **GREEDY))
    b = LLM(model, kv_cache_tokens=512, kv_cache_dtype="int8").generate(prompts, SamplingParams(max_tokens=16,
                                                                                               **GREEDY))
    same = sum(x == y for oa, ob in zip(a, b) for x, y in zip(oa.outputs[0].token_ids, ob.outputs[0].token_ids))
    assert same / (16 * len(prompts)) > 0.8


@pytest.mark.parametrize("bad", ["fp8", "float16", "INT8", None, 8])
def test_unknown_kv_cache_dtype_is_a_clear_error(model, bad):
    with pytest.raises(LmstackError, match=r"kv_cache_dtype=.*choose 'auto' .* or 'int8'"):
        LLM(model, kv_cache_tokens=512, kv_cache_dtype=bad)
