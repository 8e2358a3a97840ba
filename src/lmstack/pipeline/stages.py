"""The stages of the main job, in order: corpus -> tokenizer -> shards -> pretrain -> evaluate
-> sample -> report. Each takes the `Run` context, does one job, and returns the numbers shown
in the summary table and the report. Heavy imports live inside the stages so `lmstack run
--help` stays fast.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lmstack.pipeline.options import SPECIAL_TOKENS
from lmstack.pipeline.runner import Run, Stage, clear_outputs
from lmstack.utils import atomic_write_bytes, atomic_write_json, atomic_write_text


# --------------------------------------------------------------------------- corpus
def corpus(run: Run) -> dict:
    from lmstack.data import CorpusOptions, build_corpus

    o = run.opts
    meta = build_corpus(CorpusOptions(corpus=o.corpus, out=str(run.data_dir), size_mb=o.size_mb, seed=o.seed,
                                      dedupe=o.dedupe, noise=o.noise))
    numbers = {}
    for split, info in meta.get("splits", {}).items():
        numbers[f"{split}_docs"] = info.get("documents")
        numbers[f"{split}_mb"] = round(info.get("bytes", 0) / 1e6, 3)
    numbers["duplicates_removed"] = meta.get("documents", {}).get("removed", 0)
    numbers["probes"] = sum(meta.get("eval", {}).values())
    return numbers


# --------------------------------------------------------------------------- tokenizer
def tokenizer(run: Run) -> dict:
    from lmstack.data import iter_texts
    from lmstack.tokenizer import Tokenizer

    o = run.opts
    texts = list(iter_texts(run.data_dir, "train"))
    tok = Tokenizer.train(texts, vocab_size=o.vocab_size, pattern=o.tokenizer_pattern,
                          special_tokens=SPECIAL_TOKENS)
    # The trainer reads DATA_DIR/tokenizer.json; the run dir gets its own copy (LLM("runs/x")).
    tok.save(run.data_dir / "tokenizer.json")
    tok.save(run.dir / "tokenizer.json")
    run.forget("tokenizer", "model", "llm")
    val = "".join(t for _, t in zip(range(200), iter_texts(run.data_dir, "val")))
    n_bytes = len(val.encode("utf-8"))
    return {"n_vocab": tok.n_vocab, "bytes_per_token_val": n_bytes / max(1, len(tok.encode_ordinary(val)))}


def load_tokenizer(run: Run):
    from lmstack.tokenizer import Tokenizer

    return run.memo("tokenizer", lambda: Tokenizer.load(run.dir / "tokenizer.json"))


# --------------------------------------------------------------------------- shards
def shards(run: Run) -> dict:
    from lmstack.data import ShardSet, write_shards

    write_shards(run.data_dir, load_tokenizer(run), splits=("train", "val"))
    return {f"{s}_tokens": len(ShardSet(run.data_dir / "shards", s)) for s in ("train", "val")}


# --------------------------------------------------------------------------- pretrain
def _pretrain_outputs(run: Run) -> list[Path]:
    return [run.dir / "model.safetensors", run.dir / "config.json", run.dir / "metrics.jsonl"]


def pretrain(run: Run) -> dict:
    from lmstack.model import ModelConfig
    from lmstack.train import TrainConfig, Trainer

    o = run.opts
    # A fresh run: metrics and checkpoints of an earlier run with other settings must not mix in.
    clear_outputs(_pretrain_outputs(run) + [run.dir / "checkpoints", run.dir / "tb"])
    run.forget("model", "llm")
    tok = load_tokenizer(run)
    model_config = ModelConfig.preset(o.model, **{"vocab_size": tok.n_vocab, **o.model_config})
    cfg = TrainConfig(data=str(run.data_dir), out=str(run.dir), model=o.model, objective="causal",
                      max_steps=o.max_steps, batch_size=o.batch_size, seq_len=o.seq_len, lr=o.lr,
                      seed=o.seed, device=o.device, **o.train_config)
    result = Trainer(cfg, model_config).fit()
    return {"params": result["num_params"], "steps": result["steps"], "tokens": result["tokens"],
            "tokens_per_s": result["tokens_per_s"], "train_loss": result["train_loss"],
            "trainer_val_loss": result["val_loss"]}


def load_model(run: Run):
    from lmstack.model import Transformer

    return run.memo("model", lambda: Transformer.from_pretrained(run.dir, device=run.opts.device
                                                                 if run.opts.device != "auto" else None))


def load_llm(run: Run):
    from lmstack.infer import LLM

    return run.memo("llm", lambda: LLM(model=load_model(run), tokenizer=load_tokenizer(run),
                                       device=run.opts.device))


# --------------------------------------------------------------------------- evaluate
def evaluate(run: Run) -> dict:
    from lmstack.data import ShardSet
    from lmstack.eval import (engine_completer, evaluate_loss, load_probes, score_probes, token_counts,
                              unigram_cross_entropy, unigram_entropy)

    o = run.opts
    tok = load_tokenizer(run)
    train, val = ShardSet(run.data_dir / "shards", "train"), ShardSet(run.data_dir / "shards", "val")
    ev = evaluate_loss(load_model(run), val, seq_len=o.seq_len, batch_size=o.batch_size,
                       max_tokens=o.eval_max_tokens or None)
    counts = token_counts(train.tokens, tok.n_vocab)
    result = {
        "val_loss": ev["loss"], "val_perplexity": ev["perplexity"], "val_tokens": ev["tokens"],
        "unigram_entropy": unigram_entropy(counts),                  # of the train shard, nats/token
        "unigram_val_loss": unigram_cross_entropy(counts, val.tokens),  # train unigram on val
    }
    probes = load_probes(run.data_dir / "eval", limit=o.probe_limit or None)
    t0 = time.perf_counter()
    scores = score_probes(probes, engine_completer(load_llm(run), max_tokens=o.probe_max_tokens or None))
    result["probe_seconds"] = time.perf_counter() - t0
    rows = [r.to_dict() for r in scores.values()]
    atomic_write_json(run.dir / "eval.json", {**result, "probes": rows})
    numbers = dict(result)       # per-task scores live in eval.json and the report's probe table
    if rows:
        numbers["probes"] = sum(r["n"] for r in rows)
        numbers["probe_acc_mean"] = sum(r["accuracy"] for r in rows) / len(rows)
        numbers["probe_chance_mean"] = sum(r["chance"] for r in rows) / len(rows)
    return numbers


# --------------------------------------------------------------------------- sample
def sample_prompts(run: Run, n_docs: int = 2) -> list[str]:
    """The recipe's prompts, else the first probe of each eval file and the starts of val docs."""
    if run.opts.sample_prompts:
        return list(run.opts.sample_prompts)
    from lmstack.data import iter_texts
    from lmstack.eval import load_probes

    prompts = []
    for path in sorted((run.data_dir / "eval").glob("*.jsonl")):
        first = next(iter(load_probes(path.parent, files=[path.name], limit=1).values()), [])
        prompts += [p.prompt for p in first]
    for _, text in zip(range(n_docs), iter_texts(run.data_dir, "val")):
        prompts.append(" ".join(text.split(" ")[:6]))   # a few words of a held-out document
    return prompts


