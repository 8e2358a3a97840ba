"""The float32 decode GEMV (kernels.dense_linear) against F.linear, and its routing in the engine
(infer/fast_linear.py): only inside the runner's forward, only without autograd, only for few rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack import kernels
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.fast_linear import MAX_ROWS, DecodeLinears
from tests.infer.conftest import plain_greedy, tiny_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.unavailable_reason()}")


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8])   # every tile the kernel picks (dense_linear.cpp)
@pytest.mark.parametrize("N,K,bias", [(7, 5, True), (64, 48, False), (130, 257, True), (300, 1024, False)])
def test_dense_linear_equals_f_linear(M, N, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    want = F.linear(x.double(), w.double(), b.double() if bias else None)
    y = kernels.dense_linear(x, w, b)
    assert y.shape == (M, N) and y.dtype == torch.float32
    # float32 rounding of a K-term sum: bounded by a few eps of the sum of |terms|
    bound = 1e-6 * (x.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0))
    assert ((y.double() - want).abs() <= bound).all()


@needs_kernels
def test_dense_linear_many_threads_and_bad_input():
    x, w = torch.randn(3, 512), torch.randn(1000, 512)      # enough rows that helper threads join
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = kernels.dense_linear(x, w, None)
    finally:
        torch.set_num_threads(n)
    assert (y - F.linear(x, w)).abs().max() < 1e-3
    with pytest.raises(RuntimeError, match="weight must be a contiguous float32"):
        kernels.dense_linear(x, w.t(), None)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        kernels.dense_linear(x.double(), w, None)


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = kernels.dense_linear

    def counting(x, w, b):
        calls.append(tuple(x.shape))
        return real(x, w, b)
    monkeypatch.setattr(kernels, "dense_linear", counting)
    return calls


@needs_kernels
def test_routing_only_inside_active_without_grad_and_for_few_rows(spy):
    lin = nn.Linear(32, 16)
    fast = DecodeLinears(nn.Sequential(lin))
    assert fast.modules == [lin] and type(lin) is nn.Linear
    assert DecodeLinears(nn.Sequential(lin)).modules == [lin]          # a second engine: not wrapped twice
    x = torch.randn(2, 3, 32)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and spy == []        # outside active()
    with fast.active(), torch.inference_mode():
        y = lin(x)                                                      # 6 rows: within MAX_ROWS
        assert spy == [(6, 32)] and y.shape == (2, 3, 16)
        assert (y - F.linear(x, lin.weight, lin.bias)).abs().max() < 1e-5
        lin(torch.randn(MAX_ROWS + 1, 32))                              # prefill-sized: F.linear
        with torch.enable_grad():
            lin(torch.randn(1, 32))                                     # autograd: F.linear
        with kernels.disabled():
            lin(torch.randn(1, 32))
    assert len(spy) == 1
    assert lin.state_dict().keys() == {"weight", "bias"}


@needs_kernels
def test_engine_decodes_on_the_gemv_and_equals_the_plain_loop(spy):
    model = tiny_model(5, mlp="gelu", bias=True)
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    prompts = [list(range(3, 20)), [9, 8, 7]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == plain_greedy(model, p, 8)
    assert any(shape[0] <= 2 for shape in spy)                          # decode rows went to the kernel
