"""recipes/hf-chat.yaml on a tiny random Hugging Face Llama: import -> SFT with LoRA -> DPO ->
INT4 -> measure -> GGUF and HF export, through `lmstack run`. The exports are checked against
independent readers: transformers loads the HF folder and its logits equal our final model's
(the INT4 weights dequantized), and the gguf package reads the GGUF file's tensors and tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmstack.cli.main import main

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "hf-chat.yaml"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAST = {"sft_config": {"max_steps": 2, "batch_size": 2, "seq_len": 256, "per_task": 2,
                       "tinyworld_tasks": ["upper", "word_count", "facts", "unseen"],
                       "tinyworld_mb": 0.05, "lora_r": 4, "warmup_steps": 1},
        "dpo_config": {"n_train": 8, "n_eval": 4, "max_steps": 1, "batch_size": 4},
        "quant_config": {"calib_samples": 2, "calib_seq_len": 32, "group_size": 32},
        "measure_probes": 1, "measure_pairs": 4, "measure_arith": 2}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from lmstack.data.tinyworld import TinyWorldConfig, generate
    from lmstack.tokenizer import Tokenizer
    path = tmp_path_factory.mktemp("hf_llama")
    text = generate(TinyWorldConfig(seed=0, size_mb=0.02)).docs
    tok = Tokenizer.train(text, vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>"}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=None, eos_token_id=tok.special_tokens["<|endoftext|>"],
                                   pad_token_id=None, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_hf_recipe_imports_finetunes_aligns_quantizes_and_exports(hf_dir, tmp_path, capsys):
    recipe = tmp_path / "fast.yaml"
    shipped = yaml.safe_load(RECIPE.read_text())
    recipe.write_text(yaml.safe_dump({**shipped, **{k: {**shipped[k], **v} if isinstance(v, dict) else v
                                                    for k, v in FAST.items()}}))
    assert main(["run", "--recipe", str(recipe), "--base-model", str(hf_dir), "--out-dir", str(tmp_path),
                 "--name", "hf", "--device", "cpu"]) == 0
    run = tmp_path / "hf"
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"serve the final model: lmstack serve {run / 'quantized'}") and "http://" in out[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["import", "sft", "dpo", "quantize", "measure", "export",
                                                      "report"]
    assert summary["stages"][1]["numbers"]["method"] == "lora"
    assert (run / "sft" / "adapter" / "adapter_config.json").is_file()      # PEFT adapter + merged model
    cfg = json.loads((run / "quantized" / "config.json").read_text())
    assert any(t.get("kind") == "quant" and t["bits"] == 4 for t in cfg.get("transforms", [])), cfg

    # the HF export: transformers' logits = our INT4 model's (it computes with the dequantized weights)
    from lmstack.model import Transformer
    ours = Transformer.from_pretrained(run / "quantized").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "hf").eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 12]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    assert "chat_template" in json.loads((run / "export" / "hf" / "tokenizer_config.json").read_text())

    # the GGUF file: every weight of the model, and the tokenizer's vocabulary
    reader = gguf.GGUFReader(run / "export" / "model.gguf")
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names and "output.weight" in names
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == ours.config.vocab_size

    m = json.loads((run / "measure.json").read_text())
    assert m["models"] == ["import", "sft", "dpo", "quantize"]
    assert m["rows"]["quantize"]["file_mb"] < m["rows"]["quantize"]["float_file_mb"]
