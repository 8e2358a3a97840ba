"""save_pretrained / from_pretrained: exact round trip, safetensors only, clear errors on mismatch,
and a config's declared sizes checked against the weights' headers before anything is built."""
import json

import pytest
import torch

from lmstack.model import ModelConfig, Transformer, weights_io
from lmstack.model.checkpoint import SizeError, check_declared_sizes, state_for_saving
from lmstack.model.hf import export_hf
from lmstack.model.hf_names import stored_tensors
from lmstack.utils import LmstackError


def tiny(**kw):
    base = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, n_expert=2, n_expert_per_token=1),
                                dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)])
def test_round_trip_is_exact(tmp_path, kw):
    torch.manual_seed(0)
    m = Transformer(tiny(**kw)).eval()
    (tmp_path / "tokenizer.json").write_text("{}")  # other run-dir files survive
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["lmstack_format"] == 1 and cfg["n_layer"] == 2 and "model_type" not in cfg
    back = Transformer.from_pretrained(tmp_path)
    assert back.config == m.config
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    if m.config.tie_embeddings:
        assert back.lm_head.weight is back.wte.weight


def test_dtype_and_device_arguments(tmp_path):
    m = Transformer(tiny())
    m.to(torch.bfloat16).save_pretrained(tmp_path)
    assert next(Transformer.from_pretrained(tmp_path).parameters()).dtype == torch.bfloat16  # as stored
    assert next(Transformer.from_pretrained(tmp_path, dtype="float32").parameters()).dtype == torch.float32
    assert next(Transformer.from_pretrained(tmp_path, device="cpu").parameters()).device.type == "cpu"


def test_checkpoint_from_other_config_names_first_mismatch(tmp_path):
    Transformer(tiny(n_embd=64)).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["n_embd"] = 32  # the config no longer describes the weights
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmstackError, match=r"model.safetensors: tensor 'wte.weight' has shape \(64, 64\), but "
                                           r".*config.json declares n_embd=32, which needs \(64, 32\)"):
        Transformer.from_pretrained(tmp_path)
    raw["n_embd"], raw["n_layer"] = 64, 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmstackError, match=r"config.json declares n_layer=3 but .*model.safetensors holds 2 layers"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_folders_and_pickles_are_refused(tmp_path):
    with pytest.raises(LmstackError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LmstackError, match="neither an lmstack config"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                                                      "intermediate_size": 64, "num_hidden_layers": 1,
                                                      "num_attention_heads": 4}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LmstackError, match="never unpickles"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))   # (bert is supported since issue 16)
    with pytest.raises(LmstackError, match="model_type 'falcon' is not supported"):
        Transformer.from_pretrained(tmp_path)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    with pytest.raises(LmstackError, match="needs mask='causal'"):
        export_hf(Transformer(tiny(mask="bidirectional")), tmp_path)
    with pytest.raises(LmstackError, match="needs pos_emb='rope'"):
        export_hf(Transformer(tiny(pos_emb="alibi")), tmp_path)


# ---- declared sizes are checked against the weights before anything is built ----------------
def _never_built(monkeypatch):
    def boom(self, cfg):
        raise AssertionError(f"Transformer built for {cfg}")
    monkeypatch.setattr(Transformer, "__init__", boom)


