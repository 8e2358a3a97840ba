"""Quantized linear modules (model/quantized.py) and their grids (quant/rtn.py, quant/nf4.py):
hand-computed dequantization, forward == F.linear(x, dequantize(), bias), storage cost, and
NF4 against bitsandbytes bit for bit."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.quant_formats import DYNAMIC_MAP, NF4_CODE, pack_int4, unpack_int4
from lmstack.model.quantized import IntLinear, NF4Linear, QuantError
from lmstack.quant.nf4 import quantize_nf4
from lmstack.quant.rtn import fake_quantize, rtn_quantize


def test_int4_packing_round_trips_high_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]])
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x12, 0xF0, 0x78]]
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))


def test_int_linear_dequantizes_by_hand():
    # asymmetric INT4, groups of 2: W_hat = (code - zero) * scale
    m = IntLinear(2, 4, bits=4, group_size=2, symmetric=False)
    codes = torch.tensor([[0, 15, 3, 4], [8, 8, 1, 2]])
    scale = torch.tensor([[0.5, 0.25], [2.0, 1.0]])
    zero = torch.tensor([[1, 0], [8, 3]])
    m.set_codes(codes, scale, zero)
    expect = torch.tensor([[-0.5, 7.0, 0.75, 1.0], [0.0, 0.0, -2.0, -1.0]])
    assert torch.equal(m.dequantize(), expect)
    # symmetric INT8 per channel: zero is 128; AWQ divides by the input scale
    m = IntLinear(1, 3, bits=8, symmetric=True, awq=True)
    m.set_codes(torch.tensor([[128, 255, 1]]), torch.tensor([[0.5]]), awq_scale=torch.tensor([1.0, 2.0, 0.5]))
    assert torch.equal(m.dequantize(), torch.tensor([[0.0, 127 * 0.5 / 2, -127 * 0.5 / 0.5]]))


def test_rtn_codes_are_the_nearest_grid_points():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, 0] = 0.0
    for bits, g, sym in [(8, None, True), (4, 32, True), (4, 64, False), (8, 32, False)]:
        codes, scale, zero = rtn_quantize(w, bits, g, sym)
        lo, hi = (1, 2 ** bits - 1) if sym else (0, 2 ** bits - 1)
        assert codes.min() >= lo and codes.max() <= hi
        gs = g or 64
        s = scale.repeat_interleave(gs, 1)
        z = 2 ** (bits - 1) if sym else zero.repeat_interleave(gs, 1)
        # every weight is within half a step of its grid point, and no other code is closer
        deq = (codes - z) * s
        assert ((deq - w).abs() <= s / 2 + 1e-6).all()
        for d in (-1, 1):
            other = ((codes + d).clamp(lo, hi) - z) * s
            assert ((other - w).abs() >= (deq - w).abs() - 1e-6).all()
        assert torch.equal(deq[:, 0], torch.zeros(8))          # 0.0 is on every grid
        if sym:  # absmax maps onto the outermost level
            assert torch.allclose(scale[:, 0], w[:, :gs].abs().amax(1) / (2 ** (bits - 1) - 1))
        else:    # min and max (with 0 included) span the 2^b - 1 steps
            wg = w[:, :gs]
            span = wg.amax(1).clamp(min=0) - wg.amin(1).clamp(max=0)
            assert torch.allclose(scale[:, 0], span / (2 ** bits - 1))


@pytest.mark.parametrize("bits,group,sym,awq", [(8, None, True, False), (4, 32, False, False), (4, 64, True, True)])
def test_forward_equals_linear_of_dequantized_weight(bits, group, sym, awq):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    m = IntLinear(24, 64, bits, group, sym, awq=awq, bias=lin.bias)
    codes, scale, zero = rtn_quantize(lin.weight, bits, group, sym)
    m.set_codes(codes, scale, zero, torch.rand(64) + 0.5 if awq else None)
    x = torch.randn(3, 5, 64)
    assert torch.equal(m(x), F.linear(x, m.dequantize(), lin.bias))
    if not awq:  # the module computes with exactly the RTN weight
        assert torch.equal(m.dequantize(), fake_quantize(lin.weight, bits, group, sym))
    assert m.base_linear_shape == (24, 64) and m.bias is lin.bias
    nf = NF4Linear(24, 64, bias=lin.bias)
    nf.set_state(*quantize_nf4(lin.weight))
    assert torch.equal(nf(x), F.linear(x, nf.dequantize(), lin.bias))


def test_bits_per_param_counts_codes_and_statistics():
    assert IntLinear(16, 64, 8, None, True).bits_per_param() == 8 + 32 / 64                 # + fp32 scale per row
    assert IntLinear(16, 64, 4, 32, False).bits_per_param() == 4 + 32 / 32 + 8 / 32        # + scale, zero per 32
    assert IntLinear(16, 64, 4, 64, True, awq=True).bits_per_param() == 4 + 32 / 64 + 32 * 64 / (16 * 64)
    out_f, in_f = 96, 640                                # 960 NF4 blocks -> 4 absmax blocks of 256
    n_blocks = out_f * in_f // 64
    expect = 4 + 8 / 64 + (32 * math.ceil(n_blocks / 256) + 32) / (out_f * in_f)
    assert NF4Linear(out_f, in_f).bits_per_param() == pytest.approx(expect, rel=1e-12)


def test_layer_setting_errors_name_the_problem():
    with pytest.raises(QuantError, match="group_size=32 does not divide in_features=48"):
        IntLinear(4, 48, 4, 32)
    with pytest.raises(QuantError, match="bits=3"):
        IntLinear(4, 64, 3)
    with pytest.raises(QuantError, match="blocks of 64 must divide in_features=96"):
        NF4Linear(4, 96)
    m = IntLinear(2, 4, 4, None, True)
    with pytest.raises(QuantError, match=r"codes must lie in \[1, 15\]"):
        m.set_codes(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 1))


def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.functional


def test_codebooks_equal_bitsandbytes():
    BF = _bnb()
    assert torch.equal(DYNAMIC_MAP, BF.create_dynamic_map())
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape,dtype", [((64, 128), torch.float32), ((300, 320), torch.float32),
                                         ((40, 192), torch.bfloat16)])
def test_nf4_matches_bitsandbytes_bit_for_bit(shape, dtype):
    BF = _bnb()
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).to(dtype)
    w[1] = 0                      # an all-zero row: absmax 0
    w[2, 5] = 3.0                 # an outlier block
    q, st = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed, absmax_q, absmax_scale, offset = quantize_nf4(w)
    assert torch.equal(packed.flatten(), q.flatten())                      # packed NF4 bytes
    assert torch.equal(absmax_q, st.absmax)                                # 8-bit double-quantized absmax
    assert torch.equal(absmax_scale, st.state2.absmax) and torch.equal(offset, st.offset)
    m = NF4Linear(*shape)
    m.set_state(packed, absmax_q, absmax_scale, offset)
    ref = BF.dequantize_4bit(q, st)                                        # in the input dtype
    assert ref.dtype == dtype
    assert torch.equal(m.dequantize(dtype), ref)                           # dequantized floats
    assert torch.equal(m.absmax(), BF.dequantize_blockwise(st.absmax, st.state2) + st.offset)
