"""The stages of the main job, in order: (import |) corpus -> tokenizer -> shards -> pretrain ->
evaluate -> sample -> sft -> dpo -> grpo -> quantize -> measure -> rag -> export -> report. The
first ones and the report are here; the chat stages in chat_stages.py, measure and rag in
measure.py. Each takes the `Run` context, does one job, and returns the numbers shown in the
summary table and the report. Heavy imports live inside the stages so `lmstack run --help` stays fast.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lmstack.pipeline.chat_stages import (dpo, estimate_dpo, estimate_export, estimate_grpo, estimate_quantize,
                                          estimate_sft, export, export_outputs, grpo, import_base, model_dir,
                                          quantize, sft)
from lmstack.pipeline.data import build_corpus_dir, train_tokenizer, write_token_shards
from lmstack.pipeline.measure import estimate_measure, estimate_rag, measure, pair_tasks, rag
from lmstack.pipeline.options import model_chain, model_input, train_config_for
from lmstack.pipeline.report_chat import chat_sections
from lmstack.pipeline.runner import Run, Stage, clear_outputs
from lmstack.utils import atomic_write_bytes, atomic_write_json, atomic_write_text


# --------------------------------------------------------------------------- corpus
def corpus(run: Run) -> dict:
    meta = build_corpus_dir(run.opts, run.data_dir)
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

    tok = train_tokenizer(run.opts, run.data_dir)
    # The trainer reads DATA_DIR/tokenizer.json; the run dir gets its own copy (LLM("runs/x")).
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
    from lmstack.data import ShardSet

    write_token_shards(run.data_dir, load_tokenizer(run), splits=("train", "val"))
    return {f"{s}_tokens": len(ShardSet(run.data_dir / "shards", s)) for s in ("train", "val")}


# --------------------------------------------------------------------------- pretrain
def _pretrain_outputs(run: Run) -> list[Path]:
    return [run.dir / "model.safetensors", run.dir / "config.json", run.dir / "metrics.jsonl"]


def pretrain(run: Run) -> dict:
    """Pretrain with checkpoints every train_config.ckpt_every steps. When an earlier run of
    this very stage (same cache key) was interrupted, continue from its last checkpoint: the
    trainer's exact resume makes the losses those of an uninterrupted run."""
    from lmstack.train import Trainer
    from lmstack.train.checkpoint import latest_checkpoint

    o = run.opts
    latest = latest_checkpoint(run.dir / "checkpoints") if run.resuming else None
    if latest is None:
        # A fresh run: metrics and checkpoints of an earlier run with other settings must not mix in.
        clear_outputs(_pretrain_outputs(run) + [run.dir / "checkpoints", run.dir / "tb"])
    else:
        run.log(f"[pretrain] resuming the interrupted run from {latest.relative_to(run.dir)}")
    run.forget("model", "llm")
    cfg = train_config_for(o, data=str(run.data_dir), out=str(run.dir), resume=latest is not None)
    on_sample = _sampler(run) if cfg.sample_every else None
    result = Trainer(cfg, on_sample=on_sample).fit()
    numbers = {"params": result["num_params"], "steps": result["steps"], "tokens": result["tokens"],
               "tokens_per_s": result["tokens_per_s"], "train_loss": result["train_loss"],
               "trainer_val_loss": result["val_loss"]}
    if result["resumed_from"] is not None:
        numbers["resumed_from"] = result["resumed_from"]
    return numbers


