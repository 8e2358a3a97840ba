"""SamplingParams.prompt_logprobs: every prompt token's logprob equals log_softmax of a plain
forward pass, however the engine computes the prompt (one chunk or many, after a prefix-cache
hit, after preemption, forked for n > 1), and prompt_logprobs_start lets the prefix cache
serve the positions before it."""
from __future__ import annotations

import pytest
import torch

from lmstack.infer import LLM, RequestError, SamplingParams
from tests.infer.conftest import tiny_model

PROMPT = [5, 17, 3, 88, 41, 41, 9, 60, 2, 33, 71, 12, 45, 45, 45, 8, 90, 1, 27, 64, 30, 11, 58]


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


def reference(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): row i = log p(. | ids[:i]) from one plain forward (row 0 unused)."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].double().log_softmax(-1)       # (T, V): row t predicts t + 1
    return torch.cat([torch.zeros(1, lp.shape[1], dtype=lp.dtype), lp[:-1]])


def check(out, model, start: int, k: int, atol: float = 1e-5) -> None:
    ids = out.prompt_token_ids
    ref = reference(model, ids)
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and all(e is None for e in lps[:max(start, 1)])
    for i in range(max(start, 1), len(ids)):
        entry = lps[i]
        chosen = entry[ids[i]]
        assert chosen.logprob == pytest.approx(ref[i, ids[i]].item(), abs=atol)
        assert chosen.rank == int((ref[i] > ref[i, ids[i]] + atol).sum()) + 1 or \
            chosen.rank == int((ref[i] > ref[i, ids[i]] - atol).sum()) + 1          # rank up to near-ties
        top = ref[i].topk(k).indices.tolist() if k else []
        assert set(entry) == set(top) | {ids[i]}
        for r, t in enumerate(top, 1):
            if t != ids[i]:
                assert entry[t].rank == r and entry[t].logprob == pytest.approx(ref[i, t].item(), abs=atol)


@pytest.mark.parametrize("engine_kw", [dict(), dict(max_num_batched_tokens=5),       # one chunk / chunked
                                       dict(block_size=4)])
def test_prompt_logprobs_equal_a_plain_forward(model, engine_kw):
    llm = LLM(model, kv_cache_tokens=512, **engine_kw)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3))[0]
    check(out, model, start=0, k=3)
    assert out.num_cached_tokens == 0
    # the generated tokens are the same as without prompt scoring
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids and plain.prompt_logprobs is None


def test_start_lets_the_prefix_cache_serve_the_context(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    context, conts = PROMPT[:14], [[7, 8], [70, 80, 90], [1]]
    p = lambda c: SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=len(context))
    first = llm.generate([context + conts[0]], p(conts[0]))[0]
    before = llm.stats()["prompt_tokens"]
    rest = llm.generate([context + c for c in conts[1:]], [p(c) for c in conts[1:]])
    # cached: whole blocks before position len(context) - 1 = 13 -> 12 tokens; the rest is computed
    assert [o.num_cached_tokens for o in rest] == [12, 12]
    assert llm.stats()["prompt_tokens"] - before == sum(len(context) + len(c) - 12 for c in conts[1:])
    for out in [first, *rest]:
        check(out, model, start=len(context), k=0)
    # with start 0 (vLLM's behaviour) nothing comes from the cache
    again = llm.generate([context + conts[0]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert again.num_cached_tokens == 0
    check(again, model, start=0, k=0)


def test_preemption_and_forks_keep_prompt_logprobs():
    # a cache of 48 tokens for 3 requests of 23+ tokens: sequences get preempted and recomputed
    model = tiny_model(3, context_length=48)
    llm = LLM(model, block_size=4, kv_cache_tokens=48, max_num_batched_tokens=8)
    prompts = [PROMPT, PROMPT[::-1], PROMPT[3:] + PROMPT[:3]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1))
    assert llm.stats()["num_preemptions"] > 0
    for out in outs:
        check(out, model, start=0, k=1)
    forked = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=4, prompt_logprobs=2,
                                                   prompt_logprobs_start=5))[0]
    check(forked, model, start=5, k=2)
    llm.engine.block_manager.check_no_leaks()


def test_whole_vocabulary_rows(model):
    """prompt_logprobs=-1 (vLLM's): every token's logprob and rank, as the plain forward's."""
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=-1, prompt_logprobs_start=20))[0]
    ref = reference(model, PROMPT)
    assert all(e is None for e in out.prompt_logprobs[:20])
    for i in range(20, len(PROMPT)):
        row = out.prompt_logprobs[i]
        assert len(row) == ref.shape[1] and list(row) == list(range(ref.shape[1]))
        got = torch.tensor([row[t].logprob for t in range(len(row))], dtype=torch.float64)
        assert (got - ref[i]).abs().max() < 1e-5
        for t in (PROMPT[i], int(ref[i].argmax()), int(ref[i].argmin())):
            assert row[t].rank == int((got > got[t]).sum()) + 1
        with pytest.raises(KeyError):
            row[len(row)]


def test_bad_prompt_logprobs_params():
    with pytest.raises(ValueError, match="prompt_logprobs must be None, -1 .whole vocabulary. or in"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs must be None, -1"):
        SamplingParams(prompt_logprobs=-2)
    with pytest.raises(ValueError, match="prompt_logprobs_start must be >= 0"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=-1)
    llm = LLM(tiny_model(0), kv_cache_tokens=512)
    with pytest.raises(RequestError, match="prompt_logprobs_start=5 is past the prompt's last token"):
        llm.generate([[1, 2, 3, 4, 5]], SamplingParams(prompt_logprobs=0, prompt_logprobs_start=5))
