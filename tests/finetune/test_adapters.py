"""PEFT-format adapter files without PEFT itself: the exact file layout, a round trip into a
fresh copy of the base, adapters on some layers only, and every bad folder refused by name
before the model changes (PEFT interop itself: test_peft_parity.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.finetune import LoraConfig, LoraError, add_lora, load_adapter, lora_modules, merge_lora, save_adapter
from lmstack.finetune.adapters import base_fingerprint
from lmstack.model import ModelConfig, Transformer, get_transforms

CFG = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32)


def base(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**CFG, **kw})).eval()


def adapted(config, **kw):
    m = base(**kw)
    add_lora(m, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            for p in mod.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def test_file_layout_is_peft_s(tmp_path):
    m = adapted(LoraConfig(r=4, alpha=8, dropout=0.1, targets=["q", "v"], use_rslora=True))
    save_adapter(m, tmp_path, base_model_name_or_path="tiny-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "lmstack_adapter.json"]   # no temp files left
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
                                "target_modules", "base_model_name_or_path")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
         "use_rslora": True, "bias": "none", "target_modules": ["q_proj", "v_proj"],
         "base_model_name_or_path": "tiny-llama"}
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(t) == {f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
                      for i in (0, 1) for p in "qv" for ab in "AB"}
    lin = m.get_submodule("blocks.1.attn.qkv")
    assert torch.equal(t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"], lin.lora_B["v"])
    assert t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)  # KV heads * D
    side = json.loads((tmp_path / "lmstack_adapter.json").read_text())
    assert side["base_fingerprint"] == base_fingerprint(base()) == base_fingerprint(m)


@pytest.mark.parametrize("config", [LoraConfig(r=2, alpha=3, targets="all-linear"),
                                    LoraConfig(r=2, targets=["k", "gate", "down"], exclude=[r"blocks\.0\..*"]),
                                    LoraConfig(r=1, targets=["q", "lm_head"])])
def test_round_trip_into_a_fresh_base(tmp_path, config):
    m = adapted(config)
    x = torch.randint(0, 64, (2, 11))
    save_adapter(m, tmp_path)
    fresh = base()
    names = load_adapter(fresh, tmp_path)
    assert names == list(lora_modules(m))
    assert {n: set(s.slices) for n, s in lora_modules(fresh).items()} == \
        {n: set(s.slices) for n, s in lora_modules(m).items()}
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    assert get_transforms(fresh)[0]["kind"] == "lora"
    assert all(not p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n)
    # loading into a model that already has the same adapters overwrites them in place
    load_adapter(m, tmp_path)


def test_some_layers_only_writes_an_exact_regex(tmp_path):
    m = adapted(LoraConfig(r=2, targets=["q", "v"], exclude=["blocks.1.attn.qkv"]))
    save_adapter(m, tmp_path)
    tm = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    import re
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"]
    assert [n for n in names if re.fullmatch(tm, n)] == ["model.layers.0.self_attn.q_proj",
                                                         "model.layers.0.self_attn.v_proj"]


def test_bad_folders_are_refused_before_anything_changes(tmp_path):
    m = adapted(LoraConfig(r=2, targets=["q", "v"]))
    save_adapter(m, tmp_path / "good")

    def variant(name, config=None, tensors=None, sidecar=True):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        t = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
        save_file(tensors(t) if tensors else t, str(d / "adapter_model.safetensors"))
        if sidecar:
            (d / "lmstack_adapter.json").write_text((tmp_path / "good" / "lmstack_adapter.json").read_text())
        return d

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = [
        (tmp_path / "missing", "no adapter_config.json"),
        (variant("ia3", {"peft_type": "IA3"}), "peft_type='IA3'"),
        (variant("dora", {"use_dora": True}), "use_dora=True"),
        (variant("bias", {"bias": "all"}), "bias='all'"),
        (variant("rank", {"r": 3}, sidecar=False),
         r"lora_A of model\.layers\.0\.self_attn\.q_proj \(blocks\.0\.attn\.qkv, q\) has shape \(2, 32\), "
         r"this model needs \(3, 32\)"),
        (variant("layer9", tensors=lambda t: {**t, key.replace("layers.0", "layers.9"): t[key].clone()}, sidecar=False),
         r"module 'model\.layers\.9\.self_attn\.q_proj', which this model does not have"),
        (variant("half", tensors=lambda t: {k: v for k, v in t.items() if k != key}),
         r"q_proj \(blocks\.0\.attn\.qkv, q\) has no lora_A"),
        (variant("names", tensors=lambda t: {**t, "lora.weight": t[key].clone()}), "expected PEFT LoRA names"),
    ]
    fresh = base()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for folder, msg in cases:
        with pytest.raises(LoraError, match=msg):
            load_adapter(fresh, folder)
    # another base: the fingerprint tells it, before any shape would (here the shapes even fit)
    other = base(n_layer=3)
    with pytest.raises(LoraError, match="trained on another base model"):
        load_adapter(other, tmp_path / "good")
    assert not lora_modules(fresh) and not lora_modules(other) and get_transforms(fresh) == []
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    # a model with other adapters: refused, its adapters untouched
    m2 = adapted(LoraConfig(r=2, targets=["q"]))
    with pytest.raises(LoraError, match="already has adapters"):
        load_adapter(m2, tmp_path / "good")


def test_save_refuses_before_writing(tmp_path):
    with pytest.raises(LoraError, match="no LoRA adapters to save"):
        save_adapter(base(), tmp_path / "a")
    m = adapted(LoraConfig(r=2))
    for mod in lora_modules(m).values():
        mod.merge()
    with pytest.raises(LoraError, match="merged"):
        save_adapter(m, tmp_path / "b")
    g = adapted(LoraConfig(r=2, targets=["up"]), mlp="gelu", n_kv_head=4)
    with pytest.raises(LoraError, match="has none: .*mlp=.gelu."):
        save_adapter(g, tmp_path / "c")
    assert not any(tmp_path.iterdir())
    merge_lora(m)  # a merged-in-place model still merges (adapters are unloaded, weights kept)
    assert not lora_modules(m)


def test_the_engine_reads_adapters_without_importing_finetune():
    """Layering: infer/ (floor 2) reads PEFT folders through model/peft_format.py (floor 1); no
    module of infer/ or model/ imports lmstack.finetune (floor 3), not even lazily."""
    import ast
    from pathlib import Path
    import lmstack
    root = Path(lmstack.__file__).parent
    bad = []
    for f in [*(root / "infer").glob("*.py"), *(root / "model").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{f.name}: {n}" for n in names if n.startswith("lmstack.finetune")]
    assert not bad
