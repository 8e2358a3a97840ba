"""`lmstack finetune` end to end on a tiny model: LoRA from a run directory (run dir, PEFT adapter
folder, HF export, LLM loading, resume), QLoRA from a Hugging Face folder (NF4 base at <= 4.2
bits per weight, transforms recorded), full finetuning with padding, and recipes."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from lmstack.cli.main import main
from lmstack.finetune import load_adapter
from lmstack.model import Transformer
from sft_helpers import FAST, chats, make_base, make_hf, write_jsonl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny matmuls: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "run")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", chats())


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def test_lora_on_tinyworld_end_to_end(base, tmp_path, capsys):
    out, hf = tmp_path / "sft", tmp_path / "hf"
    args = ["finetune", str(base), "--method", "lora", "--data", "tinyworld", "--out", str(out), "--max-steps", "3",
            "--tinyworld-mb", "0.05", "--per-task", "8", "--probes-per-task", "2", "--seq-len", "384",
            "--tinyworld-tasks", "upper,facts,unseen,reading", "--export-hf", str(hf), "--lora-r", "4", *FAST[4:]]
    args += ["--batch-size", "2", "--report", "true"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and set(printed["exact_match_after"]) == {"upper", "facts", "unseen", "reading"}
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["before"]["tasks"]["unseen"]["n"] == 2 and "abstain_rate_unseen" in summary["after"]
    assert summary["base_bits_per_param"]["stored"] == 32.0 and summary["adapted_modules"] == 8
    assert (out / "report.html").is_file() and "says &quot;I don" in (out / "report.html").read_text()
    # only the adapters were trained, checkpointed and given optimizer state
    from lmstack.train import checkpoint as ckpt
    weights, state, meta = ckpt.load_checkpoint(out / "checkpoints" / "step_0000003")
    assert weights and all(".lora_" in k for k in weights) and set(meta["trainable"]) == set(weights)
    assert summary["trainable_params"] == sum(w.numel() for w in weights.values())
    # the run directory: base + LoRA transform + trained adapters; the PEFT folder holds the same adapters
    trained = Transformer.from_pretrained(out)
    assert [t["kind"] for t in trained.transforms] == ["lora"]
    fresh = Transformer.from_pretrained(base)
    load_adapter(fresh, out / "adapter")
    torch.testing.assert_close(logits(fresh, IDS), logits(trained, IDS), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(Transformer.from_pretrained(base), IDS), logits(trained, IDS), atol=1e-4)
    # HF export: the merged model, loadable by transformers, same logits
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(IDS).logits, logits(trained, IDS), atol=1e-4, rtol=0)
    assert (hf / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    from lmstack.infer import LLM, SamplingParams
    llm = LLM(str(out), kv_cache_tokens=1024)
    want = logits(trained, IDS[:1])[0, -1].argmax().item()
    got = llm.generate([IDS[0].tolist()], SamplingParams(temperature=0.0, max_tokens=1))[0].outputs[0].token_ids
    assert list(got) == [want]


def test_qlora_from_a_hugging_face_folder(base, data, tmp_path, capsys):
    hf = make_hf(base, tmp_path / "hf-base")
    out = tmp_path / "q"
    assert main(["finetune", str(hf), "--method", "qlora", "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--lora-targets", "q,v,down", *FAST]) == 0
    summary = json.loads((out / "finetune.json").read_text())
    bits = summary["base_bits_per_param"]
    assert 4.0 < bits["stored"] <= 4.2 and bits["resident"] > bits["stored"]      # + NF4's decoded absmax cache
    cfg = json.loads((out / "config.json").read_text())
    assert [t["kind"] for t in cfg["transforms"]] == ["quant", "lora"] and cfg["transforms"][0]["method"] == "nf4"
    trained = Transformer.from_pretrained(out)
    assert summary["trainable_params"] == sum(p.numel() for n, p in trained.named_parameters() if ".lora_" in n)
    # the adapter trained over NF4 loads on the float base too (the same base fingerprint)
    load_adapter(Transformer.from_pretrained(hf), out / "adapter")


def test_full_finetune_with_padding_then_resume(base, data, tmp_path, capsys):
    out = tmp_path / "full"
    flags = ["finetune", str(base), "--method", "full", "--data", str(data), "--out", str(out), "--packing", "false",
             *FAST, "--ckpt-every", "2"]
    assert main(flags + ["--max-steps", "2"]) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["trainable_params"] == summary["num_params"] and not (out / "adapter").exists()
    before, after = Transformer.from_pretrained(base).state_dict(), Transformer.from_pretrained(out).state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("qkv.weight"))
    assert main(flags + ["--max-steps", "2"]) == 1                                 # checkpoints there: --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(flags + ["--max-steps", "4", "--resume"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4]


def test_recipe_keys_and_flags(base, data, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {base}\nmethod: lora\nlora_r: 2\ndata: {data}\nmax_steps: 1\n")
    out = tmp_path / "rec"
    assert main(["finetune", "--recipe", str(recipe), "--out", str(out), *FAST]) == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    recipe.write_text("lora_rank: 2\n")
    assert main(["finetune", str(base), "--recipe", str(recipe), "--out", str(tmp_path / "x")]) == 1
    assert "unknown recipe key 'lora_rank'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", str(base), "--lora-rank", "2"])
    assert "did you mean --lora-r" in capsys.readouterr().err
    assert main(["finetune", str(base), "--method", "dora", "--out", str(tmp_path / "y")]) == 1
    assert "method='dora': valid: full, lora, qlora" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_finetune_recipes_are_valid(path):
    from lmstack.cli.options import from_dict
    from lmstack.finetune.config import FinetuneConfig
    cfg = from_dict(FinetuneConfig, {**yaml.safe_load(path.read_text()), "model": "runs/tinyworld"})
    assert path.stem.endswith(cfg.method)
    assert cfg.trainer_config().activation_checkpointing == (cfg.method == "qlora")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_hugging_face_folder_with_its_own_chat_template(base, data, tmp_path, capsys):
    """A tokenizer without lmstack's chat tokens and a ChatML template in tokenizer_config.json:
    chats render through the template, the loss covers the answer and <|im_end|> (the template's
    eos_token, found without --end-token), not the "\\n" glue after it, and the run works."""
    from lmstack.data.tinyworld import TinyWorldConfig, generate
    from lmstack.finetune.config import FinetuneConfig
    from lmstack.finetune.data import TemplateChat, chat_tokenizer, load_sft_data
    from lmstack.tokenizer import Tokenizer
    folder = make_hf(base, tmp_path / "chatml")
    tok = Tokenizer.train(generate(TinyWorldConfig(seed=0, size_mb=0.05)).docs, vocab_size=400,
                          special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    chat = chat_tokenizer(tok, folder)
    assert isinstance(chat, TemplateChat)
    ex = load_sft_data(FinetuneConfig(model=str(folder), data=str(data), val_fraction=0.0), chat, 0).train[0]
    trained = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    first = chats(1)[0]["messages"][1]["content"]          # "CAT"
    assert trained == tok.encode_ordinary(first) + [tok.special_tokens["<|im_end|>"]]
    assert tok.decode(ex.ids).endswith(f"<|im_start|>assistant\n{first}<|im_end|>\n")
    out = tmp_path / "out"
    assert main(["finetune", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "1", *FAST]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
