"""INT8 weights with int8 activations (act_bits=8, W8A8): the activation rounding by hand, the
VNNI kernel (kernels/quant_linear_a8.cpp) against F.linear of the rounded input and the
dequantized weight, the module's kernel and PyTorch paths agreeing, and a quantized run that
saves, reloads and generates with the setting; bad settings are errors naming the field."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack import kernels
from lmstack.model import ModelConfig, Transformer
from lmstack.model.quant_formats import act_block, quantize_activations
from lmstack.model.quantized import IntLinear, QuantError
from lmstack.quant import QuantConfig, quantize_model
from lmstack.quant.rtn import rtn_quantize
from tests.quant.test_kernels import assert_matches

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.unavailable_reason()}")


def a8_module(out_f, in_f, group, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(out_f, generator=g))
    m = IntLinear(out_f, in_f, 8, group, symmetric, bias=lin.bias, act_bits=8)
    m.set_codes(*rtn_quantize(lin.weight, 8, group, symmetric))
    return m


def test_activation_rounding_by_hand():
    x = torch.zeros(2, 64)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = -2.54, 1.0, 0.01, 0.03      # block 0: d = 2.54 / 127 = 0.02
    x[0, 4] = 0.05                                                     # 2.5 steps: half to even -> 2
    x[1, 32:] = torch.linspace(-1, 1, 32)                              # block 1 of row 1; its block 0 is zero
    xh = quantize_activations(x, 32)
    d = torch.tensor(2.54) / 127
    want = torch.round(torch.tensor([-2.54, 1.0, 0.01, 0.03, 0.05]) / d) * d
    assert torch.equal(xh[0, :5], want)
    assert [int(v) for v in torch.round(xh[0, :5] / d)] == [-127, 50, 0, 2, 2]
    assert torch.equal(xh[0, 32:], torch.zeros(32)) and torch.equal(xh[1, :32], torch.zeros(32))
    assert (xh[1, 32:] - x[1, 32:]).abs().max() <= (1 / 127) / 2 + 1e-7        # at most half a step
    assert xh[1, 32] == -1 and xh[1, 63] == 1                                   # the absmax is exact
    # straight-through: the gradient passes unchanged
    xr = x.clone().requires_grad_(True)
    (quantize_activations(xr, 32) * torch.arange(64.0)).sum().backward()
    assert torch.equal(xr.grad, torch.arange(64.0).expand(2, 64))
    # one block of 64: the scale of the whole row
    assert torch.equal(quantize_activations(x, 64)[0, :5], want)
    assert [act_block(g) for g in (32, 64, 96, 128, 384, 512, 48)] == [32, 64, 32, 128, 128, 128, None]


@needs_kernels
@pytest.mark.parametrize("out_f,in_f,group", [(37, 96, None), (64, 128, 32), (33, 256, 64), (19, 384, 128),
                                               (21, 640, None)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_equals_linear_of_rounded_input(out_f, in_f, group, symmetric):
    m = a8_module(out_f, in_f, group, symmetric)
    w, zero, ab = m.dequantize(), None if symmetric else m.weight_zero, m.act_block
    assert ab == act_block(m.group_size)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 13, 70):  # every GEMV width, tile remainders, past the 64-row chunk
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)) * 3
        x[0, :ab] = 0                               # an all-zero block
        y = kernels.quant_linear_a8(x, m.weight, m.weight_scale, zero, m.group_size, ab, m.bias)
        assert_matches(y, quantize_activations(x, ab), w, m.bias)
    with torch.no_grad():
        y_mod = m(x.view(2, 35, in_f))              # the module: (..., in) in, the same numbers
        with kernels.disabled():                    # the PyTorch path
            y_ref = m(x.view(2, 35, in_f))
    assert_matches(y_mod.view(70, -1), quantize_activations(x, ab), w, m.bias)
    assert_matches(y_ref.view(70, -1), quantize_activations(x, ab), w, m.bias)
    assert not torch.allclose(y_mod.view(70, -1), F.linear(x, w, m.bias), rtol=0, atol=1e-6)   # inputs rounded


def test_quantized_run_saves_reloads_and_generates(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                      context_length=64)
    model = Transformer(cfg).eval()
    ref = Transformer(cfg).eval()
    ref.load_state_dict(model.state_dict())
    quantize_model(model, QuantConfig(method="rtn", bits=8, act_bits=8))
    quantize_model(ref, QuantConfig(method="rtn", bits=8))
    assert all(m.act_bits == 8 for m in model.modules() if isinstance(m, IntLinear))
    model.save_pretrained(tmp_path / "w8a8")
    back = Transformer.from_pretrained(tmp_path / "w8a8").eval()
    assert [m.act_bits for m in back.modules() if isinstance(m, IntLinear)] == [8] * 8
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        a, b, w8 = model(x), back(x), ref(x)
    assert torch.equal(a, b)
    rel = (a - w8).abs().max() / w8.abs().max()
    assert 0 < rel < 0.05                          # int8 inputs: close to weight-only INT8, not equal


def test_bad_settings_name_the_field():
    with pytest.raises(QuantError, match="act_bits=8.*bits=4"):
        QuantConfig(method="rtn", bits=4, act_bits=8)
    with pytest.raises(QuantError, match="act_bits=8.*method='awq'"):
        QuantConfig(method="awq", bits=8, act_bits=8)
    with pytest.raises(QuantError, match="act_bits=4"):
        QuantConfig(method="rtn", bits=8, act_bits=4)
    with pytest.raises(QuantError, match="blocks of 128, 64 or 32.*in_features=48"):
        IntLinear(8, 48, 8, None, True, act_bits=8, name="fc")
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=48, context_length=16))
    with pytest.raises(QuantError, match="blocks of 128, 64 or 32"):
        quantize_model(model, QuantConfig(method="rtn", bits=8, act_bits=8))
    assert not any(isinstance(m, IntLinear) for m in model.modules())    # nothing changed
