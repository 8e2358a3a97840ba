"""Transforms recorded in config.json: a transformed model saves, reloads (from_pretrained and
LLM) into the same structure with the same logits; a record that cannot be rebuilt is a
clear error."""
import json

import pytest
import torch
from torch import nn

from lmstack.model import LoRALinear, ModelConfig, Transformer, get_transforms, inject_lora
from lmstack.model.transforms import TransformError, check_record
from lmstack.utils import LmstackError


def lora_model(seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32))
    inject_lora(m, r=2, alpha=4, targets=["q", "v", "down"])
    for n, p in m.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    return m.eval()


def test_round_trip_rebuilds_the_transform(tmp_path):
    m = lora_model()
    m.save_pretrained(tmp_path)
    rec = json.loads((tmp_path / "config.json").read_text())["transforms"]
    assert rec == [{"kind": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "rslora": False,
                    "targets": ["q", "v", "down"], "exclude": [],
                    "modules": ["blocks.0.attn.qkv", "blocks.0.mlp.proj", "blocks.1.attn.qkv", "blocks.1.mlp.proj"]}]
    back = Transformer.from_pretrained(tmp_path)
    assert isinstance(back.get_submodule("blocks.1.mlp.proj"), LoRALinear)
    assert get_transforms(back) == rec
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    # and the engine loads the run like any other: greedy output of LLM(dir) = the model's own argmax loop
    from lmstack.infer import LLM, SamplingParams
    out = LLM(str(tmp_path), kv_cache_tokens=256, device="cpu").generate([[1, 2, 3]],
                                                                          SamplingParams(max_tokens=6, temperature=0))
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert out[0].outputs[0].token_ids == ids[3:]


def test_base_checkpoint_loads_into_transformed_model(tmp_path):
    base = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, context_length=32))
    sd = base.state_dict()
    m = Transformer(base.config)
    inject_lora(m, r=2, targets=["q", "v"])
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert unexpected == [] and all("lora_" in k for k in missing)  # only the adapters are new


def test_unknown_or_broken_records_are_clear_errors(tmp_path):
    m = lora_model()
    m.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())

    def load_with(transforms):
        cfg_file.write_text(json.dumps({**cfg, "transforms": transforms}))
        return Transformer.from_pretrained(tmp_path)

    with pytest.raises(TransformError, match="unknown transform kind 'sparsify'.*lora"):
        load_with([{"kind": "sparsify"}])
    with pytest.raises(TransformError, match="must be a list"):
        load_with({"kind": "lora"})
    with pytest.raises(TransformError, match=r"transforms\[0\] \(lora\) has a bad or missing field.*'r'"):
        load_with([{"kind": "lora", "alpha": 4, "targets": ["q"]}])
    with pytest.raises(TransformError, match="another model"):
        load_with([{**cfg["transforms"][0], "modules": ["blocks.0.attn.qkv"]}])
    with pytest.raises(TransformError, match="outside the model folder"):
        load_with([{**cfg["transforms"][0], "file": "../adapter.safetensors"}])
    with pytest.raises(TransformError, match="outside the model folder"):
        check_record({"kind": "lora", "file": "/etc/passwd"}, "test")
    with pytest.raises(LmstackError):  # weights without the adapter's tensors: named, not a KeyError
        load_with([{**cfg["transforms"][0], "targets": ["q", "v", "down", "up"], "modules": None}])


def test_transform_file_holds_extra_tensors(tmp_path):
    """A record may keep its tensors in a file of their own (an adapter beside the base)."""
    from safetensors.torch import save_file
    m = lora_model()
    m.save_pretrained(tmp_path)
    sd = {k: v for k, v in m.state_dict().items()}
    adapters = {k: v.contiguous() for k, v in sd.items() if "lora_" in k}
    base = {k: v.contiguous() for k, v in sd.items() if "lora_" not in k and k != "lm_head.weight"}
    save_file(base, str(tmp_path / "model.safetensors"))
    save_file(adapters, str(tmp_path / "adapter.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["transforms"][0]["file"] = "adapter.safetensors"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = Transformer.from_pretrained(tmp_path)
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