def sample(run: Run) -> dict:
    from lmstack.infer import SamplingParams

    o = run.opts
    prompts = sample_prompts(run)
    # One seed per prompt: reproducible, and prompts do not share their random draws.
    params = [SamplingParams(temperature=o.sample_temperature, max_tokens=o.sample_max_tokens, seed=o.seed + i)
              for i in range(len(prompts))]
    outs = load_llm(run).generate(prompts, params)
    samples = [{"prompt": p, "completion": out.outputs[0].text} for p, out in zip(prompts, outs)]
    atomic_write_json(run.dir / "samples.json", samples)
    return {"samples": len(samples), "tokens": sum(len(out.outputs[0].token_ids) for out in outs)}


# --------------------------------------------------------------------------- report
def report(run: Run) -> dict:
    from lmstack.report import loss_curve_png, probe_accuracy_png, read_metrics, render_report

    ev = _read_json(run.dir / "eval.json") or {}
    samples = _read_json(run.dir / "samples.json") or []
    figures = []
    metrics = read_metrics(run.dir / "metrics.jsonl")
    if metrics:
        baselines = {"unigram entropy": ev["unigram_entropy"]} if "unigram_entropy" in ev else None
        figures.append(("Train and validation loss (nats/token); dashed: unigram entropy of the corpus, the "
                        "loss of the best context-free predictor", loss_curve_png(metrics, baselines)))
    if ev.get("probes"):
        figures.append(("Held-out exact-match probes: model (greedy) vs always giving the task's most "
                        "common answer", probe_accuracy_png(ev["probes"])))
    for i, (caption, png) in enumerate(figures):
        atomic_write_bytes(run.dir / "figures" / ("loss.png", "probes.png")[i], png)

    headline = []
    if "val_loss" in ev:
        headline += [("val loss (nats/token)", ev["val_loss"]), ("unigram entropy (nats/token)",
                     ev["unigram_entropy"]), ("val perplexity", ev["val_perplexity"])]
    if ev.get("probes"):
        n = len(ev["probes"])
        headline += [("probe accuracy (mean over tasks)", f"{sum(r['accuracy'] for r in ev['probes']) / n:.1%}"),
                     ("chance (mean over tasks)", f"{sum(r['chance'] for r in ev['probes']) / n:.1%}")]
    pre = run.records.get("pretrain")
    if pre is not None and "params" in pre.numbers:
        headline += [("parameters", pre.numbers["params"]), ("pretrain time (s)", pre.seconds)]
    stages = [{"name": r.name, "status": r.status, "seconds": r.seconds, "numbers": r.numbers}
              for r in run.records.values()]
    o = run.opts
    page = render_report(
        title=f"lmstack run: {o.name}",
        subtitle=f"corpus {o.corpus} ({o.size_mb} MB), vocab {o.vocab_size}, model {o.model}, "
                 f"{o.max_steps} steps x {o.batch_size} x {o.seq_len} tokens; "
                 f"written {time.strftime('%Y-%m-%d %H:%M')}",
        headline=headline, stages=stages, figures=figures, probes=ev.get("probes", []), samples=samples,
        recipe=o.to_recipe())
    atomic_write_text(run.dir / "report.html", page)
    return {"figures": len(figures), "report_kb": round(len(page) / 1024, 1)}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- the recipe
