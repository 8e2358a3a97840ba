"""Small stand-ins for the SFT tests: a base run directory (a BPE tokenizer trained on a little
tinyworld text, a random tiny model) and its Hugging Face export, built in seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 400
MODEL = dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, context_length=512, pos_emb="rope", norm="rmsnorm",
             mlp="swiglu", intermediate_size=128, tie_embeddings=True)


def make_base(out: Path, seed: int = 0, **model_kw) -> Path:
    """A run directory: config.json + model.safetensors (random init) + tokenizer.json."""
    from lmstack.data.tinyworld import TinyWorldConfig, generate
    from lmstack.model import ModelConfig, Transformer
    from lmstack.tokenizer import Tokenizer
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train(generate(TinyWorldConfig(seed=0, size_mb=0.1)).docs, vocab_size=VOCAB)
    torch.manual_seed(seed)
    Transformer(ModelConfig(vocab_size=tok.n_vocab, **{**MODEL, **model_kw})).save_pretrained(out)
    tok.save(out / "tokenizer.json")
    return out


def make_hf(base: Path, out: Path) -> Path:
    """`base` exported as a Hugging Face folder (config.json with model_type, model.safetensors,
    tokenizer.json)."""
    from lmstack.model import Transformer
    from lmstack.model.hf import export_hf
    export_hf(Transformer.from_pretrained(base), out)
    shutil.copyfile(base / "tokenizer.json", out / "tokenizer.json")
    assert "model_type" in json.loads((out / "config.json").read_text())
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chats(n: int = 24) -> list[dict]:
    """Short chats in both accepted forms."""
    out = []
    for i in range(n):
        word = ["cat", "dog", "fox", "hat", "sun", "cup"][i % 6]
        if i % 2:
            out.append({"prompt": f"reverse the word {word}.", "response": word[::-1]})
        else:
            out.append({"messages": [{"role": "user", "content": f"write {word} in capital letters."},
                                     {"role": "assistant", "content": word.upper()}]})
    return out


# flags that keep a CLI run to seconds
FAST = ["--batch-size", "4", "--seq-len", "64", "--eval-every", "0", "--eval-batches", "1", "--ckpt-every", "0",
        "--tensorboard", "false", "--warmup-steps", "1", "--report", "false", "--device", "cpu"]
