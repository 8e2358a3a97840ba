"""Held-out exact match of the RL methods: the greedy share, its binomial standard error and the
share of the 5 most frequent answers (the shortcut check), on fixed completions against
hand-computed values."""
import math

import pytest

from lmstack.align.evaluate import exact_match
from lmstack.align.rollout import Rollout


class FixedCompletions:
    """An engine whose greedy completion of prompt i is texts[i] (exact_match only calls sample)."""

    def __init__(self, texts):
        self.texts = texts

    def sample(self, prompt_ids, n, seed, greedy=False):
        assert greedy and n == 1
        return [[Rollout(p, [1] * len(t), [], t, "stop")] for p, t in zip(prompt_ids, self.texts)]


def test_exact_match_standard_error_and_top_answer_share():
    answers = ["7", "7", "12", "3", "40", "5", "9", "100"]
    texts = ["7\n", "7", "7\nmore", "1", "2", "3", "4", "100"]   # right: #0, #1, #7 (first line only)
    recs = [{"prompt": f"q{i}", "answer": a} for i, a in enumerate(answers)]
    out = exact_match(FixedCompletions(texts), recs, [[i] for i in range(8)])
    assert out["exact_match"] == pytest.approx(3 / 8)
    assert out["exact_match_se"] == pytest.approx(math.sqrt(3 / 8 * 5 / 8 / 8))
    # answers: "7" x3, then five answers once each: the top 5 hold 3 + 1 + 1 + 1 + 1 of 8
    assert out["top5_answer_share"] == pytest.approx(7 / 8)
    assert out["completion_len"] == pytest.approx(sum(map(len, texts)) / 8)
