"""lmstack.finetune LoRA without PEFT: config checks, freezing, merged weights equal the hand-computed
W + scale * B @ A, merged logits equal unmerged, a merged model saves as a plain one, and bad input
changes nothing."""
import pytest
import torch
from torch import nn

from lmstack.finetune import LoraConfig, LoraError, add_lora, lora_modules, merge_lora
from lmstack.model import LoRALinear, ModelConfig, Transformer, get_transforms


def tiny(**kw):
    base = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**base)).eval()


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for p in m.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_config_checks_and_scale():
    assert LoraConfig(r=16, alpha=32).scale == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scale == 8.0       # alpha / sqrt(r)
    assert LoraConfig(targets="all-linear").targets == ("all-linear",)
    assert LoraConfig(targets=["q", "v"]).targets == ("q", "v")
    for bad, msg in ((dict(r=0), "r=0"), (dict(r=2.0), "r=2.0"), (dict(alpha=-1), "alpha=-1"),
                     (dict(dropout=1.0), "dropout=1.0"), (dict(targets=[]), "targets is empty"),
                     (dict(targets=["q", ""]), "targets"), (dict(use_rslora="yes"), "use_rslora")):
        with pytest.raises(LoraError, match=msg):
            LoraConfig(**bad)


def test_add_lora_freezes_base_and_targets_slices():
    m = tiny()
    names = add_lora(m, LoraConfig(r=4, alpha=8, targets=["q", "v"]))
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.lora_{ab}.{r}" for i in (0, 1) for ab in "AB" for r in "qv"}
    assert get_transforms(m)[0]["kind"] == "lora" and get_transforms(m)[0]["targets"] == ["q", "v"]
    # all-linear: a fused linear gets one adapter per slice, as PEFT adapts q_proj, k_proj, v_proj
    m2 = tiny()
    add_lora(m2, LoraConfig(r=2, targets="all-linear"))
    assert set(m2.get_submodule("blocks.0.attn.qkv").slices) == {"q", "k", "v"}
    assert set(m2.get_submodule("blocks.0.mlp.fc").slices) == {"gate", "up"}
    assert "lm_head" not in lora_modules(m2)


def test_bad_input_changes_nothing():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LoraError, match=r"rank r=40 is larger than blocks\.0\.attn\.qkv"):
        add_lora(m, LoraConfig(r=40, targets=["k"]))      # k: 16 rows
    with pytest.raises(LoraError, match="'attention' matches no linear"):
        add_lora(m, LoraConfig(targets=["q", "attention"]))
    with pytest.raises(LoraError, match="no LoRA adapters to merge"):
        merge_lora(m)
    assert not lora_modules(m) and get_transforms(m) == []
    assert all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    add_lora(m, LoraConfig(r=2))
    with pytest.raises(LoraError, match="already has LoRA adapters"):
        add_lora(m, LoraConfig(r=2, targets=["o"]))


def test_merge_equals_hand_computed_weights_and_logits(tmp_path):
    m = tiny()
    x = torch.randint(0, 64, (2, 12))
    W0 = m.get_submodule("blocks.1.attn.qkv").weight.detach().clone()
    add_lora(m, LoraConfig(r=3, alpha=5, targets=["q", "v", "down"], use_rslora=True))
    randomize_B(m)
    lora = m.get_submodule("blocks.1.attn.qkv")
    scale = 5 / 3 ** 0.5
    expect = W0.clone()
    for role in ("q", "v"):
        a, b = lora.slices[role]
        expect[a:b] += lora.lora_B[role].detach() @ lora.lora_A[role].detach() * scale
    with torch.no_grad():
        unmerged = m(x)
    stats = merge_lora(m)
    assert stats["modules"] == ["blocks.0.attn.qkv", "blocks.0.mlp.proj", "blocks.1.attn.qkv", "blocks.1.mlp.proj"]
    assert stats["quantized"] == [] and stats["max_abs_logit_drift"] <= 1e-5 and stats["probe_tokens"] == 32
    assert not lora_modules(m) and type(m.get_submodule("blocks.1.attn.qkv")) is nn.Linear
    torch.testing.assert_close(m.get_submodule("blocks.1.attn.qkv").weight, expect, rtol=0, atol=1e-6)
    with torch.no_grad():
        merged = m(x)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert get_transforms(m) == []          # a merged model is a plain model
    m.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path)
    assert not any("lora" in k for k in back.state_dict()) and get_transforms(back) == []
    with torch.no_grad():
        assert torch.equal(back(x), merged)


def test_in_place_merge_unmerge_and_saving_while_merged(tmp_path):
    m = tiny()
    add_lora(m, LoraConfig(r=2, alpha=4, targets="all-linear"))
    randomize_B(m)
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        ref = m(x)
        w = m.get_submodule("blocks.0.mlp.fc").weight.clone()
        for mod in lora_modules(m).values():
            mod.merge()
        assert (m(x) - ref).abs().max().item() <= 1e-5
        assert not torch.equal(m.get_submodule("blocks.0.mlp.fc").weight, w)
        # the saved form is (base, adapters) even while merged, so a reload is not merged twice
        m.save_pretrained(tmp_path)
        back = Transformer.from_pretrained(tmp_path)
        assert (back(x) - ref).abs().max().item() <= 1e-5
        for mod in lora_modules(m).values():
            mod.unmerge()
        torch.testing.assert_close(m.get_submodule("blocks.0.mlp.fc").weight, w, rtol=0, atol=1e-6)


def test_only_adapters_get_gradients_and_dropout_applies_to_adapter_input():
    m = tiny()
    add_lora(m, LoraConfig(r=2, targets=["o", "up"], dropout=0.5))
    randomize_B(m)
    m.train()
    out = m(torch.randint(0, 64, (2, 6)))
    out.square().mean().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_" in n)
    # dropout acts on the adapter path only: zero adapters => identical outputs in train mode
    lin = m.get_submodule("blocks.0.attn.proj")
    assert isinstance(lin, LoRALinear) and lin.drop.p == 0.5
    h = torch.randn(3, 32)
    with torch.no_grad():
        for p in lin.lora_B.values():
            p.zero_()
        assert torch.equal(lin(h), nn.functional.linear(h, lin.weight))


def test_fp32_adapters_over_a_bf16_base():
    """QLoRA-style mixed precision: the adapter path runs in the adapters' dtype, the sum in the base's."""
    m = tiny().to(torch.bfloat16)
    add_lora(m, LoraConfig(r=2, alpha=4, targets=["q"]))
    lin = m.get_submodule("blocks.0.attn.qkv")
    lin.lora_A.float()
    lin.lora_B.float()
    randomize_B(m)
    h = torch.randn(3, 32).to(torch.bfloat16)
    a, b = lin.slices["q"]
    expect = nn.functional.linear(h, lin.weight)
    expect[:, a:b] += (h.float() @ lin.lora_A["q"].T @ lin.lora_B["q"].T * 2.0).to(torch.bfloat16)
    with torch.no_grad():
        out = lin(h)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expect)
