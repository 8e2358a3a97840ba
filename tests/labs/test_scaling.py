"""Lab 13: loss against parameters and compute, a fitted power law, how small is too small."""
import numpy as np
import pytest

from lmstack.labs.scaling import power_fit, predict


def test_power_fit_recovers_a_known_law():
    N = [1e3, 1e4, 1e5]
    fit = power_fit(N, [5.0 * n ** -0.2 for n in N])
    assert fit["a"] == pytest.approx(5.0) and fit["alpha"] == pytest.approx(0.2) and fit["r2"] == pytest.approx(1.0)
    assert predict(fit, 1e6) == pytest.approx(5.0 * 1e6 ** -0.2)


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("scaling")
    assert_page(lab)
    n = lab["numbers"]
    sizes = n["sizes"]
    N = [v["params"] for v in sizes.values()]
    L = [v["val_loss"] for v in sizes.values()]
    assert N == sorted(N) and L == sorted(L, reverse=True)
    fit = power_fit(N, L)
    assert fit["alpha"] == pytest.approx(n["fit_params"]["alpha"]) and fit["alpha"] > 0 and fit["r2"] > 0.8
    assert n["extrapolated"]["val_loss"] < min(L)
    gain = {k: n["unigram_baseline"] - v["val_loss"] for k, v in sizes.items()}
    assert n["too_small"] == [k for k in sizes if gain[k] < 0.5 * gain[list(sizes)[-1]]]
    assert n["too_small"] and list(sizes)[-1] not in n["too_small"]
    for v in sizes.values():
        assert v["train_memory_bytes"] == 16 * v["params_total"]
        ranks = {m: {int(w): b for w, b in d.items()} for m, d in v["per_rank_bytes"].items()}
        assert all(ranks[m][1] == v["train_memory_bytes"] for m in ranks)        # one rank holds everything
        assert ranks["ddp"][8] == v["train_memory_bytes"] and ranks["zero3"][8] == v["train_memory_bytes"] / 8
        assert ranks["zero3"][4] < ranks["zero2"][4] < ranks["zero1"][4] < ranks["ddp"][4]
        assert v["tokens"] == n["steps"] * n["batch_size"] * n["seq_len"]
    assert np.isfinite(n["fit_compute"]["alpha"])
    assert lab["record"]["insight"]["holds"]
