"""The compiled quantized-linear kernels (lmstack/kernels) and the forward dispatch of the quantized
modules (model/quantized.py): kernel == F.linear(x, dequantize(), bias) within float32
accumulation error for every format, group size and awkward size; the one-pass C++ dequantize
bit-equal to dequantize(); a hand-computed value; which inputs take which path; the NF4 absmax
cache following every load; and the fallback (one warning, same numbers) when the library is
missing or stale, or cannot be built."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack import kernels
from lmstack.kernels import build
from lmstack.model.quant_formats import codebook
from lmstack.model.quantized import IntLinear, NF4Linear, QuantLinear
from lmstack.quant.nf4 import quantize_nf4
from lmstack.quant.rtn import rtn_quantize

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.unavailable_reason()}")


def assert_matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
    """y equals F.linear(x, w, bias) up to float32 rounding of a reordered sum: each output
    within 1e-5 of the sum of its terms' magnitudes (|x| @ |w|^T + |bias|), the scale that
    bounds any summation order's error."""
    ref = F.linear(x, w, bias)
    terms = F.linear(x.abs(), w.abs(), None if bias is None else bias.abs())
    assert y.shape == ref.shape
    err = (y - ref).abs()
    assert (err <= 1e-5 * terms).all(), f"max relative error {(err / terms.clamp_min(1e-30)).max():.3g}"
    assert err.max() <= 1e-5 * ref.abs().max()