def _rewrite(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("kw,changes,needle", [
    (dict(), dict(n_layer=10**6), r"config.json declares n_layer=1000000 but .*model.safetensors holds 2 layers"),
    (dict(), dict(vocab_size=10**12), r"model.safetensors: tensor 'wte.weight' has shape \(64, 32\), but .*config.json "
                                     r"declares vocab_size=1000000000000, which needs \(1000000000000, 32\)"),
    (dict(pos_emb="learned"), dict(context_length=10**9),
     r"tensor 'wpe.weight' has shape \(32, 32\), but .* declares context_length=1000000000, which needs"),
    # head_dim is derived, so it follows the new head count: q|k|v rows (8 + 2*2) * 4 = 48, not 64
    (dict(), dict(n_head=8), r"'blocks.0.attn.qkv.weight' has shape \(64, 32\), but .* declares n_head=8, "
                             r"n_kv_head=2, head_dim=4, which needs \(48, 32\)"),
    (dict(n_expert=4, n_expert_per_token=2), dict(n_expert=10**6, n_expert_per_token=2),
     r"'blocks.0.mlp.router.weight' has shape \(4, 32\), but .* declares n_expert=1000000"),
    (dict(), dict(tie_embeddings=False),
     r"has no tensor 'lm_head.weight' that .*config.json implies \(tie_embeddings=False\)"),
])
def test_declared_sizes_checked_before_building(tmp_path, monkeypatch, kw, changes, needle):
    Transformer(tiny(**kw)).save_pretrained(tmp_path)
    _rewrite(tmp_path, **changes)
    _never_built(monkeypatch)
    with pytest.raises(SizeError, match=needle):
        Transformer.from_pretrained(tmp_path)


def test_memory_checked_before_building(tmp_path, monkeypatch):
    m = Transformer(tiny(tie_embeddings=False))
    m.save_pretrained(tmp_path)
    n = m.num_params()                               # all float32: file bytes = 4 * n; model built in float32
    monkeypatch.setattr(weights_io, "available_memory", lambda: 8 * n - 1)
    _never_built(monkeypatch)
    with pytest.raises(LmstackError, match=f"\\({n:,} parameters: {4 * n:,} bytes of weights \\+ {4 * n:,} bytes "
                                           f"for the model\\) needs about .* of memory but only"):
        Transformer.from_pretrained(tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(weights_io, "available_memory", lambda: 8 * n)
    assert Transformer.from_pretrained(tmp_path).num_params() == n       # exactly enough: loads


def _hf_folder(path, **kw):
    torch.manual_seed(0)
    m = Transformer(tiny(tie_embeddings=False, **kw)).eval()
    export_hf(m, path)
    return m


def test_hf_folder_sizes_named_in_hf_fields(tmp_path, monkeypatch):
    _hf_folder(tmp_path)
    _never_built(monkeypatch)
    _rewrite(tmp_path, hidden_size=10**6)
    with pytest.raises(SizeError, match=r"tensor 'model.embed_tokens.weight' has shape \(64, 32\), but .*config.json "
                                        r"declares hidden_size=1000000, which needs \(64, 1000000\)"):
        Transformer.from_pretrained(tmp_path)
    _rewrite(tmp_path, hidden_size=32, num_hidden_layers=10**6)
    with pytest.raises(SizeError, match=r"declares num_hidden_layers=1000000 but .* holds 2 layers \(model.layers.N."):
        Transformer.from_pretrained(tmp_path)
    _rewrite(tmp_path, num_hidden_layers=2, intermediate_size=10**9)
    with pytest.raises(SizeError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 32\), but .* "
                                        r"declares intermediate_size=1000000000"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_hf_config_missing_field_is_named(tmp_path, field):
    _hf_folder(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw[field]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmstackError, match=f"config.json: the llama config has no '{field}'"):
        Transformer.from_pretrained(tmp_path)
    raw[field] = "32"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmstackError, match=f"config.json: llama config field {field}='32' must be a positive int"):
        Transformer.from_pretrained(tmp_path)


def _shard(folder, split_at: int):
    """Split an exported model.safetensors into two shards + index, as transformers does."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:split_at],
              "model-00002-of-00002.safetensors": names[split_at:]}
    for f, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, str(folder / f))
    wmap = {n: f for f, ns in shards.items() for n in ns}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return wmap


def test_sharded_hf_folder(tmp_path, monkeypatch):
    m = _hf_folder(tmp_path, n_kv_head=4, qkv_bias=True)                 # a qwen2
    wmap = _shard(tmp_path, 7)
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(tmp_path)(x), m(x))
    _rewrite(tmp_path, vocab_size=10**12)
    with pytest.raises(SizeError, match=r"the 2 shards in .*: tensor 'model.embed_tokens.weight' has shape "
                                        r"\(64, 32\), but .* declares vocab_size=1000000000000"):
        Transformer.from_pretrained(tmp_path)
    _rewrite(tmp_path, vocab_size=64)
    (tmp_path.parent / "stolen.safetensors").write_bytes((tmp_path / "model-00001-of-00002.safetensors").read_bytes())
    for bad in ("../stolen.safetensors", str(tmp_path.parent / "stolen.safetensors")):
        index = {"weight_map": {**wmap, next(iter(wmap)): bad}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(LmstackError, match="outside the model folder"):
            Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, n_expert=2, n_expert_per_token=1, bias=True),
                                dict(pos_emb="learned", norm="layernorm", mlp="gelu", qkv_bias=True, qk_norm=True),
                                dict(norm_placement="post", mlp="relu", pos_emb="alibi", n_kv_head=1)])
def test_stored_tensors_table_equals_model(kw):
    """The name table states our shapes from the config; it must equal what the model saves."""
    m = Transformer(tiny(**kw))
    saved = {k: tuple(v.shape) for k, v in state_for_saving(m).items()}
    table = list(stored_tensors(m.config))
    assert [(e.ours, e.shape) for e in table] == list(saved.items())          # same names, shapes and order
    assert check_declared_sizes(m.config, saved, None, "w") == m.num_params()


def test_transformed_checkpoint_is_checked_too(tmp_path, monkeypatch):
    from lmstack.model import inject_lora
    m = Transformer(tiny())
    inject_lora(m, r=2, targets=["q", "v"])
    m.save_pretrained(tmp_path)
    assert "lora_A" in str(Transformer.from_pretrained(tmp_path).state_dict().keys())
    _rewrite(tmp_path, vocab_size=10**12)
    _never_built(monkeypatch)
    with pytest.raises(SizeError, match=r"'wte.weight' has shape \(64, 32\), but .* declares vocab_size=1000000000000"):
        Transformer.from_pretrained(tmp_path)


def test_gpt2_names_without_transformer_prefix(tmp_path):
    """The original GPT-2 files name tensors "h.0.attn.c_attn.weight" (no "transformer.") and
    carry attention-mask buffers ("h.0.attn.bias"); both load."""
    from safetensors.torch import load_file, save_file
    m = _hf_folder(tmp_path, pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True, n_kv_head=4)
    t = load_file(str(tmp_path / "model.safetensors"))
    t = {k.removeprefix("transformer."): v for k, v in t.items()} | {"h.0.attn.bias": torch.ones(1, 1, 32, 32)}
    save_file(t, str(tmp_path / "model.safetensors"))
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(tmp_path)(x), m(x))
