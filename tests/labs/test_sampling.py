"""Lab 5: temperature against diversity and repetition; top-k / top-p / min-p through the engine."""
import pytest
import torch

from lmstack.infer import SamplingParams
from lmstack.labs.sampling import distinct_n, processed_logits, repetition_rate, spearman


def test_metrics_by_hand():
    assert distinct_n([[1, 2, 1, 2], [1, 2, 3]], 2) == pytest.approx(3 / 5)   # bigrams 12 21 12 | 12 23
    assert repetition_rate([1, 2, 3, 1, 2, 3, 1], 3) == pytest.approx(2 / 5)  # 123 231 312 123 231
    assert spearman([0, 1, 2], [5, 6, 7]) == pytest.approx(1.0)


def test_processed_logits_keep_what_the_settings_say():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda sp: torch.isfinite(processed_logits(logits, sp))[0].tolist()   # noqa: E731
    assert kept(SamplingParams(top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.8)) == [True, True, False, False]       # 0.5 + 0.3 reaches 0.8
    assert kept(SamplingParams(min_p=0.2)) == [True, True, True, False]        # p >= 0.1
    halved = processed_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(halved, logits * 2)


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("sampling")
    assert_page(lab)
    n = lab["numbers"]
    t = n["by_temperature"]
    assert t["T=0"]["entropy"] == 0.0 and t["T=0"]["repetition"] > t["T=1"]["repetition"]
    assert t["T=1"]["distinct_2"] > 1.5 * t["T=0"]["distinct_2"]
    ent = [v["entropy"] for v in t.values()]
    assert ent == sorted(ent) and len(set(ent)) == len(ent)
    m = n["by_method"]
    assert 10 <= m["top-k 10"]["kept_tokens"] < 10.1                   # k (more only on a tie at the k-th logit)
    assert m["T=1 only"]["kept_tokens"] > m["top-p 0.8"]["kept_tokens"] > 1
    assert m["min-p 0.1"]["entropy"] < m["T=1 only"]["entropy"]
    assert n["engine"]["generation_tokens"] > 0
    assert lab["record"]["insight"]["holds"]
