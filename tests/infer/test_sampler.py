"""The sampler against hand-computed distributions on a 5-token vocabulary.

p = [0.40, 0.30, 0.15, 0.10, 0.05]; logits = log p, so softmax(logits) == p exactly up to
float rounding and every kept set below can be worked out by hand.
"""
import math

import pytest
import torch

from lmstack.infer.sampler import (apply_min_p, apply_penalties, apply_top_k_top_p, make_generator,
                                   random_sample, sample, sampling_probs, token_counts)
from lmstack.infer.sampling_params import SamplingParams

P = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])
LOGITS = P.log()


def probs_for(**kw):
    return sampling_probs(LOGITS.unsqueeze(0), [SamplingParams(**kw)])[0]


def expect(kept, weights):
    out = torch.zeros(5)
    w = torch.tensor(weights, dtype=torch.float32)
    out[kept] = w / w.sum()
    return out


@pytest.mark.parametrize("kw,kept,weights", [
    (dict(), [0, 1, 2, 3, 4], [0.40, 0.30, 0.15, 0.10, 0.05]),
    (dict(top_k=2), [0, 1], [0.40, 0.30]),
    (dict(top_k=-1), [0, 1, 2, 3, 4], [0.40, 0.30, 0.15, 0.10, 0.05]),
    (dict(top_k=10), [0, 1, 2, 3, 4], [0.40, 0.30, 0.15, 0.10, 0.05]),
    (dict(top_p=0.3), [0], [1.0]),                 # mass before token 0 is 0 < 0.3; before token 1 is 0.4
    (dict(top_p=0.65), [0, 1], [0.40, 0.30]),       # 0.4 < 0.65 keeps token 1; 0.7 >= 0.65 drops token 2
    (dict(top_p=0.72), [0, 1, 2], [0.40, 0.30, 0.15]),
    (dict(top_p=0.8), [0, 1, 2], [0.40, 0.30, 0.15]),
    # top-k first: [0.4, 0.3, 0.15] renormalized = [.471, .353, .176]; mass before token 2 = .824 >= 0.8
    (dict(top_k=3, top_p=0.8), [0, 1], [0.40, 0.30]),
    (dict(min_p=0.3), [0, 1, 2], [0.40, 0.30, 0.15]),   # threshold 0.12
    (dict(min_p=0.5), [0, 1], [0.40, 0.30]),            # threshold 0.20
    (dict(min_p=1.0), [0], [1.0]),
    (dict(temperature=0.5), [0, 1, 2, 3, 4], [0.40 ** 2, 0.30 ** 2, 0.15 ** 2, 0.10 ** 2, 0.05 ** 2]),
    # temperature 2 flattens to p ** 0.5 before top-p: normalized = [.300, .260, .184, .150, .106];
    # mass before token 2 = .560 < 0.6 keeps it (at temperature 1 it is 0.7 and token 2 goes),
    # before token 3 = .744 drops it
    (dict(temperature=2.0, top_p=0.6), [0, 1, 2], [0.40 ** .5, 0.30 ** .5, 0.15 ** .5]),
    (dict(temperature=1.0, top_p=0.6), [0, 1], [0.40, 0.30]),
    (dict(temperature=0.0), [0], [1.0]),
])
def test_kept_set_and_renormalized_probs(kw, kept, weights):
    torch.testing.assert_close(probs_for(**kw), expect(kept, weights), atol=1e-6, rtol=1e-5)


def test_truncation_primitives_directly():
    logits = LOGITS.repeat(3, 1)
    out = apply_top_k_top_p(logits, torch.tensor([1, 0, 2]), torch.tensor([1.0, 0.65, 0.3]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False, False],
                                           [True, True, False, False, False],
                                           [True, False, False, False, False]]
    # ties at the k-th logit are all kept
    tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert torch.isfinite(apply_top_k_top_p(tied, torch.tensor([2]), None)).tolist() == [[False, True, True, True, False]]
    assert torch.isfinite(apply_min_p(logits[:1], torch.tensor([0.5]))).tolist() == [[True, True, False, False, False]]


def test_repetition_penalty_ctrl_style_and_presence_frequency():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -0.5]])
    prompt_mask = token_counts([[0]], 5) > 0
    counts = token_counts([[1, 3, 3]], 5)
    assert counts.tolist() == [[0, 1, 0, 2, 0]]
    out = apply_penalties(logits, prompt_mask, counts, presence=torch.tensor([0.5]),
                          frequency=torch.tensor([0.25]), repetition=torch.tensor([2.0]))
    # token 0 (prompt):  2 / 2                    = 1.0
    # token 1 (output x1): -1 * 2 - 0.25 - 0.5    = -2.75
    # token 3 (output x2): 1 / 2 - 0.5 - 0.5      = -0.5
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.75, 0.5, -0.5, -0.5]]))


