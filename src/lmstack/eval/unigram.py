"""Unigram baselines: how well could a model do that ignores context entirely?

The entropy of the corpus' token distribution, H = -sum_v p(v) log p(v) in nats/token, is
the loss of the best context-free predictor on that same data. A language model whose
validation loss is far below it has learned to use context. `unigram_cross_entropy` is the
held-out version: the loss on validation tokens of a unigram model fitted (add-alpha
smoothed) on the training tokens.
"""
from __future__ import annotations

import numpy as np


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of every id in `tokens` (1-D int array) -> (vocab_size,) int64."""
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} is out of range for vocab_size={vocab_size}")
    return np.bincount(tokens.astype(np.int64, copy=False), minlength=vocab_size)


def unigram_entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution given by `counts`; zero counts contribute 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("unigram_entropy needs at least one token")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train_counts: np.ndarray, eval_tokens: np.ndarray, alpha: float = 1.0) -> float:
    """Mean -log q(token) over `eval_tokens` (nats/token), q = add-alpha smoothed train unigram.

    Smoothing keeps an id never seen in training from costing infinite loss."""
    counts = np.asarray(train_counts, dtype=np.float64) + alpha
    log_q = np.log(counts) - np.log(counts.sum())
    eval_tokens = np.asarray(eval_tokens).astype(np.int64, copy=False)
    if eval_tokens.size == 0:
        raise ValueError("unigram_cross_entropy needs at least one evaluation token")
    return float(-log_q[eval_tokens].mean())
