"""logprobs_mode="processed_logprobs": every recorded logprob equals log_softmax of a fresh forward
pass under the same processing (what RL's importance ratios need); raw stays the default."""
from __future__ import annotations

import pytest
import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.sampler import sample
from tests.infer.conftest import tiny_model

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], list(range(40, 53))]


def processed_reference(logits: torch.Tensor, p: SamplingParams, output: list[int]) -> torch.Tensor:
    """Our own processing of one row of fresh logits (V,): frequency/presence penalties,
    temperature, top-k, top-p, min-p, then log_softmax."""
    x = logits.double()
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=x.numel()).double()
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).double()
    x = x / p.temperature
    if p.top_k > 0:
        kth = x.sort(descending=True).values[p.top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        probs, order = x.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs                 # mass strictly before each sorted token
        drop = before >= p.top_p
        drop[0] = False
        x = x.clone()
        x[order[drop]] = float("-inf")
    if p.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return x.log_softmax(-1)


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=20, top_p=0.9),
                                dict(temperature=1.3, top_p=0.8, min_p=0.05, frequency_penalty=0.5,
                                     presence_penalty=0.3)])
def test_processed_logprobs_equal_a_fresh_forward_under_the_same_processing(kw):
    model = tiny_model(1)
    p = SamplingParams(max_tokens=16, seed=0, n=2, logprobs=5, logprobs_mode="processed_logprobs",
                       ignore_eos=True, **kw)
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    outs = llm.generate(PROMPTS, p)
    # float32 noise between the engine's kernels (decode GEMV, paged attention: other summation
    # orders) and a fresh MKL + SDPA forward: measured up to ~1e-5 on logprobs of ~-3.5
    tol = 3e-5
    checked = truncated = 0
    for prompt, out in zip(PROMPTS, outs):
        for comp in out.outputs:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + comp.token_ids]))[0].float()     # (T, V) fresh forward
            for j, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
                ref = processed_reference(logits[len(prompt) - 1 + j], p, comp.token_ids[:j])
                assert abs(lp[tok].logprob - float(ref[tok])) < tol
                assert lp[tok].rank == int((ref > ref[tok]).sum()) + 1
                # the chosen token + the top 5 of the processed distribution, leaving out the removed (-inf)
                top5 = [t for t in ref.topk(5).indices.tolist() if torch.isfinite(ref[t])]
                assert set(lp) == {tok, *top5}
                for t, v in lp.items():
                    assert abs(v.logprob - float(ref[t])) < tol
                kept = int(torch.isfinite(ref).sum())
                truncated += kept < 96
                checked += 1
            assert abs(comp.cumulative_logprob - sum(lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs))) \
                < 1e-4
    assert checked == 2 * 2 * 16 and truncated > checked // 2        # the truncation really bit


def test_raw_is_the_default_and_differs_from_processed():
    model = tiny_model(1)
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    common = dict(temperature=0.7, top_k=5, max_tokens=6, seed=3, logprobs=0, ignore_eos=True)
    raw = llm.generate(PROMPTS[:1], SamplingParams(**common))[0].outputs[0]
    proc = llm.generate(PROMPTS[:1], SamplingParams(logprobs_mode="processed_logprobs", **common))[0].outputs[0]
    assert raw.token_ids == proc.token_ids                                  # same draws: only the report differs
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + raw.token_ids]))[0]
    for j, tok in enumerate(raw.token_ids):
        row = logits[len(PROMPTS[0]) - 1 + j]
        assert abs(raw.logprobs[j][tok].logprob - float(row.log_softmax(-1)[tok])) < 1e-5
        assert proc.logprobs[j][tok].logprob > raw.logprobs[j][tok].logprob   # mass renormalized onto 5 tokens


def test_sampler_processed_top_alternatives_and_greedy_rows():
    P = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])
    logits = P.log().repeat(2, 1)
    ps = [SamplingParams(top_k=2, seed=0, logprobs=3, logprobs_mode="processed_logprobs"),
          SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=3, logprobs_mode="processed_logprobs")]
    out = sample(logits, ps, [torch.Generator().manual_seed(0), None], prompt_token_ids=[[], [0]],
                 output_token_ids=[[], []])
    # top-2 renormalized: [4/7, 3/7], the rest -inf
    torch.testing.assert_close(out.top_logprobs[0], torch.tensor([4 / 7, 3 / 7, 0.0]).log())
    assert out.top_token_ids[0, :2].tolist() == [0, 1]
    # greedy: penalties apply (logit of token 0 = log 0.4 * 2 since it is negative), no temperature
    pen = P.log().clone()
    pen[0] = pen[0] * 2.0
    assert out.token_ids[1] == 1
    torch.testing.assert_close(out.logprobs[1], pen.log_softmax(-1)[1])


def test_speculative_engine_gives_the_same_processed_logprobs():
    """Requests asking for logprobs decode without drafts, so a speculative engine reports
    exactly the plain engine's processed logprobs; requests without logprobs still speculate."""
    model = tiny_model(1)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [7, 8, 9, 7, 8, 9, 7]]
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=12, seed=5, logprobs=2,
                       logprobs_mode="processed_logprobs", ignore_eos=True)
    plain = LLM(model, block_size=4, kv_cache_tokens=512).generate(prompts, p)
    spec = LLM(model, block_size=4, kv_cache_tokens=512, speculative={"method": "ngram", "num_speculative_tokens": 3})
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = spec.generate(prompts + prompts, [p, p, greedy, greedy])
    for a, b in zip(plain, outs[:2]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # a different batch (rows padded to the drafts' length: other GEMM shapes) gives float
        # noise; measured up to ~1.2e-5 with the fused attention kernel, ~6e-6 without
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 5e-5 for t in x)
    assert spec.stats()["spec_proposed_tokens"] > 0


def test_bad_logprobs_mode():
    with pytest.raises(ValueError, match=r"logprobs_mode must be one of \['raw_logprobs', 'processed_logprobs'\], "
                                         r"got 'processed_logits'"):
        SamplingParams(logprobs_mode="processed_logits")
