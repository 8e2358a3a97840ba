"""save_pretrained / from_pretrained: exact round trip, safetensors only, clear errors on mismatch."""
import json

import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf import export_hf
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
    with pytest.raises(LmstackError, match=r"tensor 'wte.weight' has shape \(64, 64\) but the config gives \(64, 32\)"):
        Transformer.from_pretrained(tmp_path)
    raw["n_embd"], raw["n_layer"] = 64, 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmstackError, match="no tensor 'blocks.2.attn_norm.weight'"):
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
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LmstackError, match="model_type 'bert' is not supported"):
        Transformer.from_pretrained(tmp_path)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    with pytest.raises(LmstackError, match="needs mask='causal'"):
        export_hf(Transformer(tiny(mask="bidirectional")), tmp_path)
    with pytest.raises(LmstackError, match="needs pos_emb='rope'"):
        export_hf(Transformer(tiny(pos_emb="alibi")), tmp_path)
