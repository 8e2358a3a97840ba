"""Lab 8: routers, utilisation, FLOPs per token and the load-balancing loss."""
import numpy as np
import pytest

from lmstack.labs.moe import balance, dense_equivalent


def test_balance_and_dense_equivalent_by_hand():
    assert np.allclose(balance(np.array([[0.25] * 4, [1.0, 0, 0, 0]])), [1.0, 0.0], atol=1e-9)
    flops, extrap = dense_equivalent(2.5, [(100.0, 3.0), (400.0, 2.0)])   # halfway in loss -> geometric mean
    assert flops == pytest.approx(200.0) and not extrap
    assert dense_equivalent(1.5, [(100.0, 3.0), (400.0, 2.0)]) == (pytest.approx(800.0), True)   # one more halving
    assert dense_equivalent(2.5, [(100.0, 3.0), (400.0, 3.1)]) == (None, False)   # a dense line that does not fall


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("moe")
    assert_page(lab)
    models = lab["numbers"]["models"]
    E = lab["numbers"]["n_expert"]
    main, noaux = f"{E} experts, top-2", f"{E} experts, top-2, no balancing loss"
    assert models[noaux]["aux_loss_coef"] == 0.0 and models[main]["aux_loss_coef"] > 0
    for name in ("2 experts, top-1", main, noaux):
        shares = np.array(models[name]["shares"])
        assert np.allclose(shares.sum(1), 1.0, atol=1e-3)                 # every routed token counted once (4 decimals)
        assert models[name]["params"] > models[name]["active_params"]     # more parameters than compute
    # top-1 of 2 computes like the dense model of its width (plus the router's 2 x 64 weights per layer)
    assert models["2 experts, top-1"]["flops_per_token"] - models["dense 64"]["flops_per_token"] == 6 * 2 * 64 * 2
    assert min(models[noaux]["balance"]) < min(models[main]["balance"]) - 0.05
    assert models[main]["load_balancing_loss"] < models[noaux]["load_balancing_loss"]
    assert models[main]["load_balancing_loss"] >= 2.0 - 0.05                 # its minimum is k = 2
    assert lab["record"]["insight"]["holds"]