def int_module(out_f, in_f, bits, group, symmetric, awq=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        lin.bias.copy_(torch.randn(out_f, generator=g))
    m = IntLinear(out_f, in_f, bits, group, symmetric, awq=awq, bias=lin.bias)
    codes, scale, zero = rtn_quantize(lin.weight, bits, group, symmetric)
    s = torch.rand(in_f, generator=g) + 0.5 if awq else None
    m.set_codes(codes, scale, zero, s)
    return m


def nf4_module(out_f, in_f, blocksize, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = NF4Linear(out_f, in_f, blocksize, bias=nn.Parameter(torch.randn(out_f, generator=g)))
    m.set_state(*quantize_nf4(torch.randn(out_f, in_f, generator=g), blocksize))
    return m


# (out, in, group): sizes off the vector width (8 floats, 16 codes a step), per channel and grouped
INT_SHAPES = [(37, 100, None), (5, 18, None), (64, 96, 32), (33, 256, 64), (19, 384, 128), (130, 2, None)]


@needs_kernels
@pytest.mark.parametrize("out_f,in_f,group", INT_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_kernel_equals_dequantized_linear(out_f, in_f, group, bits, symmetric):
    m = int_module(out_f, in_f, bits, group, symmetric)
    w = m.dequantize()
    zero = None if symmetric else m.weight_zero
    for rows in (1, 2, 3, 4, 5, 8, 13, 64):   # every tile remainder of the kernel's 4-row tiles
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
        y = kernels.quant_linear(x, m.weight, m.weight_scale, zero, None, bits, m.group_size, m.bias)
        assert_matches(y, x, w, m.bias)
    y = kernels.quant_linear(x, m.weight, m.weight_scale, zero, None, bits, m.group_size, None)
    assert_matches(y, x, w, None)
    assert torch.equal(kernels.quant_dequantize(m.weight, m.weight_scale, zero, None, bits, m.group_size), w)


@needs_kernels
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_nf4_kernel_equals_dequantized_linear(blocksize):
    m = nf4_module(24, 512, blocksize)
    w = m.dequantize()
    for rows in (1, 3, 4, 7, 64):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
        y = kernels.quant_linear(x, m.weight, m.block_absmax(), None, codebook("nf4", x.device), 4, blocksize, m.bias)
        assert_matches(y, x, w, m.bias)
    assert torch.equal(kernels.quant_dequantize(m.weight, m.block_absmax(), None, codebook("nf4", x.device), 4,
                                                blocksize), w)


@needs_kernels
def test_kernel_by_hand():
    # asymmetric INT4 in groups of 2 (test_modules' hand example): W_hat = (code - zero) * scale
    m = IntLinear(2, 4, bits=4, group_size=2, symmetric=False, bias=torch.tensor([0.5, -1.0]))
    m.set_codes(torch.tensor([[0, 15, 3, 4], [8, 8, 1, 2]]), torch.tensor([[0.5, 0.25], [2.0, 1.0]]),
                torch.tensor([[1, 0], [8, 3]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # W_hat = [[-0.5, 7, 0.75, 1], [0, 0, -2, -1]]
    y = kernels.quant_linear(x, m.weight, m.weight_scale, m.weight_zero, None, 4, 2, m.bias)
    assert y.tolist() == [[-0.5 + 14 + 2.25 + 4 + 0.5, -6 - 4 - 1.0]]
    # symmetric INT8 per channel: zero point 128
    y = kernels.quant_linear(x, torch.tensor([[129, 127, 128, 138]], dtype=torch.uint8), torch.tensor([[0.5]]),
                             None, None, 8, 4, None)
    assert y.tolist() == [[(1 - 2 + 0 + 40) * 0.5]]


def spy(monkeypatch):
    calls = []
    real = kernels.quant_linear

    def counted(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)
    monkeypatch.setattr(kernels, "quant_linear", counted)
    return calls


@needs_kernels
@pytest.mark.parametrize("make", [lambda: int_module(48, 64, 8, None, True),
                                  lambda: int_module(48, 64, 4, 32, False),
                                  lambda: int_module(48, 64, 4, 32, True, awq=True),
                                  lambda: nf4_module(48, 64, 32)], ids=["int8", "int4-asym", "awq", "nf4"])
def test_modules_dispatch_to_the_kernel_for_small_batches(make, monkeypatch):
    m, calls = make(), spy(monkeypatch)
    w = m.dequantize()
    x = torch.randn(2, 3, 64)                                   # (B, T, C): 6 rows, kernel
    with torch.inference_mode():
        y = m(x)
    assert calls == [(6, 64)]
    assert_matches(y.view(6, 48), x.view(6, 64), w, m.bias)
    big = torch.randn(3, 40, 64)                                # prefill: blocks of W_hat through GEMM
    with torch.no_grad():
        y = m(big)
    assert calls == [(6, 64), (120, 64)]
    assert_matches(y.view(120, 48), big.view(120, 64), w, m.bias)
    m64 = copy.deepcopy(m).double()                             # other dtypes take the PyTorch path
    with torch.no_grad():
        assert torch.equal(m64(x.double()), F.linear(x.double(), m64.dequantize(torch.float64), m64.bias))
    assert len(calls) == 2


@needs_kernels
def test_gradients_flow_through_the_pytorch_path(monkeypatch):
    # QLoRA trains adapters on top of a frozen quantized layer: dL/dx must exist
    m, calls = int_module(16, 32, 4, 32, True), spy(monkeypatch)
    x = torch.randn(1, 32, requires_grad=True)
    m(x).sum().backward()
    assert calls == []
    assert torch.allclose(x.grad, m.dequantize().sum(0, keepdim=True))
    m(x.detach())                        # the bias still wants a gradient
    assert calls == []
    m.bias.requires_grad_(False)         # frozen, as in QLoRA: no gradient needed, the kernel
    m(x.detach())
    assert calls == [(1, 32)]


@needs_kernels
def test_nf4_absmax_cache_follows_every_load():
    m = nf4_module(16, 128, 64, seed=0)
    other = nf4_module(16, 128, 64, seed=1)
    x = torch.randn(1, 128)
    with torch.no_grad():
        assert_matches(m(x), x, m.dequantize(), m.bias)
        keys = set(m.state_dict())
        bits = m.bits_per_param()
        m.load_state_dict(other.state_dict())                   # in-place copies into the buffers
        assert_matches(m(x), x, other.dequantize(), other.bias)
        m.weight_absmax_scale.mul_(2.0)                         # an in-place weight update (RL, copy_weights)
        assert_matches(m(x), x, m.dequantize(), m.bias)
        m.set_state(*quantize_nf4(torch.randn(16, 128), 64))
        assert_matches(m(x), x, m.dequantize(), m.bias)
    assert m.absmax_cache is not None and "absmax_cache" not in m.state_dict()
    assert set(m.state_dict()) == keys and m.bits_per_param() == bits   # the cache is not stored state


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as in a new process (restored afterwards, so other tests keep the kernels)."""
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_why_not", None)
    monkeypatch.delenv("LMSTACK_KERNELS", raising=False)


def forward_all(modules, x):
    with torch.inference_mode():
        return [m(x) for m in modules]


@pytest.mark.parametrize("state", ["missing", "stale", "other-torch"])
def test_without_a_usable_build_one_warning_and_the_pytorch_path(state, fresh_loader, monkeypatch, tmp_path):
    info = tmp_path / "BUILD_INFO.json"
    if state != "missing":
        sha = "0" * 64 if state == "stale" else build.sources_hash()
        info.write_text(json.dumps({"sources_sha256": sha, "torch": "0.0.0" if state == "other-torch"
                                    else torch.__version__}))
    monkeypatch.setattr(build, "INFO", info)
    modules = [int_module(8, 32, 8, None, True), int_module(8, 32, 4, 16, False), nf4_module(8, 64, 32)]
    with pytest.warns(RuntimeWarning, match="PyTorch path") as record:
        ys = forward_all(modules[:2], torch.randn(1, 32)) + forward_all(modules[2:], torch.randn(1, 64))
        forward_all(modules[:2], torch.randn(1, 32))
    assert len([r for r in record if "kernels" in str(r.message)]) == 1
    expect = {"missing": "not built", "stale": "older than the sources", "other-torch": "built for torch 0.0.0"}
    assert expect[state] in kernels.unavailable_reason()
    assert not kernels.available()
    for m, y in zip(modules, ys):
        assert y.shape == (1, 8)
    x = torch.randn(1, 32)
    assert torch.equal(forward_all(modules[:1], x)[0], F.linear(x, modules[0].dequantize(), modules[0].bias))


def test_env_switch_turns_kernels_off_silently(fresh_loader, monkeypatch):
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    m = int_module(8, 32, 8, None, True)
    x = torch.randn(1, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = forward_all([m], x)[0]
    assert torch.equal(y, F.linear(x, m.dequantize(), m.bias))
    assert kernels.unavailable_reason() == "LMSTACK_KERNELS=0"


@needs_kernels
def test_disabled_block_takes_the_pytorch_path(monkeypatch):
    m, calls = nf4_module(8, 64, 32), spy(monkeypatch)
    x = torch.randn(1, 64)
    with kernels.disabled():
        assert not kernels.available()
        y = forward_all([m], x)[0]
    assert calls == [] and torch.equal(y, F.linear(x, m.dequantize(), m.bias))
    forward_all([m], x)
    assert calls == [(1, 64)]


def test_bits_per_param_counts_stored_state_only():
    m = nf4_module(16, 128, 64)
    m.block_absmax()
    # 4 bits a weight + one 8-bit absmax code a block of 64 + one float32 a 256 blocks + the offset
    n = 16 * 128
    assert m.bits_per_param() == pytest.approx((n * 4 + n // 64 * 8 + 32 + 32) / n)
    assert isinstance(m, QuantLinear)


def test_build_without_a_toolchain_warns_and_succeeds(monkeypatch, capsys):
    # `make install` runs the build on every machine: one that cannot compile must still install
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    info_before = build.INFO.read_text() if build.INFO.exists() else None
    assert build.main([]) == 0
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "ninja is not installed" in err and "pure-PyTorch path" in err
    assert build.main(["--strict"]) == 1
    assert (build.INFO.read_text() if build.INFO.exists() else None) == info_before   # the built library is kept


@needs_kernels
@pytest.mark.slow
def test_torch_compile_puts_the_kernels_in_one_graph():
    # QLoRA with Trainer(compile=True): both paths trace (fake impls of the ops), no graph break
    m = int_module(16, 32, 4, 16, False)
    m.bias.requires_grad_(True)
    f = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 32, requires_grad=True)
    f(x).sum().backward()                                       # gradient path: quant_dequantize + F.linear
    assert torch.allclose(x.grad, m.dequantize().sum(0).expand(2, -1))
    with torch.no_grad():                                       # inference path: quant_linear
        x1 = torch.randn(3, 32)
        assert_matches(f(x1), x1, m.dequantize(), m.bias)
