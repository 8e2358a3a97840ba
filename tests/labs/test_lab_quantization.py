"""Lab 14: accuracy against bit width, PTQ against QAT, GGUF export."""
import copy

import pytest
import torch

from lmstack.labs.quantization import GROUP, fake_quant, round_weights
from lmstack.model import ModelConfig, Transformer
from lmstack.model.quantized import IntLinear
from lmstack.quant import FakeQuantLinear


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=64, context_length=16))


def test_each_bit_width_really_rounds_the_weights():
    base = _model()
    w = base.blocks[0].attn.qkv.weight.detach().clone()
    m16 = copy.deepcopy(base)
    round_weights(m16, 16)
    assert torch.equal(m16.blocks[0].attn.qkv.weight, w.half().float())
    m3 = copy.deepcopy(base)
    assert round_weights(m3, 3) is None
    groups = m3.blocks[0].attn.qkv.weight.detach().reshape(w.shape[0], -1, GROUP)
    distinct = max(len(torch.unique(g)) for row in groups for g in row)
    assert 4 < distinct <= 2 ** 3 - 1                      # a symmetric 3-bit grid: codes 1..7
    assert torch.equal(m3.wte.weight, base.wte.weight)     # the embedding (tied head) stays float
    m4 = copy.deepcopy(base)
    assert round_weights(m4, 4) == pytest.approx(4 + 32 / GROUP)   # INT4 codes + one float32 scale per group
    assert isinstance(m4.blocks[0].attn.qkv, IntLinear)
    q = copy.deepcopy(base)
    fake_quant(q, 3)
    assert isinstance(q.blocks[0].mlp.fc, FakeQuantLinear) and q.blocks[0].mlp.fc.bits == 3
    with torch.no_grad():      # the QAT module computes with exactly the PTQ-rounded weights
        assert torch.equal(q.blocks[0].attn.qkv.fake_weight(), m3.blocks[0].attn.qkv.weight)


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("quantization")
    assert_page(lab)
    n = lab["numbers"]
    ptq, qat = n["ptq"], n["qat"]
    assert ptq["32"]["agreement"] == 1.0 and ptq["32"]["loss"] == pytest.approx(n["float"]["loss"])
    bpw = [ptq[b]["bits_per_weight"] for b in ("32", "16", "8", "4", "3")]
    assert bpw == sorted(bpw, reverse=True) and bpw[2] == pytest.approx(8 + 32 / GROUP)
    inc = {b: ptq[b]["loss"] - n["float"]["loss"] for b in ptq}
    assert inc["3"] > inc["4"] > inc["8"] and ptq["3"]["agreement"] < ptq["4"]["agreement"] < ptq["8"]["agreement"]
    for b in ("4", "3"):
        assert qat[b]["qat_gain"] == pytest.approx(qat[b]["ptq_same_training"]["loss"] - qat[b]["qat"]["loss"])
        assert qat[b]["ptq"] == ptq[b]
    assert qat["3"]["qat_gain"] > 0
    g = n["gguf"]
    sizes = [g[k]["bytes"] for k in ("f32", "f16", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 3.5 * sizes[-1]
    if n["gguf_llama_cpp"]:      # llama.cpp reading our f32 file computes our loss on the same windows
        assert g["f32"]["llama_cpp_loss"] == pytest.approx(n["ours_on_gguf_windows"]["loss"], abs=1e-3)
        assert g["q4_0"]["llama_cpp_loss"] > g["f32"]["llama_cpp_loss"]
    assert lab["record"]["insight"]["holds"]
