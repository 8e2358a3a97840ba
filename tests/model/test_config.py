"""ModelConfig: derived sizes (head_dim, n_kv_head, intermediate_size) computed from the other
fields unless given, recomputed by replace(), kept derived through to_dict/from_dict and disk;
errors at the door that name the field and the value."""
import json

import pytest

from lmstack.model import ConfigError, ModelConfig, Transformer


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=64)
    base.update(kw)
    return ModelConfig(**base)


def test_replace_recomputes_derived_sizes():
    tiny = ModelConfig.preset("tiny")                         # n_embd 256, 4 heads, swiglu
    assert (tiny.head_dim, tiny.n_kv_head, tiny.intermediate_size) == (64, 4, 704)
    eight = tiny.replace(n_head=8)
    assert (eight.head_dim, eight.n_kv_head) == (32, 8)       # 8 * 32 = n_embd, and still MHA
    assert eight.n_head * eight.head_dim == eight.n_embd
    wide = tiny.replace(n_embd=512)
    assert (wide.head_dim, wide.intermediate_size) == (128, 1408)   # 64 * ceil(8 * 512 / 3 / 64)
    assert tiny.replace(mlp="gelu").intermediate_size == 4 * 256
    gqa = tiny.replace(n_head=8, n_kv_head=2)                  # given in this call: kept
    assert (gqa.head_dim, gqa.n_kv_head) == (32, 2)
    assert gqa.derived_fields == {"head_dim", "intermediate_size"}
    assert gqa.replace(n_head=16).n_kv_head == 2              # ... and stays given afterwards


def test_explicit_sizes_are_kept():
    llama = ModelConfig.preset("llama-tiny")                  # n_kv_head=2, intermediate_size=688 given
    four = llama.replace(n_head=4)
    assert (four.head_dim, four.n_kv_head, four.intermediate_size) == (64, 2, 688)
    qwen3_like = ModelConfig(n_embd=64, n_head=4, head_dim=24)        # head_dim != n_embd / n_head on purpose
    assert qwen3_like.replace(n_head=2).head_dim == 24
    assert qwen3_like.derived_fields == {"n_kv_head", "intermediate_size"}


def test_to_dict_from_dict_round_trip_keeps_what_was_derived():
    cfg = ModelConfig(vocab_size=100, n_embd=96, n_head=6, n_kv_head=2, rope_scaling={"type": "linear", "factor": 2.0})
    d = cfg.to_dict()
    assert d["head_dim"] is None and d["intermediate_size"] is None and d["n_kv_head"] == 2
    back = ModelConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.derived_fields == cfg.derived_fields == {"head_dim", "intermediate_size"}
    assert back.replace(n_head=4).head_dim == 24 and back.replace(n_head=4).n_kv_head == 2
    d["rope_scaling"]["factor"] = 9.0                         # a copy, not the config's own dict
    assert cfg.rope_scaling["factor"] == 2.0


def test_saved_config_keeps_what_was_derived(tmp_path):
    m = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=4, n_embd=32, context_length=16))
    m.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["head_dim"] is None and raw["n_kv_head"] is None
    back = Transformer.from_pretrained(tmp_path).config
    assert back == m.config and back.derived_fields == {"head_dim", "n_kv_head", "intermediate_size"}
    assert back.replace(n_head=2).head_dim == 16


def test_preset_overrides_recompute_too():
    assert ModelConfig.preset("tiny", n_head=8).head_dim == 32
    with pytest.raises(ValueError, match="n_embd=256 is not divisible by n_head=3"):
        ModelConfig.preset("tiny").replace(n_head=3)          # recomputed, so checked again


@pytest.mark.parametrize("kw,needle", [
    (dict(n_embd=65), "n_embd=65 is not divisible by n_head=4"),
    (dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(sliding_window=100), "sliding_window=100"),
    (dict(pos_emb="rotary"), "pos_emb='rotary' is not valid; choose one of"),
    (dict(mlp="geglu"), "mlp='geglu'"),
    (dict(n_expert=1), "n_expert=1"),
    (dict(n_expert=4, n_expert_per_token=5), "n_expert_per_token=5"),
    (dict(rotary_fraction=0.1), "rotary_fraction=0.1"),
    (dict(pos_emb="learned", rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
])
def test_config_errors_name_field_and_value(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        tiny(**kw)


def test_from_dict_and_preset_reject_unknown():
    with pytest.raises(ConfigError, match="unknown ModelConfig field.*block_size.*valid fields"):
        ModelConfig.from_dict({**tiny().to_dict(), "block_size": 8})
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'; valid presets"):
        ModelConfig.preset("gpt5")
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()