def _sampler(run: Run, n_prompts: int = 3):
    """The trainer's on_sample callback: greedy completions of the first sample prompts, so
    the report can show how the same prompts are continued as training goes on."""
    prompts = sample_prompts(run)[:n_prompts]
    tok = load_tokenizer(run)
    max_tokens = run.opts.sample_max_tokens
    need = sum(len(tok.encode(p, allowed_special="all")) + max_tokens + 16 for p in prompts)

    def on_sample(model, step: int) -> dict:
        from lmstack.infer import LLM, SamplingParams

        # a small KV cache, made anew each time: the engine needs room for one whole context
        kv_tokens = max(need, model.config.context_length)
        llm = LLM(model=model, tokenizer=tok, device=run.opts.device, kv_cache_tokens=kv_tokens)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
        return {"samples": [{"prompt": p, "completion": out.outputs[0].text} for p, out in zip(prompts, outs)]}

    return on_sample


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
    n_max = max((len(v) for v in probes.values()), default=0)      # keep every example, pick below
    scores = score_probes(probes, engine_completer(load_llm(run), max_tokens=o.probe_max_tokens or None),
                          n_examples=n_max)
    result["probe_seconds"] = time.perf_counter() - t0
    rows = [{**r.to_dict(), "examples": mixed_examples(r.examples)} for r in scores.values()]
    atomic_write_json(run.dir / "eval.json", {**result, "probes": rows})
    numbers = dict(result)       # per-task scores live in eval.json and the report's probe table
    if rows:
        numbers["probes"] = sum(r["n"] for r in rows)
        numbers["probe_acc_mean"] = sum(r["accuracy"] for r in rows) / len(rows)
        numbers["probe_chance_mean"] = sum(r["chance"] for r in rows) / len(rows)
    return numbers