def test_penalties_change_greedy_choice_through_sample():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0, 0.0]])
    plain = sample(logits, [SamplingParams(temperature=0)])
    assert plain.token_ids.tolist() == [0]
    p = SamplingParams(temperature=0, repetition_penalty=1.5)
    out = sample(logits, [p], prompt_token_ids=[[0]], output_token_ids=[[]])
    assert out.token_ids.tolist() == [1]  # 3 / 1.5 = 2 < 2.5
    # logprobs are from the penalized distribution
    expected = torch.tensor([2.0, 2.5, 0.0, 0.0, 0.0]).log_softmax(-1)[1]
    torch.testing.assert_close(out.logprobs[0], expected)
    with pytest.raises(ValueError, match="output_token_ids"):
        sample(logits, [SamplingParams(presence_penalty=1.0)])


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[5.0, 0.0, 4.0, 0.0, 0.0]] * 3)
    ps = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])] * 2 + [SamplingParams(temperature=0)]
    out = sample(logits, ps, output_token_ids=[[7], [7, 7], []], eos_token_id=0)
    assert out.token_ids.tolist() == [1, 0, 0]
    # ignore_eos: EOS is not a stop, so min_tokens does not need to block it
    out = sample(logits[:1], [SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)],
                 output_token_ids=[[]], eos_token_id=0)
    assert out.token_ids.tolist() == [0]


def test_logprobs_raw_topk_and_rank_independent_of_temperature():
    logits = LOGITS.repeat(2, 1)
    ps = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.3, top_k=2, seed=0)]
    gens = [None, make_generator(0)]
    out = sample(logits, ps, gens)
    assert out.top_token_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(out.top_logprobs, P.log()[:3].repeat(2, 1))
    tok = out.token_ids.tolist()
    assert tok[0] == 0 and tok[1] in (0, 1)
    torch.testing.assert_close(out.logprobs, P.log()[out.token_ids])
    assert out.ranks.tolist() == [1, tok[1] + 1]
    assert sample(logits, [SamplingParams()] * 2).top_token_ids is None


def test_sampling_frequencies_match_distribution():
    # 40k independent rows; each frequency has std <= sqrt(.25/40000) = 0.0025; tolerance 0.012 is
    # about 5 sigma, and the seed is fixed so the test cannot flake.
    torch.manual_seed(1234)
    n = 40_000
    for kw, target in [(dict(), P), (dict(top_k=3, top_p=0.8), expect([0, 1], [0.4, 0.3])),
                       (dict(temperature=0.5, min_p=0.1), expect([0, 1, 2], [0.16, 0.09, 0.0225]))]:
        out = sample(LOGITS.repeat(n, 1), [SamplingParams(**kw)] * n)
        freq = torch.bincount(out.token_ids, minlength=5).float() / n
        assert (freq - target).abs().max() < 0.012, (kw, freq, target)
        assert (freq[target == 0] == 0).all()


def test_random_sample_with_generator_frequencies():
    g = make_generator(7)
    draws = [int(random_sample(P.unsqueeze(0), [g])) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / 4000
    # std <= 0.008 per cell; 0.04 is 5 sigma (fixed seed: deterministic)
    assert (freq - P).abs().max() < 0.04


def test_seed_gives_same_tokens_whatever_the_batch():
    torch.manual_seed(0)
    V = 50
    target_logits = torch.randn(V)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)

    def run(batch_others: int, position: int) -> list[int]:
        g = make_generator(params.seed)
        toks = []
        for step in range(12):
            others = torch.randn(batch_others, V)
            rows = list(others)
            rows.insert(position, target_logits + 0.1 * step)
            logits = torch.stack(rows)
            ps = [SamplingParams(temperature=0.7, seed=None)] * batch_others
            ps.insert(position, params)
            gens = [None] * batch_others
            gens.insert(position, g)
            toks.append(int(sample(logits, ps, gens).token_ids[position]))
        return toks

    alone = run(0, 0)
    assert run(5, 2) == alone and run(9, 9) == alone
    assert len(set(alone)) > 1                        # it really samples
    g2 = make_generator(43)
    other_seed = [int(sample((target_logits + 0.1 * s).unsqueeze(0), [params], [g2]).token_ids[0]) for s in range(12)]
    assert other_seed != alone
    # n > 1: completion 0 uses the seed itself, completion 1 a different stream
    assert make_generator(5, 0).initial_seed() == 5 and make_generator(5, 1).initial_seed() != 5
    assert make_generator(None) is None


def test_greedy_is_argmax_and_consumes_no_randomness():
    torch.manual_seed(3)
    logits = torch.randn(8, 100)
    state = torch.get_rng_state()
    out = sample(logits, [SamplingParams(temperature=0)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.equal(torch.get_rng_state(), state)
    assert math.isclose(float(out.logprobs.sum()), float(logits.log_softmax(-1).max(-1).values.sum()), rel_tol=1e-6)
    assert out.ranks.tolist() == [1] * 8
