"""The linear-replacement seam and LoRA at floor 1: targets resolve to the right rows, a
replacement keeps the base's state-dict names, and a LoRA on fused q/v equals two separate
low-rank updates of those rows computed by hand."""
import pytest
import torch
from torch import nn

from lmstack.model import LoRALinear, ModelConfig, Transformer, find_linears, inject_lora, linear_roles, replace_linears
from lmstack.model.replace import SeamError


def tiny(**kw):
    base = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32)
    base.update(kw)
    return ModelConfig(**base)


def test_roles_of_fused_projections():
    m = Transformer(tiny())
    cfg = m.config
    H, KV, D, I = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
    roles = linear_roles(m)
    assert roles["blocks.1.attn.qkv"] == {"q": (0, H * D), "k": (H * D, (H + KV) * D), "v": ((H + KV) * D, (H + 2 * KV) * D)}
    assert roles["blocks.0.mlp.fc"] == {"gate": (0, I), "up": (I, 2 * I)}
    assert roles["blocks.0.attn.proj"] == {"o": (0, cfg.n_embd)} and roles["blocks.0.mlp.proj"] == {"down": (0, cfg.n_embd)}
    assert roles["lm_head"] == {"lm_head": (0, cfg.vocab_size)}
    # every slice of a fused linear tiles its rows exactly
    for name, sl in roles.items():
        spans = sorted(sl.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] == m.get_submodule(name).weight.shape[0]


def test_target_resolution():
    m = Transformer(tiny())
    qv = find_linears(m, ["q_proj", "v"])  # HF aliases too
    assert [t.name for t in qv] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert set(qv[0].slices) == {"q", "v"}
    whole = find_linears(m, ["q", "k", "v"])
    assert whole[0].slices is None  # every slice selected = the whole linear
    allin = [t.name for t in find_linears(m, "all-linear")]
    assert "lm_head" not in allin and len(allin) == 2 * 4  # qkv, proj, fc, proj per block
    assert [t.name for t in find_linears(m, [r"blocks\.1\..*proj"])] == ["blocks.1.attn.proj", "blocks.1.mlp.proj"]
    assert [t.name for t in find_linears(m, "all-linear", exclude=["blocks.0.mlp.fc"])][:3] == \
        ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.proj"]
    gelu = Transformer(tiny(mlp="gelu"))
    assert find_linears(gelu, ["up"])[0].slices is None  # a gelu fc is one "up" matrix
    with pytest.raises(SeamError, match="matches no linear.*gate"):
        find_linears(m, ["q_prj"])
    with pytest.raises(SeamError, match="regular expression"):
        find_linears(m, ["blocks.(0"])


def test_replacement_must_keep_state_dict_names():
    m = Transformer(tiny())
    before = {k: v.clone() for k, v in m.state_dict().items()}

    class Bad(nn.Module):  # renames the weight: a base checkpoint would no longer load
        base_linear_shape = (1, 1)

        def __init__(self, lin):
            super().__init__()
            self.w = lin.weight

    with pytest.raises(SeamError, match="drops the state-dict name"):
        replace_linears(m, find_linears(m, ["q"]), lambda lin, t: Bad(lin))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched
    assert all(type(m.get_submodule(t.name)) is nn.Linear for t in find_linears(m, ["q"]))


def test_lora_on_fused_qv_equals_separate_adapters():
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = m(x)
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    names = inject_lora(m, r=3, alpha=6, targets=["q", "v"])
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with torch.no_grad():
        assert torch.equal(m(x), ref)  # B = 0: a fresh adapter changes nothing
    # the base's names survive, so a base checkpoint still loads (strict) into the LoRA model
    sd = m.state_dict()
    assert set(base_sd) <= set(sd)
    assert {k for k in sd if "lora" in k} == {f"blocks.{i}.attn.qkv.lora_{ab}.{r}" for i in (0, 1)
                                             for ab in "AB" for r in "qv"}
    lora = m.get_submodule("blocks.0.attn.qkv")
    for p in lora.lora_B.values():
        nn.init.normal_(p)
    h = torch.randn(5, 32)
    W = base_sd["blocks.0.attn.qkv.weight"]
    q_rows, v_rows = lora.slices["q"], lora.slices["v"]
    expect = h @ W.T
    s = 6 / 3
    expect[:, slice(*q_rows)] += h @ lora.lora_A["q"].T @ lora.lora_B["q"].T * s
    expect[:, slice(*v_rows)] += h @ lora.lora_A["v"].T @ lora.lora_B["v"].T * s
    with torch.no_grad():
        torch.testing.assert_close(lora(h), expect, rtol=1e-5, atol=1e-5)
        unmerged = m(x)
        lora.merge()
        m.get_submodule("blocks.1.attn.qkv").merge()
        torch.testing.assert_close(m(x), unmerged, rtol=0, atol=1e-5)
        lora.unmerge()
        torch.testing.assert_close(lora.weight, W, rtol=0, atol=1e-6)


def test_lora_rslora_scale_and_gradients_reach_adapters_only():
    m = Transformer(tiny())
    inject_lora(m, r=4, alpha=8, targets="all-linear", rslora=True)
    lin = m.get_submodule("blocks.0.mlp.proj")
    assert isinstance(lin, LoRALinear) and lin.scale == pytest.approx(8 / 2)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    for p in lin.lora_B.values():
        nn.init.normal_(p)
    m(torch.randint(0, 64, (2, 5))).sum().backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(n.endswith("lora_A.o") or n.endswith("lora_A.down") for n in grads)


def test_lora_bad_arguments_change_nothing():
    m = Transformer(tiny())
    with pytest.raises(SeamError, match="rank r=64 is larger"):
        inject_lora(m, r=64, targets=["k"])
    with pytest.raises(SeamError, match="positive int"):
        inject_lora(m, r=0)
    with pytest.raises(SeamError, match="matches no linear"):
        inject_lora(m, targets=["attention"])
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert getattr(m, "transforms", []) == []
