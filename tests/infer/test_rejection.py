"""Speculative verification keeps the target distribution (statistically) and greedy output (exactly)."""
import math

import pytest
import torch

from lmstack.infer.rejection import greedy_verify, rejection_sample

V, K = 4, 3


def _dists(seed: int, n: int) -> torch.Tensor:
    """n random distributions over V tokens, skewed so that p and q really differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.rand(n, V, generator=g) ** 2 + 0.02, p=1, dim=-1)


def _run_trials(p, q, n_trials, point_mass=False):
    """Run n_trials verifications; per position, the counts of each emitted token."""
    g = torch.Generator().manual_seed(2024)
    counts = torch.zeros(K + 1, V)
    accepted_total = 0
    for _ in range(n_trials):
        if point_mass:
            drafts = [1, 2, 0]                                   # fixed guesses, like an n-gram proposer
            toks, n = rejection_sample(p, drafts, None, g)
        else:
            drafts = torch.multinomial(q, 1, generator=g).squeeze(1)  # x_i ~ q_i
            toks, n = rejection_sample(p, drafts, q, g)
        assert len(toks) == n + 1 and toks[:n] == list(drafts[:n] if point_mass else drafts[:n].tolist())
        for j, t in enumerate(toks):
            counts[j, t] += 1
        accepted_total += n
    return counts, accepted_total


@pytest.mark.parametrize("point_mass", [False, True])
def test_emitted_tokens_follow_target_distribution(point_mass):
    # Target p_j and draft q_j differ at every position. Given that position j is emitted,
    # its token must be distributed as p_j (see the proof in rejection.py). Tolerance: 5
    # standard errors of a frequency, 5 * sqrt(0.25 / n_j); fixed seeds, so it cannot flake.
    p, q = _dists(0, K + 1), _dists(1, K)
    n_trials = 6000
    counts, accepted = _run_trials(p, q, n_trials, point_mass)
    for j in range(K + 1):
        n_j = counts[j].sum()
        if n_j < 300:
            continue
        freq = counts[j] / n_j
        tol = 5 * math.sqrt(0.25 / float(n_j))
        assert (freq - p[j]).abs().max() < tol, (j, freq, p[j], tol)
    assert counts[0].sum() == n_trials
    # Expected accepts: acceptance at i is sum_y min(p_i, q_i) (= p_i(x_i) for a point mass),
    # and drafts are accepted as a prefix, so E[n] = sum_j prod_{i<=j} alpha_i.
    if point_mass:
        alpha = torch.tensor([p[0, 1], p[1, 2], p[2, 0]])
    else:
        alpha = torch.minimum(p[:K], q).sum(-1)
    expected = float(sum(torch.prod(alpha[:j + 1]) for j in range(K)))
    assert abs(accepted / n_trials - expected) < 5 * math.sqrt(K * K / 4 / n_trials), (accepted / n_trials, expected)


def test_identical_draft_and_target_accept_everything():
    p = _dists(3, K + 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        drafts = torch.multinomial(p[:K], 1, generator=g).squeeze(1)
        toks, n = rejection_sample(p, drafts, p[:K].clone(), g)
        assert n == K and toks[:K] == drafts.tolist()


def test_zero_target_probability_is_always_rejected_and_never_emitted():
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25] * 4])
    for s in range(30):
        toks, n = rejection_sample(p, [0], None, torch.Generator().manual_seed(s))
        assert n == 0 and toks[0] in (1, 2)


def test_seeded_verification_is_reproducible():
    p, q = _dists(5, K + 1), _dists(6, K)
    drafts = [0, 1, 2]
    a = [rejection_sample(p, drafts, q, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_one_hot_target_matches_greedy_verify():
    target_ids = [3, 1, 2, 0]
    p = torch.nn.functional.one_hot(torch.tensor(target_ids), V).float()
    for drafts in ([3, 1, 2], [3, 1, 0], [0, 1, 2], [3, 2, 2]):
        assert rejection_sample(p, drafts, None, torch.Generator().manual_seed(0)) == greedy_verify(target_ids, drafts)


def test_greedy_verify():
    assert greedy_verify([5, 6, 7, 8], [5, 6, 9]) == ([5, 6, 7], 2)
    assert greedy_verify([5, 6, 7, 8], [5, 6, 7]) == ([5, 6, 7, 8], 3)
    assert greedy_verify([5, 6, 7, 8], [1, 6, 7]) == ([5], 0)
    assert greedy_verify(torch.tensor([4]), torch.tensor([], dtype=torch.long)) == ([4], 0)
    with pytest.raises(ValueError, match="k\\+1"):
        greedy_verify([1, 2], [1, 2])
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample(torch.ones(2, V) / V, [1, 2])
