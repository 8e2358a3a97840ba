"""GPTQ and AWQ against RTN and against hand-computed updates: lower output reconstruction
error on correlated / outlier inputs, codes on the RTN grid, robust dampening."""
import pytest
import torch

from lmstack.quant.awq import ActivationStat, awq_search
from lmstack.quant.gptq import HessianStat, gptq_quantize
from lmstack.quant.rtn import fake_quantize, from_codes, rtn_quantize


def rel_err(W, Q, X):
    return ((X @ W.T - X @ Q.T).norm() / (X @ W.T).norm()).item()


def dequant(codes, scale, zero, bits, g):
    z = None if zero is None else zero.repeat_interleave(g, 1).float()
    return from_codes(codes.float(), scale.repeat_interleave(g, 1), z, bits)


def correlated_inputs(n, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(12, in_f, generator=torch.Generator().manual_seed(0))   # shared low-rank structure
    return torch.randn(n, 12, generator=g) @ basis + 0.3 * torch.randn(n, in_f, generator=g)


def test_hessian_is_two_xtx_over_n_across_batches():
    X = torch.randn(300, 16)
    st = HessianStat()
    for part in X.split([100, 7, 193]):
        st.add(part.view(1, -1, 16))
    assert st.n == 300 and torch.allclose(st.H, 2 * X.T @ X / 300, atol=1e-5)


def test_gptq_column_update_matches_hand_computation():
    # inputs 0 and 2 are correlated (H02 = 1), input 1 is independent. Rounding w0 leaves the
    # error dw0 = w0 - q0; the optimal change of w2 is -(H^-1)02 / (H^-1)00 * dw0 = dw0 / 2
    # (OBS), while w1 gets nothing. Per-channel symmetric INT4: step s = 0.21 / 7 = 0.03.
    W = torch.tensor([[0.044, 0.21, 0.04]])
    H = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 0.0, 2.0]])
    codes, scale, _ = gptq_quantize(W, H, bits=4, group_size=None, symmetric=True, damp_percent=1e-9)
    s = 0.21 / 7
    assert scale.item() == pytest.approx(s)
    q0 = round(0.044 / s)                                    # 1.47 -> 1
    w2 = 0.04 + (0.044 - q0 * s) / 2                         # 0.047 -> 1.57 s -> 2 (RTN alone: 1.33 -> 1)
    assert codes.tolist() == [[q0 + 8, 7 + 8, round(w2 / s) + 8]] == [[9, 15, 10]]
    assert rtn_quantize(W, 4, None, True)[0].tolist() == [[9, 15, 9]]


@pytest.mark.parametrize("group", [None, 32])
def test_gptq_with_uncorrelated_inputs_is_rtn(group):
    # H = I: no column's error has anywhere to go, so GPTQ must give RTN's codes exactly
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    codes, scale, zero = gptq_quantize(W, torch.eye(64), 4, group, False)
    rc, rs, rz = rtn_quantize(W, 4, group, False)
    assert torch.equal(codes, rc) and torch.equal(scale, rs) and torch.equal(zero, rz)


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, None, True, False), (4, 32, True, False),
                                                      (4, 32, False, True), (8, 64, True, False)])
def test_gptq_beats_rtn_and_stays_on_the_grid(bits, group, sym, act_order):
    torch.manual_seed(0)
    W = torch.randn(48, 128) * 0.1
    X, X_test = correlated_inputs(1024, 128, 1), correlated_inputs(1024, 128, 2)
    st = HessianStat()
    st.add(X)
    codes, scale, zero = gptq_quantize(W, st.H, bits, group, sym, act_order=act_order)
    lo = 1 if sym else 0
    assert codes.dtype == torch.long and codes.min() >= lo and codes.max() <= 2 ** bits - 1
    Q = dequant(codes, scale, zero, bits, group or 128)
    R = fake_quantize(W, bits, group, sym)
    # GPTQ moves weights along the grid, never off it: re-rounding its weights changes nothing
    z = 2 ** (bits - 1) if zero is None else zero.repeat_interleave(group or 128, 1).float()
    assert torch.equal(torch.round(Q / scale.repeat_interleave(group or 128, 1)) + z, codes.float())
    for data in (X, X_test):   # on calibration and on held-out inputs of the same distribution
        assert rel_err(W, Q, data) < 0.5 * rel_err(W, R, data)


def test_singular_hessian_gets_more_dampening_not_a_crash(monkeypatch):
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    X = torch.randn(4, 32)                     # rank 4 < 32, and input 3 never active
    X[:, 3] = 0
    H = 2 * X.T @ X / 4
    H[5, 6] = H[6, 5] = 10 * H.diagonal().max()  # indefinite: fails at damp 0.01, passes after retries
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A, **kw: calls.append(1) or real(A, **kw))
    codes, scale, _ = gptq_quantize(W, H, 4, None, True, damp_percent=0.01)
    assert len(calls) > 2                        # the first tries failed and were retried with more damping
    assert torch.isfinite(scale).all() and codes.min() >= 1 and codes.max() <= 15


def test_awq_beats_rtn_on_outlier_channels():
    torch.manual_seed(0)
    W = torch.randn(48, 128) * 0.1

    def acts(seed):
        x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(seed))
        x[:, :4] *= 30                         # a few salient input channels, as in LLM activations
        return x
    st = ActivationStat(max_rows=1024)
    st.add(acts(1))
    assert st.kept == 1024 and torch.allclose(st.mean_abs, acts(1).abs().mean(0))
    for bits, group in [(4, None), (4, 32), (8, None)]:
        s, alpha, errors = awq_search(W, st.X, st.mean_abs, bits, group, True)
        assert alpha > 0 and errors[0] == pytest.approx(rel_err(W, fake_quantize(W, bits, group, True), st.X) ** 2
                                                        * (st.X @ W.T).pow(2).mean().item(), rel=1e-4)
        assert s[:4].min() > s[4:].max()       # the salient channels are scaled up
        Q = fake_quantize(W * s, bits, group, True) / s
        X_test = acts(2)
        assert rel_err(W, Q, X_test) < 0.7 * rel_err(W, fake_quantize(W, bits, group, True), X_test)