def _p(*keys: str):
    return lambda o: {k: getattr(o, k) for k in keys}


STAGES: list[Stage] = [
    Stage("corpus", "build the corpus, split it, write probes", (),
          _p("corpus", "size_mb", "seed", "dedupe", "noise"), corpus,
          lambda r: [r.data_dir / "meta.json", r.data_dir / "docs" / "train.jsonl"]),
    Stage("tokenizer", "train the byte-level BPE tokenizer on the train docs", ("corpus",),
          _p("vocab_size", "tokenizer_pattern"), tokenizer,
          lambda r: [r.dir / "tokenizer.json", r.data_dir / "tokenizer.json"]),
    Stage("shards", "tokenize train/val into token shards", ("tokenizer",), _p(), shards,
          lambda r: [r.data_dir / "shards" / "meta.json"]),
    Stage("pretrain", "pretrain the model (causal LM)", ("shards",),
          _p("model", "model_config", "max_steps", "batch_size", "seq_len", "lr", "seed", "device",
             "train_config"), pretrain, _pretrain_outputs),
    Stage("evaluate", "val loss, unigram entropy, exact-match probes", ("pretrain",),
          _p("eval_max_tokens", "probe_limit", "probe_max_tokens"), evaluate,
          lambda r: [r.dir / "eval.json"]),
    Stage("sample", "sample continuations of a few prompts", ("pretrain",),
          _p("sample_prompts", "sample_max_tokens", "sample_temperature", "seed"), sample,
          lambda r: [r.dir / "samples.json"]),
    Stage("report", "write report.html with figures, the stage table and samples", (),
          lambda o: {}, report, lambda r: [r.dir / "report.html"], cache=False),
]

