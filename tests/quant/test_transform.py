"""The "quant" transform: quantize_model records itself, save_pretrained / from_pretrained /
LLM(dir) rebuild the same quantized model (identical logits), GPTQ/AWQ calibrate block by
block on quantized inputs, and every bad setting is a clear error."""
import json

import pytest
import torch
from torch import nn

from lmstack.model import IntLinear, ModelConfig, NF4Linear, Transformer, get_transforms
from lmstack.quant import QuantConfig, QuantError, quantize_model
from lmstack.quant.calib import run_sequential

CFG = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=64)
CALIB = torch.randint(0, 64, (1024,), generator=torch.Generator().manual_seed(1))
SMALL = dict(calib_samples=4, calib_seq_len=32, calib_batch_size=2)


def base_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw})).eval()


def greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("qc", [QuantConfig("rtn", 8), QuantConfig("rtn", 4, 32, symmetric=False),
                                QuantConfig("nf4"), QuantConfig("gptq", 4, 32, **SMALL),
                                QuantConfig("awq", 4, 64, **SMALL)], ids=lambda q: f"{q.method}{q.bits}")
def test_save_load_and_engine_rebuild_the_quantized_model(tmp_path, qc):
    m = base_model()
    names = quantize_model(m, qc, calib=CALIB)
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    cls = NF4Linear if qc.method == "nf4" else IntLinear
    assert all(isinstance(m.get_submodule(n), cls) for n in names) and type(m.lm_head) is nn.Linear
    m.save_pretrained(tmp_path)
    rec = json.loads((tmp_path / "config.json").read_text())["transforms"]
    assert rec == [{"kind": "quant", "method": qc.method, "bits": qc.bits, "group_size": qc.group_size,
                    "symmetric": qc.symmetric, "targets": ["all-linear"], "exclude": [], "modules": names}]
    back = Transformer.from_pretrained(tmp_path)
    assert get_transforms(back) == rec
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    from lmstack.infer import LLM, SamplingParams
    out = LLM(str(tmp_path), kv_cache_tokens=256, device="cpu").generate(
        [[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0))
    assert out[0].outputs[0].token_ids == greedy(m, [1, 2, 3], 6)


def test_quantized_logits_stay_close_and_int8_closer_than_int4():
    m, x = base_model(), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = m(x)
    errs = {}
    for qc in (QuantConfig("rtn", 8), QuantConfig("rtn", 4, 32)):
        q = base_model()
        quantize_model(q, qc)
        with torch.no_grad():
            errs[qc.bits] = (q(x) - ref).pow(2).mean().item() / ref.pow(2).mean().item()
    assert errs[8] < errs[4] / 50 and errs[4] < 0.05


def test_gptq_model_error_is_lower_than_rtn_on_calibration_text():
    x = CALIB[:4 * 32].view(4, 32)
    ref = base_model()
    with torch.no_grad():
        target = ref(x)
    errs = {}
    for method in ("rtn", "gptq", "awq"):
        q = base_model()
        quantize_model(q, QuantConfig(method, 4, 32, **SMALL), calib=CALIB)
        with torch.no_grad():
            errs[method] = (q(x) - target).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"] and errs["awq"] < errs["rtn"]


def test_blocks_are_calibrated_on_the_outputs_of_quantized_blocks():
    # the inputs recorded for block 1 must be those a plain forward gives once block 0 is replaced
    m = base_model()
    windows = CALIB[:64].view(2, 32)
    seen = {}

    class Keep:
        def __init__(self):
            self.xs = []

        def add(self, x):
            self.xs.append(x)

    def quantize_one(name, lin, stat):
        seen[name] = torch.cat(stat.xs)
        new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        nn.init.normal_(new.weight, std=0.5)       # a large, visible change
        return new

    names = ["blocks.0.mlp.proj", "blocks.1.attn.qkv"]
    run_sequential(m, names, windows, 1, Keep, quantize_one)
    expect = []
    h = m.blocks[1].attn.qkv.register_forward_hook(lambda mod, inp, out: expect.append(inp[0]))
    with torch.no_grad():
        for w in windows.split(1):
            m(w)
    h.remove()
    assert torch.allclose(seen["blocks.1.attn.qkv"], torch.cat(expect), atol=1e-6)


def test_a_failing_quantizer_leaves_the_model_unchanged():
    m = base_model()
    before = {n: mod for n, mod in m.named_modules()}

    def boom(name, lin, stat):
        if name.startswith("blocks.1"):
            raise RuntimeError("boom")
        return nn.Linear(lin.in_features, lin.out_features)
    with pytest.raises(RuntimeError, match="boom"):
        run_sequential(m, ["blocks.0.attn.qkv", "blocks.1.attn.qkv"], CALIB[:64].view(2, 32), 2,
                       lambda: type("S", (), {"add": lambda self, x: None})(), boom)
    assert all(m.get_submodule(n) is mod for n, mod in before.items())


def test_bad_settings_are_clear_errors():
    m = base_model()
    with pytest.raises(QuantError, match="calibration data has 100 tokens but calib_samples x calib_seq_len = "
                                         "4 x 32 = 128"):
        quantize_model(m, QuantConfig("gptq", 4, **SMALL), calib=CALIB[:100])
    with pytest.raises(QuantError, match="need calibration data"):
        quantize_model(m, QuantConfig("awq", 4, **SMALL))
    byte_tok = type("ByteTok", (), {"encode": staticmethod(lambda text: [b % 64 for b in text.encode()])})
    with pytest.raises(QuantError, match="has 30 tokens but .* = 128 are needed"):
        quantize_model(m, QuantConfig("awq", 4, **SMALL), calib="abc" * 10, tokenizer=byte_tok)
    with pytest.raises(QuantError, match="calib is text: pass tokenizer="):
        quantize_model(m, QuantConfig("awq", 4, **SMALL), calib="some text")
    with pytest.raises(QuantError, match="tie_embeddings=True"):
        quantize_model(m, QuantConfig("rtn", 8, targets=("all-linear", "lm_head")))
    with pytest.raises(QuantError, match="fused linear blocks.0.attn.qkv"):
        quantize_model(m, QuantConfig("rtn", 8, targets=("q", "v")))
    odd = base_model(n_embd=48, n_head=4, n_kv_head=2)   # in_features 48: groups of 32 do not fit
    with pytest.raises(QuantError, match="blocks.0.attn.qkv: group_size=32 does not divide in_features=48"):
        quantize_model(odd, QuantConfig("rtn", 4, 32))
    assert get_transforms(odd) == [] and type(odd.blocks[0].attn.qkv) is nn.Linear   # nothing changed
    quantize_model(m, QuantConfig("rtn", 4, 64))
    with pytest.raises(QuantError, match="already quantized.*method='rtn', bits=4"):
        quantize_model(m, QuantConfig("nf4"))
    with pytest.raises(QuantError, match="bits=8 with method='nf4'"):
        QuantConfig("nf4", bits=8)
    with pytest.raises(QuantError, match="group_size=48"):
        QuantConfig("rtn", 4, 48)
    with pytest.raises(QuantError, match="method='fp8'"):
        QuantConfig("fp8")


def test_untied_lm_head_can_be_quantized_and_reloaded(tmp_path):
    m = base_model(tie_embeddings=False)
    names = quantize_model(m, QuantConfig("gptq", 8, targets=("all-linear", "lm_head"), **SMALL), calib=CALIB)
    assert names[-1] == "lm_head" and isinstance(m.lm_head, IntLinear)
    m.save_pretrained(tmp_path)
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(tmp_path)(x), m(x))