def mixed_examples(examples: list[dict], k: int = 4) -> list[dict]:
    """Up to k examples for the report, half right and half wrong where both exist (the first
    of each kind, in probe order), so a reader sees what the model gets and what it misses."""
    right = [e for e in examples if e["correct"]]
    wrong = [e for e in examples if not e["correct"]]
    n_right = min(len(right), max(k // 2, k - len(wrong)))
    picked = right[:n_right] + wrong[:k - n_right]
    return sorted(picked, key=examples.index)


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
    from lmstack.report import (loss_curve_png, probe_accuracy_png, read_metrics, render_report,
                                training_curves_png)

    t0 = time.perf_counter()
    ev = _read_json(run.dir / "eval.json") or {}
    samples = _read_json(run.dir / "samples.json") or []
    figures = []                                   # (file name, caption, png)
    metrics = read_metrics(run.dir / "metrics.jsonl")
    if metrics:
        baselines = {"unigram entropy": ev["unigram_entropy"]} if "unigram_entropy" in ev else None
        figures.append(("loss.png", "Train and validation loss (nats/token); dashed: unigram entropy of the "
                        "corpus, the loss of the best context-free predictor", loss_curve_png(metrics, baselines)))
        figures.append(("training.png", "Learning rate (warmup, then the schedule), gradient norm before "
                        "clipping (dashed: the clip threshold), and throughput in tokens/s",
                        training_curves_png(metrics, grad_clip=train_config_for(run.opts).grad_clip)))
    if ev.get("probes"):
        figures.append(("probes.png", "Held-out exact-match probes: model (greedy) vs always giving the task's "
                        "most common answer", probe_accuracy_png(ev["probes"])))
    for name, _, png in figures:
        atomic_write_bytes(run.dir / "figures" / name, png)

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
    # this stage, while it writes the page: its time so far (the figures are the slow part)
    stages.append({"name": "report", "status": "ran", "seconds": time.perf_counter() - t0,
                   "numbers": {"figures": len(figures)}})
    during = [{"step": m["step"], "samples": m["samples"]} for m in metrics
              if m.get("split") == "sample" and isinstance(m.get("samples"), list)]
    o = run.opts
    tables, more = chat_sections(run)
    for name, caption, png in more:
        atomic_write_bytes(run.dir / "figures" / name, png)
    figures += more
    page = render_report(
        title=f"lmstack run: {o.name}",
        subtitle=(f"base model {o.base_model}; " if "import" in run.records else
                  f"corpus {o.corpus} ({o.size_mb} MB), vocab {o.vocab_size}, model {o.model}, "
                  f"{o.max_steps} steps x {o.batch_size} x {o.seq_len} tokens; ")
        + f"stages {' -> '.join(o.stages)}; written {time.strftime('%Y-%m-%d %H:%M')}",
        headline=headline, stages=stages, figures=[(c, png) for _, c, png in figures], probes=ev.get("probes", []),
        samples=samples, recipe=o.to_recipe(), training_samples=during, tables=tables)
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


def _after(stage: str):
    """needs of a model stage: the model it starts from (depends on the recipe's stages)."""
    return lambda o: (model_input(o, stage),)


def _secs(x: float):
    return lambda o, tok_s: x


def _pretrain_estimate(o, tok_s: float) -> float:
    return o.max_steps * o.batch_size * o.seq_len / tok_s + 5


STAGES: list[Stage] = [
    Stage("import", "import the base model (a Hugging Face folder)", (), _p("base_model"), import_base,
          lambda r: [r.dir / "base" / "config.json"], estimate=_secs(10)),
    Stage("corpus", "build the corpus, split it, write probes", (),
          _p("corpus", "size_mb", "seed", "dedupe", "near_threshold", "noise", "val_frac", "test_frac", "doc_chars",
             "field", "errors"), corpus,
          lambda r: [r.data_dir / "meta.json", r.data_dir / "docs" / "train.jsonl"], estimate=_secs(10)),
    Stage("tokenizer", "train the byte-level BPE tokenizer on the train docs", ("corpus",),
          _p("vocab_size", "tokenizer_pattern"), tokenizer,
          lambda r: [r.dir / "tokenizer.json", r.data_dir / "tokenizer.json"], estimate=_secs(10)),
    Stage("shards", "tokenize train/val into token shards", ("tokenizer",), _p(), shards,
          lambda r: [r.data_dir / "shards" / "meta.json"], estimate=_secs(5)),
    Stage("pretrain", "pretrain the model (causal LM)", ("shards",),
          _p("model", "model_config", "max_steps", "batch_size", "seq_len", "lr", "seed", "device",
             "train_config"), pretrain, _pretrain_outputs, estimate=_pretrain_estimate),
    Stage("evaluate", "val loss, unigram entropy, exact-match probes", ("pretrain",),
          _p("eval_max_tokens", "probe_limit", "probe_max_tokens"), evaluate,
          lambda r: [r.dir / "eval.json"], estimate=_secs(30)),
    Stage("sample", "sample continuations of a few prompts", ("pretrain",),
          _p("sample_prompts", "sample_max_tokens", "sample_temperature", "seed"), sample,
          lambda r: [r.dir / "samples.json"], estimate=_secs(5)),
    Stage("sft", "instruction tuning: tinyworld's tasks as chats, 'I don't know' on unseen entities",
          _after("sft"), lambda o: {"sft": o.sft_config, "world": o.seed if o.corpus == "tinyworld" else 0},
          sft, lambda r: [model_dir(r, "sft") / "config.json"], estimate=estimate_sft),
    Stage("dpo", "DPO on held-in preference pairs (right answer vs a plausible wrong one)", _after("dpo"),
          lambda o: {"dpo": o.dpo_config, "seed": o.seed}, dpo, lambda r: [r.dir / "dpo" / "config.json"],
          estimate=estimate_dpo),
    Stage("grpo", "GRPO on arithmetic with a verifiable reward (exact answer)", _after("grpo"),
          lambda o: {"grpo": o.grpo_config, "seed": o.seed}, grpo, lambda r: [r.dir / "grpo" / "config.json"],
          estimate=estimate_grpo),
    Stage("quantize", "weight-only quantization (GPTQ or AWQ) of the last model", _after("quantize"),
          lambda o: {"quant": o.quant_config}, quantize, lambda r: [r.dir / "quantized" / "config.json"],
          estimate=estimate_quantize),
    Stage("measure", "every stage's model on the same held-out sets; size and speed of the quantized model",
          lambda o: tuple(model_chain(o)),
          lambda o: {"probes": o.measure_probes, "pairs": o.measure_pairs, "arith": o.measure_arith,
                     "pair_tasks": list(pair_tasks(o)), "world": o.seed if o.corpus == "tinyworld" else 0},
          measure, lambda r: [r.dir / "measure.json"], estimate=estimate_measure),
    Stage("rag", "knowledge-base questions closed-book vs with retrieval (BM25), asked of the final chat model",
          lambda o: (model_chain(o)[-1],),
          lambda o: {"questions": o.rag_questions, "asked": "chat",
                     "world": o.seed if o.corpus == "tinyworld" else 0}, rag,
          lambda r: [r.dir / "rag.json"], estimate=estimate_rag),
    Stage("export", "write the final model as GGUF and as a Hugging Face folder", lambda o: (model_chain(o)[-1],),
          lambda o: {"formats": o.export_formats, "gguf_type": o.gguf_type}, export, export_outputs,
          estimate=estimate_export),
    Stage("report", "write report.html with figures, the stage table and samples", (),
          lambda o: {}, report, lambda r: [r.dir / "report.html"], cache=False, estimate=_secs(5)),
]

