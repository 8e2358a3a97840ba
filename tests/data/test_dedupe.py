"""Exact and near-duplicate detection (MinHash + LSH) and leakage-free splits."""
from __future__ import annotations

import random

import numpy as np

from lmstack.data import CorpusOptions, build_corpus, iter_texts
from lmstack.data.dedupe import MinHasher, find_duplicates, shingles

_WORDS = ("apple river stone cloud bright quiet garden lantern whisper meadow copper silver harbor "
          "window market orange violet thunder candle forest valley mirror pocket shadow summer winter "
          "basket ladder rabbit turtle island desert canyon bridge castle feather pepper ticket").split()


def _paragraph(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)) + "."


def _edit(rng: random.Random, text: str, n_edits: int) -> str:
    words = text.split(" ")
    for _ in range(n_edits):
        i = rng.randrange(len(words) - 1)
        words[i] = rng.choice([w for w in _WORDS if w != words[i]])
    return " ".join(words)


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    a = np.arange(1, 401, dtype=np.uint64) * np.uint64(2654435761)
    b = np.concatenate([a[:300], np.arange(1000, 1100, dtype=np.uint64) * np.uint64(2654435761)])
    true_j = 300 / 500
    sig = MinHasher(num_perm=480, seed=rng.randrange(100)).signatures([a, b])
    est = (sig[0] == sig[1]).mean()
    assert abs(est - true_j) < 0.08          # std of the estimate is sqrt(J(1-J)/480) ~ 0.022


def test_planted_near_duplicates_are_removed_and_distinct_texts_kept():
    rng = random.Random(1)
    originals = [_paragraph(rng) for _ in range(60)]
    near = [_edit(rng, t, 1) for t in originals[:20]]                    # J ~ 0.9
    exact = [" ".join(t.split()) + "  " for t in originals[20:30]]       # whitespace-only change
    texts = originals + near + exact
    order = list(range(len(texts)))
    rng.shuffle(order)
    texts = [texts[i] for i in order]
    r = find_duplicates(texts, threshold=0.7)
    kept = {" ".join(texts[i].split()) for i in r.keep()}
    assert len(kept) == 60               # one text per original (whichever copy came first)
    for j, o in enumerate(originals):
        assert o in kept or (j < 20 and near[j] in kept)
    assert r.n_exact == 10 and r.n_near == 20
    # each planted copy points at its original's cluster
    pos = {t: i for i, t in enumerate(texts)}
    for o, n in zip(originals[:20], near):
        assert r.cluster[pos[o]] == r.cluster[pos[n]]
    # deterministic
    assert (find_duplicates(texts, threshold=0.7).cluster == r.cluster).all()


def test_short_templated_texts_are_not_near_duplicates():
    texts = [f"Q: what is {a}+{b}?\nA: {a}+{b}={a + b}" for a in range(10) for b in range(10)]
    r = find_duplicates(texts + texts[:5])
    assert r.n_exact == 5 and r.n_near == 0


def test_shingles_are_case_and_space_insensitive():
    assert (shingles("The  cat sat on the mat") == shingles("the cat sat\non the MAT")).all()


def test_duplicate_clusters_never_straddle_splits(tmp_path):
    rng = random.Random(2)
    src = tmp_path / "src"
    src.mkdir()
    originals = [_paragraph(rng) for _ in range(80)]
    for i, t in enumerate(originals):
        (src / f"doc{i:03d}.txt").write_text(t)
        if i < 30:     # a near copy and an exact copy of the first 30
            (src / f"near{i:03d}.txt").write_text(_edit(rng, t, 1))
            (src / f"exact{i:03d}.txt").write_text(t)
    build_corpus(CorpusOptions(corpus=str(src), out=str(tmp_path / "kept"), val_frac=0.2, test_frac=0.2))
    split_of = {}
    for s in ("train", "val", "test"):
        for t in iter_texts(tmp_path / "kept", s):
            split_of.setdefault(t, set()).add(s)
    for t in originals[:30]:
        copies = [u for u in split_of if sum(x != y for x, y in zip(u.split(), t.split())) <= 1]
        assert len(set().union(*(split_of[u] for u in copies))) == 1   # all copies in one split
    assert all(len(v) == 1 for v in split_of.values())
    assert sum(len(list(iter_texts(tmp_path / "kept", s))) for s in ("train", "val", "test")) == 140
    meta = build_corpus(CorpusOptions(corpus=str(src), out=str(tmp_path / "dd"), dedupe=True))
    assert meta["documents"]["removed"] == 60 and meta["documents"]["kept"] == 80
