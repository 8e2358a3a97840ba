"""The batch-1 decode shortcuts (issue 20): the runner's decode bindings, the argmax-only
sampling of plain greedy batches and the skipped no-op dropout, each against the general path."""
from __future__ import annotations

import contextlib

import pytest
import torch

from lmstack import kernels
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.runner import RunnerRow
from lmstack.infer.sampler import argmax_only, sample
from lmstack.model import ModelConfig
from lmstack.model.attention import AttnContext
from lmstack.model.transformer import Block
from tests.infer.conftest import plain_greedy, tiny_model


@pytest.mark.parametrize("path", ["whole_step", "kernel", "torch"])
def test_decode_bindings_equal_the_general_path(path):
    """Decode rows (one token, one logit) of different lengths and block tables: the decode
    shortcut's logits and K/V writes equal the general path's, on the whole-step op
    (fused_decode.py: its own norms, so equal within float rounding), on the module forward with
    the fused attention kernel, and without kernels (both bit for bit)."""
    llm = LLM(tiny_model(3), block_size=4, kv_cache_tokens=256)
    runner, cache = llm.engine.runner, llm.engine.cache
    if path != "whole_step":
        runner.fused.why_not = "tested without it"
    fused = path != "torch"
    steps = runner.fused.steps
    g = torch.Generator().manual_seed(0)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    rows = [RunnerRow([5], 9, [7, 2, 11], 1), RunnerRow([17], 3, [4], 1), RunnerRow([40], 12, [1, 3, 6, 9], 1)]
    k0, v0 = cache.k.clone(), cache.v.clone()
    with torch.inference_mode(), (contextlib.nullcontext() if fused else kernels.disabled()):
        want = runner._general_forward(rows)
        k_want, v_want = cache.k.clone(), cache.v.clone()
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        got = runner._decode_forward(rows)
    assert got.shape == want.shape == (3, 96)
    assert (got - want).abs().max() < 1e-5
    if path == "whole_step" and kernels.available():
        assert runner.fused.steps == steps + 1
        assert (cache.k - k_want).abs().max() < 1e-5 and (cache.v - v_want).abs().max() < 1e-5
    elif path != "whole_step":
        assert runner.fused.steps == steps
        assert torch.equal(cache.k, k_want) and torch.equal(cache.v, v_want)
    assert not torch.equal(k_want, k0)                    # the step wrote its tokens' K/V


def test_argmax_only_is_what_sample_returns():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50, generator=g)
    cases = [(SamplingParams(temperature=0.0), 0, True),
             (SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4), 2, True),     # min_tokens reached
             (SamplingParams(temperature=0.0, min_tokens=2, max_tokens=4), 1, False),    # EOS still blocked
             (SamplingParams(temperature=0.0, logprobs=0), 0, False),
             (SamplingParams(temperature=0.0, repetition_penalty=1.3), 0, False),
             (SamplingParams(temperature=0.7), 0, False)]
    for params, n_out, expected in cases:
        assert argmax_only(params, n_out) is expected
    plain = [p for p, n, ok in cases if ok]
    out = sample(logits[:len(plain)], plain, output_token_ids=[[1, 2]] * len(plain), eos_token_id=0)
    assert torch.equal(out.token_ids, logits[:len(plain)].argmax(dim=-1))


def test_mixed_greedy_batch_takes_both_paths_with_the_same_tokens():
    """A batch where one row asks for logprobs goes through the full sampler; plain greedy rows
    alone take the argmax shortcut: the tokens are the plain loop's either way."""
    model = tiny_model(4)
    prompts = [[3, 14, 15, 9], [26, 5]]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6)
    with_lp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6, logprobs=2)
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    alone = llm.generate(prompts, greedy)
    mixed = llm.generate(prompts, [greedy, with_lp])
    for p, a, m in zip(prompts, alone, mixed):
        assert a.outputs[0].token_ids == m.outputs[0].token_ids == plain_greedy(model, p, 6)
    assert mixed[1].outputs[0].logprobs and alone[1].outputs[0].logprobs is None


def test_block_dropout_still_drops_in_training_only():
    cfg = ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, context_length=8, dropout=0.5)
    block = Block(cfg, 0)
    x = torch.randn(1, 4, 16)
    ctx = AttnContext(positions=torch.arange(4)[None], causal_fast=True)
    torch.manual_seed(0)
    train_a, train_b = block.train()(x, ctx), block(x, ctx)
    assert not torch.allclose(train_a, train_b)           # dropout is on
    block.eval()
    assert torch.equal(block(x, ctx), block(x, ctx))
    block.drop.p = block.attn.dropout = 0.0             # (attention's own dropout too)
    block.train()
    assert torch.equal(block(x, ctx), block.eval()(x, ctx))   # p = 0 in training: no dropout


def test_decode_rows_share_one_forward_whatever_their_contexts():
    """On the CPU kernels decode rows read their context in place: one forward for all of them
    (a context of 3 beside one of 200 costs no padding), the other rows grouped by padding; the
    logits are those of each row run alone."""
    llm = LLM(tiny_model(3), block_size=4, kv_cache_tokens=1024)
    runner = llm.engine.runner
    rows = [RunnerRow([5], 200, list(range(51)), 1), RunnerRow([7, 8, 9], 40, list(range(60, 71)), 2),
            RunnerRow([17], 3, [80], 1), RunnerRow(list(range(1, 31)), 0, list(range(90, 98)), 1)]
    if kernels.available():
        assert runner._groups(rows) == [[0, 2], [3, 1]]
    with torch.inference_mode():
        together = runner.execute(rows)
        alone = torch.cat([runner.execute([r]) for r in rows])
    assert together.shape == (5, 96)
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-4)     # logits of magnitude ~10 here
