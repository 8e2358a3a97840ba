"""Exact nearest neighbours against a brute-force sort; FAISS flat equal to exact, and the
approximate indexes' recall@10 measured against exact."""
from __future__ import annotations

import numpy as np
import pytest

from lmstack.rag import exact_search, top_k
from lmstack.rag.vectors import FaissSearch, recall_at_k
from lmstack.utils import LmstackError


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_top_k_breaks_ties_by_lower_index():
    assert top_k(np.array([0.5, 0.9, 0.5, 0.9, 0.1]), 4).tolist() == [1, 3, 0, 2]
    assert top_k(np.array([1.0]), 5).tolist() == [0]


def test_exact_search_equals_brute_force():
    E, Q = unit(300, 16, 0), unit(20, 16, 1)
    ids, sims = exact_search(E, Q, 7)
    for q, row, s in zip(Q, ids, sims):
        full = E @ q
        assert row.tolist() == np.argsort(-full, kind="stable")[:7].tolist()
        np.testing.assert_allclose(s, full[row], rtol=1e-6)
    with pytest.raises(LmstackError, match="same dimension"):
        exact_search(E, unit(1, 8, 2), 3)


def test_recall_at_k_hand():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 5, 6]])) == pytest.approx(2 / 3)


def test_faiss_flat_equals_exact_and_approximate_recall():
    pytest.importorskip("faiss")
    E, Q = unit(4000, 32, 3), unit(50, 32, 4)
    exact_ids, exact_sims = exact_search(E, Q, 10)
    ids, sims = FaissSearch(E, "flat").search(Q, 10)
    assert (ids == exact_ids).all()
    np.testing.assert_allclose(sims, exact_sims, rtol=1e-5, atol=1e-6)
    hnsw = recall_at_k(FaissSearch(E, "hnsw").search(Q, 10)[0], exact_ids)
    ivf = recall_at_k(FaissSearch(E, "ivf", nprobe=8).search(Q, 10)[0], exact_ids)
    # approximate: high but (on random 32-d data) measurably below exact
    assert 0.8 <= hnsw <= 1.0 and 0.3 <= ivf < 1.0, (hnsw, ivf)
    assert recall_at_k(FaissSearch(E, "ivf", nprobe=10**6).search(Q, 10)[0], exact_ids) == 1.0   # all cells


def test_faiss_errors():
    pytest.importorskip("faiss")
    with pytest.raises(LmstackError, match="unknown FAISS index kind"):
        FaissSearch(unit(5, 4, 0), "lsh")
    with pytest.raises(LmstackError, match="0 vectors"):
        FaissSearch(np.zeros((0, 4), np.float32))
