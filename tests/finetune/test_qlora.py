"""The QLoRA seam: LoRALinear over a frozen quantized base keeps the base's state-dict names,
computes dequant(W) x + scale B A x, trains only the adapters, and merge_lora requantizes
dequant(W) + scale B A and reports the logit drift it causes, measured here independently.

The base is a stand-in of our own (int8, one absmax scale per row); the real quantized
linears of model/quantized.py are tested too when that module exists."""
import pytest
import torch
from torch import nn

from lmstack.finetune import LoraConfig, LoraError, add_lora, load_adapter, lora_modules, merge_lora, save_adapter
from lmstack.model import ModelConfig, Transformer, find_linears, get_transforms, replace_linears


class Int8Linear(nn.Module):
    """W ~ codes * scale, codes int8 (out, in), scale (out, 1): a frozen quantized linear."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(w.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.base_linear_shape = tuple(w.shape)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.scale.dtype) * self.scale

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(), self.bias)

    def requantize(self, w):
        return Int8Linear(w, self.bias)


def quantized_tiny():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32,
                                qkv_bias=True)).eval()
    replace_linears(m, find_linears(m, "all-linear"), lambda lin, t: Int8Linear(lin.weight.detach(), lin.bias))
    return m


def test_adapter_over_quantized_base_keeps_names_and_computes_dequant_plus_delta():
    m = quantized_tiny()
    base_keys = set(m.state_dict())
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = m(x)
    add_lora(m, LoraConfig(r=2, alpha=4, targets=["q", "v", "up"]))
    sd = m.state_dict()
    assert base_keys <= set(sd) and sd["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert "blocks.0.attn.qkv.scale" in sd and "blocks.0.attn.qkv.bias" in sd
    assert {k for k in sd if k not in base_keys} == {f"blocks.{i}.{mod}.lora_{ab}.{r}" for i in (0, 1) for ab in "AB"
                                                    for mod, rs in (("attn.qkv", "qv"), ("mlp.fc", ["up"]))
                                                    for r in rs}
    with torch.no_grad():
        assert torch.equal(m(x), ref)                   # B = 0
    lin = m.get_submodule("blocks.0.attn.qkv")
    assert lin.quantized and lin.lora_A["q"].dtype == torch.float32
    with torch.no_grad():
        for p in lin.lora_B.values():
            p.normal_()
    h = torch.randn(4, 32)
    expect = h @ lin.base.dequantize().T + lin.bias
    for role in ("q", "v"):
        a, b = lin.slices[role]
        expect[:, a:b] += h @ lin.lora_A[role].T @ lin.lora_B[role].T * 2.0
    torch.testing.assert_close(lin(h), expect, rtol=1e-5, atol=1e-5)
    # training touches only the adapters; the int8 codes cannot even hold a gradient
    m.train()
    m(x).square().mean().backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == \
        {n for n in dict(m.named_parameters()) if "lora_" in n}
    # the base's buffers are shared, not copied: .to() reaches the base's own forward
    m.to(torch.float64)
    assert lin.base.scale.dtype == torch.float64 and lin._buffers["scale"] is lin.base.scale
    assert m(x).dtype == torch.float64
    with pytest.raises(Exception, match="quantized base"):
        lin.merge()


def test_merge_into_quantized_base_requantizes_and_reports_drift():
    m = quantized_tiny()
    add_lora(m, LoraConfig(r=2, alpha=4, targets="all-linear"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            for p in mod.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lin = m.get_submodule("blocks.1.mlp.proj")
    W = lin.base.dequantize() + lin.delta_weight("down").detach()
    probe = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        unmerged = m(probe)
    stats = merge_lora(m, probe=probe)
    new = m.get_submodule("blocks.1.mlp.proj")
    assert type(new) is Int8Linear and stats["quantized"] == stats["modules"] and len(stats["modules"]) == 8
    ref = Int8Linear(W)
    assert torch.equal(new.weight, ref.weight) and torch.equal(new.scale, ref.scale)
    with torch.no_grad():
        drift = (m(probe) - unmerged).abs().max().item()
    assert stats["max_abs_logit_drift"] == pytest.approx(drift, rel=1e-6)
    assert 0 < drift < 0.05     # int8 rounding of the merged weights moves the logits a little
    assert get_transforms(m) == [] and not any("lora" in k for k in m.state_dict())


def test_merge_without_a_requantizer_or_with_a_bad_one_changes_nothing():
    m = quantized_tiny()
    add_lora(m, LoraConfig(r=2, targets=["q"]))
    for mod in lora_modules(m).values():
        mod.base.requantize = None          # a quantized linear that cannot requantize itself
    with pytest.raises(LoraError, match=r"blocks\.0\.attn\.qkv has a quantized base .*requantize"):
        merge_lora(m)
    with pytest.raises(LoraError, match="without the base's state-dict name"):
        merge_lora(m, requantize=lambda base, w: nn.Linear(w.shape[1], w.shape[0]))
    assert len(lora_modules(m)) == 2 and get_transforms(m)[0]["kind"] == "lora"


def test_adapter_trained_on_quantized_base_loads_on_float_base(tmp_path):
    """QLoRA's usual path: train over the quantized base, serve the adapter on the float one."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32, qkv_bias=True)
    fp = Transformer(cfg).eval()
    q = Transformer(cfg).eval()
    q.load_state_dict(fp.state_dict())
    replace_linears(q, find_linears(q, "all-linear"), lambda lin, t: Int8Linear(lin.weight.detach(), lin.bias))
    add_lora(q, LoraConfig(r=2, targets=["q", "v"]))
    with torch.no_grad():
        for mod in lora_modules(q).values():
            for p in mod.lora_B.values():
                p.normal_()
    save_adapter(q, tmp_path)                 # the fingerprint sees (out, in) linears either way
    load_adapter(fp, tmp_path)
    for name, mod in lora_modules(q).items():
        for role in mod.slices:
            assert torch.equal(lora_modules(fp)[name].lora_A[role], mod.lora_A[role])



