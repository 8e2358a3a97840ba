"""Trained models and prompts for the speculative-decoding benchmark (bench_engine.py, #5).

Speculation only pays when the draft guesses the target's tokens, which random weights
never do honestly. So this module trains, briefly and once, two models with the same
tokenizer, through lmstack's public API:

  * the corpus: tinyworld documents (templated stories, facts, Q/A) plus "copy" documents
    `Text: <t>\\nCopy: <t>`, t a fresh random draw of 3-6 of their sentences, meant to teach
    the target to quote its prompt (the classic prompt-lookup setting) rather than memorise;
  * the target: `target_layers` layers, trained on that corpus;
  * the draft: one layer of the same width, distilled from the target (sequence-level
    knowledge distillation, as speculative-decoding drafts are made in practice, e.g.
    DistillSpec): trained for the same number of steps on the target's own greedy
    continuations of `distill_prompts` story openings from the *train* split, so it learns
    to predict what the target will say rather than what the corpus says;
  * everything cached under ~/.cache/lmstack/bench/ (models keyed by a hash of all the
    settings, the corpus by a hash of the settings it depends on), so a re-run only loads them.

Workloads (held-out test documents, never trained on):
  * story continuation (structured text): the first sentence of a test story; the model
    writes on (greedy output of a small model is very regular: the distilled draft predicts
    most of it, and prompt lookup finds its repeated names and phrases);
  * copy (n-gram prompt lookup): `Text: <test doc>\\nCopy:`; the answer quotes the prompt.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from lmstack.utils import atomic_write_json

VERSION = 4
# 800 steps x 8 x 256 tokens: about 7 minutes for the target on 2 idle cores (~4k tok/s), then
# ~3 minutes of distillation data (the engine, batched) and ~1.5 minutes for the draft.
# Measured: the target does NOT learn to quote its prompt in 800 steps (copy_fidelity ~0%; a
# 2-layer probe's loss on the quoted text fell only from 1.2 to 0.8 nats/token in 900 steps),
# so the copy workload shows what speculation gives when the target does not copy.
SETTINGS = dict(version=VERSION, corpus_mb=1.0, copy_frac=0.5, vocab_size=1024, n_embd=128, n_head=4,
                target_layers=8, draft_layers=1, context_length=512, steps=800, batch_size=8, seq_len=256,
                lr=3e-3, seed=0, distill_prompts=1200, distill_tokens=160)
DATA_KEYS = ("version", "corpus_mb", "copy_frac", "vocab_size", "seed")   # what the corpus depends on


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cache_root(settings: dict) -> Path:
    return Path.home() / ".cache" / "lmstack" / "bench" / f"engine-spec-{_key(settings)}"


def data_root(settings: dict) -> Path:
    """The corpus is shared by every model setting built on it (e.g. other --spec-train-steps)."""
    key = _key({k: settings[k] for k in DATA_KEYS})
    return Path.home() / ".cache" / "lmstack" / "bench" / f"engine-spec-data-{key}"


def copy_doc(text: str, answer: bool = True) -> str:
    return f"Text: {text}\nCopy:" + (f" {text}" if answer else "")


def build_data(data: Path, s: dict, log=print) -> Path:
    """tinyworld + copy documents, a BPE tokenizer trained on them, token shards."""
    from lmstack.data import CorpusOptions, build_corpus, iter_texts, write_shards
    from lmstack.tokenizer import Tokenizer
    if (data / "shards" / "meta.json").is_file() and (data / "tokenizer.json").is_file():
        return data
    t = time.perf_counter()
    build_corpus(CorpusOptions(corpus="tinyworld", out=str(data), size_mb=s["corpus_mb"], seed=s["seed"]))
    rng = random.Random(s["seed"])
    for split in ("train", "val"):
        path = data / "docs" / f"{split}.jsonl"
        docs = list(iter_texts(data, split))
        # Copy documents quote NEW text each time (3-6 sentences drawn at random from the split's
        # one-paragraph docs), so the only way to predict the quote is to copy it from the context.
        sentences = [x.rstrip(".") + "." for d in docs if "\n" not in d for x in d.split(". ") if x]
        copies = [copy_doc(" ".join(rng.sample(sentences, rng.randint(3, 6))))
                  for _ in range(int(len(docs) * s["copy_frac"]))]
        mixed = docs + copies
        rng.shuffle(mixed)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in mixed), encoding="utf-8")
    tok = Tokenizer.train(iter_texts(data, "train"), vocab_size=s["vocab_size"], show_progress=False)
    tok.save(data / "tokenizer.json")
    write_shards(data, tok)
    log(f"  built corpus + tokenizer + shards in {time.perf_counter() - t:.0f}s ({data})")
    return data


def distill_data(data: Path, target: Path, out: Path, s: dict, log=print) -> Path:
    """DIR `out` whose documents are train-split story openings + the target's greedy
    continuation of each (the draft's training data), sharded with the same tokenizer."""
    import shutil

    import torch

    from lmstack.data import iter_texts, write_shards
    from lmstack.infer import LLM, SamplingParams
    from lmstack.tokenizer import Tokenizer
    if (out / "shards" / "meta.json").is_file():
        return out
    t = time.perf_counter()
    tok = Tokenizer.load(data / "tokenizer.json")
    openings = [d.split(". ")[0] + "." for d in iter_texts(data, "train")
                if "\n" not in d and not d.startswith("Text:")][:s["distill_prompts"]]
    llm = LLM(str(target), device="cpu", dtype=torch.float32)
    # ignore_eos, as the benchmark runs: the target goes on into a new document after <|endoftext|>,
    # and the draft must learn that too. Each EOT-separated piece becomes its own document, so the
    # packed token stream (documents joined by EOT) is the target's output again.
    outs = llm.generate(openings, SamplingParams(temperature=0.0, max_tokens=s["distill_tokens"], ignore_eos=True))
    docs = []
    for opening, r in zip(openings, outs):
        pieces, cur = [], []
        for tid in r.outputs[0].token_ids:
            if tid == tok.eot_token:
                pieces.append(cur)
                cur = []
            else:
                cur.append(tid)
        pieces.append(cur)
        texts = [tok.decode(p) for p in pieces]
        texts[0] = opening + texts[0]
        docs += [x for x in texts if x.strip()]
    n_val = max(1, len(docs) // 20)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", docs[n_val:]), ("val", docs[:n_val])):
        (out / "docs" / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part),
                                                      encoding="utf-8")
    shutil.copy(data / "tokenizer.json", out / "tokenizer.json")
    write_shards(out, tok)
    log(f"  distillation data: {len(openings)} target continuations ({len(docs)} documents) in {time.perf_counter() - t:.0f}s ({out})")
    return out


def train_one(data: Path, out: Path, n_layer: int, s: dict, log=print) -> dict:
    from lmstack.model import ModelConfig
    from lmstack.train import TrainConfig, Trainer
    done = out / "bench_done.json"
    if done.is_file():
        return json.loads(done.read_text())
    mcfg = ModelConfig.preset("tiny", vocab_size=s["vocab_size"]).replace(
        n_layer=n_layer, n_embd=s["n_embd"], n_head=s["n_head"], n_kv_head=s["n_head"],
        context_length=s["context_length"])
    cfg = TrainConfig(data=str(data), out=str(out), max_steps=s["steps"], batch_size=s["batch_size"],
                      seq_len=s["seq_len"], lr=s["lr"], seed=s["seed"], device="cpu", eval_every=0,
                      ckpt_every=0, keep_last=1, tensorboard=False, log_every=10)
    t = time.perf_counter()
    summary = Trainer(cfg, mcfg).fit()
    info = {"n_layer": n_layer, "train_seconds": time.perf_counter() - t,
            "final_loss": _last_loss(out), "summary_keys": sorted(summary) if isinstance(summary, dict) else None}
    atomic_write_json(done, info)
    log(f"  trained {n_layer}-layer model in {info['train_seconds']:.0f}s, final train loss {info['final_loss']}")
    return info


def _last_loss(out: Path):
    loss = None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train" and "loss" in rec:
            loss = round(float(rec["loss"]), 3)
    return loss


def spec_models(settings: dict | None = None, log=print) -> dict:
    """Train (or load from the cache) the target and draft; returns their dirs and training info."""
    s = dict(SETTINGS if settings is None else settings)
    root = cache_root(s)
    root.mkdir(parents=True, exist_ok=True)
    data = build_data(data_root(s), s, log)
    target = train_one(data, root / "target", s["target_layers"], s, log)
    distilled = distill_data(data, root / "target", root / "distill", s, log)
    draft = train_one(distilled, root / "draft", s["draft_layers"], s, log)
    return {"root": root, "data": data, "target": root / "target", "draft": root / "draft",
            "target_info": target, "draft_info": draft}


def test_docs(data: Path, tokenizer, min_tokens: int, n: int) -> list[str]:
    """Held-out tinyworld stories (one paragraph) of at least `min_tokens` tokens."""
    from lmstack.data import iter_texts
    out = []
    for d in iter_texts(data, "test"):
        if "\n" not in d and not d.startswith("Text:") and len(tokenizer.encode_ordinary(d)) >= min_tokens:
            out.append(d)
            if len(out) == n:
                break
    return out


def story_prompts(data: Path, tokenizer, n: int) -> list[str]:
    """First sentence of held-out stories: the model continues in the corpus's structure."""
    return [d.split(". ")[0] + "." for d in test_docs(data, tokenizer, 40, n)]


def copy_prompts(data: Path, tokenizer, n: int, min_tokens: int) -> list[str]:
    """`Text: <held-out story>\\nCopy:`: the answer quotes the prompt."""
    return [copy_doc(d, answer=False) for d in test_docs(data, tokenizer, min_tokens, n)]


def copy_fidelity(prompt: str, output_ids: list[int], tokenizer) -> float:
    """Fraction of the quoted text the model reproduced before its first wrong token:
    the check that the target learned to copy (else prompt lookup has nothing to find)."""
    quoted = prompt[len("Text: "):-len("\nCopy:")]
    want = tokenizer.encode_ordinary(" " + quoted)
    n = 0
    while n < min(len(want), len(output_ids)) and want[n] == output_ids[n]:
        n += 1
    return n / len(want)
