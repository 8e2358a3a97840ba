"""Bad input to `lmstack finetune` is refused before training starts, naming the file and line or
the module, and nothing is written: a chat with an unknown role, an empty assistant turn, an
example longer than the context, an adapter trained on another base, LoRA targets that match
nothing, a rank larger than the layer, a tokenizer that does not fit the model."""
import json
import re
import shutil

import pytest
import torch

from lmstack.cli.main import main
from lmstack.finetune import LoraConfig, add_lora, save_adapter
from lmstack.model import ModelConfig, Transformer
from sft_helpers import FAST, chats, make_base, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "run")


def run(base, out, *extra, data=None):
    return main(["finetune", str(base), "--out", str(out), "--max-steps", "1", *FAST, *extra]
                + (["--data", str(data)] if data else []))


def user(text):
    return {"role": "user", "content": text}


CASES = {
    "unknown role": ([{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
                     r"chats\.jsonl:3: message #0 has unknown role 'bot'; valid roles: system, user, assistant"),
    "empty assistant turn": ([{"messages": [user("hi"), {"role": "assistant", "content": "  "}]}],
                             r"chats\.jsonl:3: message #1 is an empty assistant turn"),
    "longer than the context": ([{"prompt": "hello " * 80, "response": "x"}],
                                r"chats\.jsonl:3: the example is \d+ tokens, longer than max_len=65.*raise --seq-len"),
    "no assistant at the end": ([{"messages": [user("hi")]}], r"chats\.jsonl:3: the chat ends with a user turn"),
    "not JSON": (["{oops"], r"chats\.jsonl:3: not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_chat_file_names_file_and_line(base, tmp_path, capsys, case):
    bad, pattern = CASES[case]
    path = tmp_path / "chats.jsonl"
    good = [json.dumps(r) for r in chats(2)]
    path.write_text("\n".join(good + [b if isinstance(b, str) else json.dumps(b) for b in bad]) + "\n")
    assert run(base, tmp_path / "out", data=path) == 1
    assert re.search(pattern, capsys.readouterr().err), case
    assert not (tmp_path / "out").exists()


def test_bad_lora_settings_name_the_module(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", chats())
    out = tmp_path / "out"
    assert run(base, out, "--lora-targets", "q,attention", data=data) == 1
    assert "'attention' matches no linear" in capsys.readouterr().err
    assert run(base, out, "--lora-targets", "k", "--lora-r", "80", data=data) == 1
    assert "rank r=80 is larger than blocks.0.attn.qkv (k: 64 x 64); choose r <= 64" in capsys.readouterr().err
    assert run(base, out, "--method", "qlora", "--nf4-blocksize", "48", data=data) == 1
    assert "qlora with nf4_blocksize=48: QuantConfig.group_size=48 is not supported" in capsys.readouterr().err
    assert not out.exists()


def test_adapter_from_another_base_is_refused(base, tmp_path, capsys):
    other = Transformer(ModelConfig(vocab_size=400, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, context_length=512,
                                    intermediate_size=64))
    add_lora(other, LoraConfig(r=2, targets=["q", "v"]))
    save_adapter(other, tmp_path / "other-adapter")
    out = tmp_path / "out"
    assert run(base, out, "--adapter", str(tmp_path / "other-adapter"), data=write_jsonl(tmp_path / "c.jsonl", chats())) == 1
    assert "other-adapter was trained on another base model" in capsys.readouterr().err
    assert not out.exists()


def test_base_and_data_mismatches(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", chats())
    out = tmp_path / "out"
    assert run(base, out, "--seq-len", "1024", data=data) == 1
    assert "seq_len=1024 exceeds" in capsys.readouterr().err
    assert run(base, out, data=tmp_path / "missing.jsonl") == 1
    assert "neither 'tinyworld' nor an existing JSONL file" in capsys.readouterr().err
    small = tmp_path / "small"
    shutil.copytree(base, small)
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, context_length=64)).save_pretrained(small)
    assert run(small, out, data=data) == 1
    assert "tokenizer.json has 400 tokens but the model's vocab_size is 300" in capsys.readouterr().err
    assert run(tmp_path, out, data=data) == 1
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    assert not out.exists()
