"""Speculative decoding: greedy output identical (n-gram and draft model), sampling keeps the
target distribution, acceptance rate reported."""
from __future__ import annotations

import random

import pytest
import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.utils import LmstackError
from tests.infer.conftest import tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts():
    rng = random.Random(0)
    prompts = [[rng.randrange(96) for _ in range(rng.randrange(3, 40))] for _ in range(10)]
    prompts.append([1, 2, 3, 4, 5, 6] * 5)      # repetitive: n-gram lookup has something to find
    return prompts


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


def _draft(target, good: bool):
    if not good:
        return tiny_model(7, n_layer=1)
    draft = tiny_model(0, n_layer=1)   # the target's own first layer: a plausible, imperfect guesser
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("blocks.1")},
                          strict=False)
    return draft


@pytest.mark.parametrize("method", ["ngram", "draft-good", "draft-bad"])
def test_greedy_output_identical(target, method):
    prompts = _prompts()
    sp = SamplingParams(max_tokens=24, **GREEDY)
    base = LLM(target, block_size=4, kv_cache_tokens=2048).generate(prompts, sp)
    if method == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": 4}
    else:
        spec = {"method": "draft", "model": _draft(target, method == "draft-good"), "num_speculative_tokens": 3}
    # small cache and budget too: preemption and dropped drafts must not change anything
    llm = LLM(target, block_size=4, kv_cache_tokens=300, max_num_batched_tokens=48, speculative=spec)
    outs = llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in base]
    stats = llm.stats()
    assert stats["spec_proposed_tokens"] > 0 and 0.0 <= stats["spec_acceptance_rate"] <= 1.0
    if method != "draft-bad":
        assert stats["spec_accepted_tokens"] > 0
    assert stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]    # rejections exercised too
    llm.engine.block_manager.check_no_leaks()


V = 4


def test_sampling_keeps_target_distribution():
    """First two sampled tokens (a joint over V x V outcomes), the second through n-gram speculation, vs the
    exact target probabilities; total variation below what 4000 samples allow."""
    model = tiny_model(3, vocab_size=V, init_std=0.05, context_length=32)
    torch.manual_seed(0)
    prompt = [1, 2, 1, 2, 1]                     # n-gram proposes 2, 1, 2, ... every time
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        joint = torch.stack([p1[a] * model(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(V)])
    llm = LLM(model, block_size=4, kv_cache_tokens=4096, max_num_seqs=256,
              speculative={"method": "ngram", "num_speculative_tokens": 3})
    N = 2000
    # max_tokens=3: token 1 from the prefill, tokens 2-3 from one verify of 1 draft (the
    # draft budget leaves room for the bonus token); token 2 is accepted draft or residual
    outs = llm.generate([prompt] * N, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True))
    counts = torch.zeros(V, V)
    for o in outs:
        a, b = o.outputs[0].token_ids[:2]
        counts[a, b] += 1
    tv = 0.5 * (counts / N - joint).abs().sum()
    print(f"TV={tv:.4f}, p(draft token 2 after 1)={float(joint[1].sum() and joint[1, 2] / joint[1].sum()):.3f}")
    assert llm.stats()["spec_accepted_tokens"] > 100
    assert tv < 0.05, f"total variation {tv:.3f} between speculative samples and the target"


def test_bad_speculative_config(target):
    with pytest.raises(LmstackError, match="method 'ngram' or 'draft'"):
        LLM(target, speculative={"method": "medusa"})
    with pytest.raises(LmstackError, match="unknown key"):
        LLM(target, speculative={"method": "ngram", "k": 3})
    with pytest.raises(LmstackError, match="vocab_size"):
        LLM(target, speculative={"method": "draft", "model": tiny_model(0, vocab_size=50)})


def test_adaptive_backs_off_a_draft_that_misses(target):
    """A draft that never matches: the adaptive speculator stops proposing after two misses
    (backing off to a probe every few steps), the fixed one pays for k drafts every step;
    the output is the same either way."""
    prompts = _prompts()[:4]
    sp = SamplingParams(max_tokens=40, **GREEDY)
    base = LLM(target, block_size=4, kv_cache_tokens=2048).generate(prompts, sp)
    stats = {}
    for adaptive in (True, False):
        spec = {"method": "draft", "model": _draft(target, good=False), "num_speculative_tokens": 4,
                "adaptive": adaptive}
        llm = LLM(target, block_size=4, kv_cache_tokens=2048, speculative=spec)
        outs = llm.generate(prompts, sp)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in base]
        stats[adaptive] = llm.stats()
        llm.engine.block_manager.check_no_leaks()
    on, off = stats[True], stats[False]
    assert off["spec_paused_steps"] == 0 and on["spec_paused_steps"] > 0
    if off["spec_acceptance_rate"] < 0.2:        # the random draft really is bad
        assert on["spec_proposed_tokens"] < off["spec_proposed_tokens"] / 3


def test_adaptive_keeps_looking_ahead_when_drafts_land(target):
    """The target as its own draft: every draft is accepted, so lookahead stays at k."""
    prompts = _prompts()[:3]
    spec = {"method": "draft", "model": target, "num_speculative_tokens": 3}
    llm = LLM(target, block_size=4, kv_cache_tokens=2048, speculative=spec)
    llm.generate(prompts, SamplingParams(max_tokens=33, **GREEDY))
    st = llm.stats()
    assert st["spec_acceptance_rate"] == 1.0 and st["spec_paused_steps"] == 0
    assert st["spec_proposed_tokens"] == 3 * st["spec_verify_steps"]


def test_adaptive_must_be_bool(target):
    with pytest.raises(LmstackError, match="adaptive"):
        LLM(target, speculative={"method": "ngram", "adaptive": "yes"})
    assert LLM(target, speculative={"method": "ngram"}).stats()["spec_adaptive"] is False
    assert LLM(target, speculative={"method": "draft", "model": target}).stats()["spec_adaptive"] is True


def test_ngram_backoff_pauses_without_shrinking_its_guesses(target):
    """`backoff` alone (n-gram's option): after two verify steps with nothing accepted the
    sequence stops speculating for a while, but each guess it does make keeps k tokens."""
    prompts = _prompts()[:4]
    sp = SamplingParams(max_tokens=40, **GREEDY)
    base = LLM(target, block_size=4, kv_cache_tokens=2048).generate(prompts, sp)
    stats = {}
    for backoff in (True, False):
        llm = LLM(target, block_size=4, kv_cache_tokens=2048,
                  speculative={"method": "ngram", "num_speculative_tokens": 4, "backoff": backoff})
        outs = llm.generate(prompts, sp)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in base]
        stats[backoff] = llm.stats()
    on, off = stats[True], stats[False]
    assert on["spec_backoff"] is True and on["spec_adaptive"] is False and off["spec_backoff"] is False
    assert off["spec_paused_steps"] == 0 and on["spec_paused_steps"] > 0
    assert on["spec_verify_steps"] < off["spec_verify_steps"]
    # k stays 4 (only the last tokens of a request get fewer): no adaptive shrinking
    assert on["spec_proposed_tokens"] >= 4 * on["spec_verify_steps"] - 3 * len(prompts)
    with pytest.raises(LmstackError, match="backoff"):
        LLM(target, speculative={"method": "ngram", "backoff": 1})
