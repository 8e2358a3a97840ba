"""Prompt-lookup (n-gram) proposer for speculative decoding.

Text that quotes, copies or repeats itself (code edits, extraction, lists, retrieval
answers) often continues the way an earlier occurrence of its last few tokens continued.
The proposer looks for the most recent earlier occurrence of the sequence's suffix
n-gram, trying the longest n first (n_max down to n_min), and proposes the tokens that
followed it (Saxena 2023, "prompt lookup decoding"; vLLM's `ngram` speculator). It needs no
model and no probabilities: the engine verifies its guesses as point-mass drafts
(`rejection.py`).

When the match is so recent that fewer than k tokens follow it (a run such as
"ab ab ab"), the copy continues into the proposal itself, like an LZ77 back-reference, so
a periodic pattern is proposed for the full k tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class NgramProposer:
    """propose(token_ids) -> up to `num_speculative_tokens` guessed next tokens ([] if no match)."""

    def __init__(self, n_max: int = 4, n_min: int = 1, num_speculative_tokens: int = 4):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"NgramProposer needs 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        if num_speculative_tokens < 1:
            raise ValueError(f"NgramProposer.num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.n_max, self.n_min, self.k = n_max, n_min, num_speculative_tokens

    def find_match(self, tokens: np.ndarray) -> tuple[int, int] | None:
        """(start of the continuation, n) for the longest suffix n-gram that occurred earlier,
        its most recent occurrence; None if no n in [n_min, n_max] matches."""
        L = len(tokens)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            suffix = tokens[L - n:]
            # windows over tokens[:-1] start at 0..L-n-1: every occurrence except the suffix itself
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)   # (L-n, n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                return int(hits[-1]) + n, n
        return None

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        tokens = np.asarray(token_ids, dtype=np.int64)
        match = self.find_match(tokens)
        if match is None:
            return []
        start, _ = match
        out: list[int] = []
        L = len(tokens)
        for j in range(self.k):
            src = start + j                    # < L + j always, so it is in tokens or already in out
            out.append(int(tokens[src]) if src < L else out[src - L])
        return out
