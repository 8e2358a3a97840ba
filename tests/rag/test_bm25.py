"""BM25 against a hand computation and against bm25s (method="lucene") on identical tokens."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from lmstack.rag import BM25, words
from lmstack.utils import LmstackError


def test_hand_computed_scores():
    docs = [["a", "b"], ["a", "a", "c"], ["d"]]          # N = 3, lengths 2, 3, 1, mean 2
    k1, b = 1.2, 0.5
    bm = BM25(k1=k1, b=b).fit(docs)
    idf_a = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))       # df(a) = 2
    idf_c = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))       # df(c) = 1

    def tfc(tf, length):
        return tf / (tf + k1 * (1 - b + b * length / 2))

    want = [idf_a * tfc(1, 2), idf_a * tfc(2, 3) + idf_c * tfc(1, 3), 0.0]
    np.testing.assert_allclose(bm.scores(["a", "c", "zzz"]), want, rtol=1e-12)
    # a repeated query token counts twice (bm25s does the same)
    np.testing.assert_allclose(bm.scores(["c", "c"]), [0, 2 * idf_c * tfc(1, 3), 0], rtol=1e-12)
    assert bm.scores([]).tolist() == [0.0, 0.0, 0.0]


def test_matches_bm25s_lucene_on_identical_tokens():
    bm25s = pytest.importorskip("bm25s")
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    docs = [[rng.choice(vocab[: rng.randint(5, 40)]) for _ in range(rng.randint(1, 30))] for _ in range(60)]
    queries = [[rng.choice(vocab) for _ in range(rng.randint(1, 6))] for _ in range(25)] + [["w1", "w1", "nope"]]
    for k1, b in [(1.5, 0.75), (0.9, 0.4), (2.0, 1.0), (1.2, 0.0)]:
        ours = BM25(k1=k1, b=b).fit(docs)
        # a list of lists of str: bm25s builds its vocabulary from exactly these tokens
        ref = bm25s.BM25(method="lucene", k1=k1, b=b)
        ref.index(docs, show_progress=False)
        for q in queries:
            known = [t for t in q if t in ours.postings]       # bm25s drops unknown query tokens itself
            want = ref.get_scores(known) if known else np.zeros(len(docs))
            np.testing.assert_allclose(ours.scores(q), want, rtol=2e-6, atol=1e-6)   # bm25s works in float32


def test_words_analyzer():
    assert words("Bolo's pet, Tinar, is a FOX.") == ["bolo", "s", "pet", "tinar", "is", "a", "fox"]


def test_errors_at_the_door():
    with pytest.raises(LmstackError, match="no documents"):
        BM25().fit([])
    with pytest.raises(LmstackError, match="before fit"):
        BM25().scores(["a"])
    with pytest.raises(LmstackError, match="b must be"):
        BM25(b=1.5)
    assert BM25().fit([[], []]).scores(["a"]).tolist() == [0.0, 0.0]     # all-empty corpus: no NaN
