"""Prompt-lookup proposer: longest suffix n-gram, most recent earlier occurrence, what followed."""
import random

import pytest

from lmstack.infer.ngram import NgramProposer


def brute_force(tokens, n_max, n_min, k):
    """Reference written the slow obvious way."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        for i in range(L - n - 1, -1, -1):          # most recent first, excluding the suffix itself
            if tokens[i:i + n] == suffix:
                ext = list(tokens)
                for j in range(k):
                    ext.append(ext[i + n + j])
                return ext[L:]
    return []


def test_longest_suffix_wins_over_more_recent_shorter_match():
    # suffix 3-gram [1, 2, 3] occurred at 0 (followed by 9, 8); the 1-gram [3] occurs more recently
    # (followed by 5), but the longer match is preferred.
    toks = [1, 2, 3, 9, 8, 7, 3, 5, 1, 2, 3]
    assert NgramProposer(n_max=3, n_min=1, num_speculative_tokens=2).propose(toks) == [9, 8]
    assert NgramProposer(n_max=1, n_min=1, num_speculative_tokens=2).propose(toks) == [5, 1]


def test_most_recent_occurrence_of_equal_length():
    toks = [4, 7, 1, 4, 7, 2, 0, 4, 7]
    assert NgramProposer(n_max=2, num_speculative_tokens=1).propose(toks) == [2]


def test_no_match_and_short_inputs():
    p = NgramProposer(n_max=4, n_min=2, num_speculative_tokens=3)
    assert p.propose([1, 2, 3, 4, 5]) == []
    assert p.propose([]) == [] and p.propose([1]) == []
    assert NgramProposer(n_min=1).propose([1, 1]) == [1, 1, 1, 1]


def test_periodic_run_is_continued_for_k_tokens():
    toks = [9, 1, 2, 1, 2]
    # most recent earlier [1, 2] is at 1, followed by [1, 2] and then by the proposal itself
    assert NgramProposer(n_max=2, num_speculative_tokens=5).propose(toks) == [1, 2, 1, 2, 1]


def test_matches_brute_force_reference_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(0, 40)
        toks = [rng.randint(0, 4) for _ in range(L)]
        n_max, n_min, k = rng.randint(1, 5), 1, rng.randint(1, 6)
        n_min = rng.randint(1, n_max)
        assert NgramProposer(n_max, n_min, k).propose(toks) == brute_force(toks, n_max, n_min, k), toks


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_min"):
        NgramProposer(n_max=2, n_min=3)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        NgramProposer(num_speculative_tokens=0)