# ---- the real quantized linears (model/quantized.py, made by lmstack.quant) -----------------
REAL = {"nf4": dict(method="nf4", group_size=32), "int4-asym-g32": dict(method="rtn", bits=4, group_size=32,
                                                                        symmetric=False),
        "awq-int4": dict(method="awq", bits=4, group_size=32, calib_samples=2, calib_seq_len=16)}


@pytest.mark.parametrize("case", list(REAL))
def test_qlora_over_lmstack_quantized_linears(case, tmp_path):
    quant = pytest.importorskip("lmstack.quant")
    from lmstack.finetune.qlora import requantize_like
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32,
                                tie_embeddings=False)).eval()
    qc = quant.QuantConfig(**REAL[case])
    quant.quantize_model(m, qc, calib=torch.randint(0, 64, (64,)) if qc.method == "awq" else None)
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    add_lora(m, LoraConfig(r=2, alpha=4, targets="all-linear"))
    assert all(torch.equal(base_sd[k], v) for k, v in m.state_dict().items() if k in base_sd)
    assert set(base_sd) <= set(m.state_dict())          # packed codes and statistics keep their names
    lin = m.get_submodule("blocks.0.mlp.fc")
    assert lin.quantized and isinstance(lin.base, quant.QuantLinear)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            for p in mod.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    h = torch.randn(3, 32)
    expect = h @ lin.base.dequantize().T
    for role, (a, b) in lin.slices.items():
        expect[:, a:b] += h @ lin.lora_A[role].T @ lin.lora_B[role].T * 2.0
    torch.testing.assert_close(lin(h), expect, rtol=1e-5, atol=1e-5)
    # the run saves and reloads: the quant record rebuilds the base, then the lora record wraps it
    x = torch.randint(0, 64, (2, 10))
    m.save_pretrained(tmp_path / "run")
    assert [r["kind"] for r in get_transforms(Transformer.from_pretrained(tmp_path / "run"))] == ["quant", "lora"]
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(tmp_path / "run")(x), m(x))
    # merge: requantize(dequantize() + delta) in the base's own format, drift reported
    want = requantize_like(lin.base, lin.base.dequantize() + torch.cat([lin.delta_weight(r).detach()
                                                                       for r in ("gate", "up")]))
    with torch.no_grad():
        unmerged = m(x)
    stats = merge_lora(m, probe=x)
    new = m.get_submodule("blocks.0.mlp.fc")
    assert type(new) is type(lin.base) and all(torch.equal(a, b) for a, b in
                                               zip(new.state_dict().values(), want.state_dict().values()))
    with torch.no_grad():
        drift = (m(x) - unmerged).abs().max().item()
    assert stats["max_abs_logit_drift"] == pytest.approx(drift, rel=1e-6) and 0 < drift < 1.0
    m.save_pretrained(tmp_path / "merged")                 # only the quant record is left, and it loads
    back = Transformer.from_pretrained(tmp_path / "merged")
    assert [r["kind"] for r in get_transforms(back)] == ["quant"]
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_qlora_backward_keeps_no_float_weight_and_matches_the_dequantized_float_model():
    """A QLoRA forward saves no dequantized (out, in) weight for backward (DequantLinear
    dequantizes again there), and the adapters' gradients equal those of LoRA on a float
    model holding the dequantized weights, run by plain autograd."""
    quant = pytest.importorskip("lmstack.quant")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=32,
                      tie_embeddings=False, qkv_bias=True)
    m = Transformer(cfg)
    quant.quantize_model(m, quant.QuantConfig(method="nf4", group_size=64))
    ref = Transformer(cfg)                        # the same model with float weights = dequantize()
    with torch.no_grad():
        sd = {k: v for k, v in m.state_dict().items() if k in ref.state_dict()}
        for name in find_linears(m, "all-linear"):
            sd[name.name + ".weight"] = m.get_submodule(name.name).dequantize()
        ref.load_state_dict(sd)
    config = LoraConfig(r=4, alpha=8, targets="all-linear")
    add_lora(m, config)
    add_lora(ref, config)
    g = torch.Generator().manual_seed(1)
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                theirs[n].copy_(p)
    shapes = {tuple(t.base_linear_shape) for t in lora_modules(m).values()}
    own = {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}
    saved = []

    def pack(t):   # tensors made in the forward (not the model's own) that backward keeps
        if t.untyped_storage().data_ptr() not in own:
            saved.append(tuple(t.shape))
        return t
    x = torch.randint(0, 64, (2, 12))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(x).logsumexp(-1).mean()
    assert not shapes & set(saved), "a dequantized base weight was saved for backward"
    loss.backward()
    ref(x).logsumexp(-1).mean().backward()
    lora = [n for n, p in m.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * cfg.n_layer
    for n in lora:
        mine = m.get_parameter(n).grad
        assert mine.abs().max() > 0
        torch.testing.assert_close(mine, theirs[n].grad, rtol=1e-5, atol=1e-6)
