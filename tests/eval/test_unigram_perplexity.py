"""Unigram entropy against a hand-computed distribution; perplexity against a direct loop."""
import math

import numpy as np
import pytest
import torch

from lmstack.eval import evaluate_loss, perplexity, token_counts, unigram_cross_entropy, unigram_entropy


def test_unigram_entropy_hand_computed():
    # tokens: 0 x4, 1 x2, 2 x1, 3 x1 -> p = 1/2, 1/4, 1/8, 1/8 -> H = 1.75 bits
    tokens = np.array([0, 1, 0, 2, 0, 1, 3, 0], dtype=np.uint16)
    counts = token_counts(tokens, vocab_size=6)
    assert counts.tolist() == [4, 2, 1, 1, 0, 0]
    assert unigram_entropy(counts) == pytest.approx(1.75 * math.log(2), abs=1e-12)
    # uniform over 4 symbols: log 4; a single symbol: 0
    assert unigram_entropy(np.array([3, 3, 3, 3])) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([0, 7, 0])) == 0.0


def test_unigram_cross_entropy_add_one():
    train = np.array([3, 1, 0])            # + 1 smoothing -> q = 4/7, 2/7, 1/7
    got = unigram_cross_entropy(train, np.array([0, 2, 2]))
    want = -(math.log(4 / 7) + 2 * math.log(1 / 7)) / 3
    assert got == pytest.approx(want, abs=1e-12)


def test_unigram_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        token_counts(np.array([0, 9]), vocab_size=4)
    with pytest.raises(ValueError):
        unigram_entropy(np.zeros(3))


class Bigram(torch.nn.Module):
    """logits[t] depend on ids[t] only: enough to make every position's loss different."""

    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, ids):  # (B, T) -> (B, T, V)
        return self.table[ids]


@pytest.mark.parametrize("seq_len,batch_size,max_tokens", [(5, 2, None), (7, 3, None), (4, 8, 30)])
def test_perplexity_is_exp_mean_loss_of_direct_loop(seq_len, batch_size, max_tokens):
    vocab = 11
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=103).astype(np.uint16)
    model = Bigram(vocab)
    got = evaluate_loss(model, tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)

    # Direct: every window of seq_len + 1 tokens, every position, -log softmax of the target (float64).
    stream = tokens if max_tokens is None else tokens[: max_tokens + 1]
    table = model.table.detach().double()
    losses = []
    for w in range((len(stream) - 1) // seq_len):
        for t in range(seq_len):
            cur, nxt = int(stream[w * seq_len + t]), int(stream[w * seq_len + t + 1])
            losses.append(-(table[cur][nxt] - torch.logsumexp(table[cur], 0)).item())
    assert got["tokens"] == len(losses)
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert model.training  # mode restored


def test_perplexity_helpers():
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="more than seq_len"):
        evaluate_loss(Bigram(3), np.array([1, 2]), seq_len=4)
