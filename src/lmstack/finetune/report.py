"""OUT/report.html of a finetuning run, through lmstack.report: headline numbers (mean exact
match before -> after, abstention on unseen entities, accuracy on known ones, the base's bits
per weight, peak memory), the loss curve, a table of the job's steps with per-task exact match
before and after, and the after-training probe rows (with example completions)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lmstack.utils import atomic_write_bytes, atomic_write_text


def _acc(scores: dict | None) -> dict:
    return {t: r["accuracy"] for t, r in (scores or {}).get("tasks", {}).items()}


def headline(summary: dict) -> list[tuple[str, object]]:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    rows = []
    if after.get("mean_accuracy") is not None:
        rows.append(("exact match, mean over tasks: before -> after",
                     f"{before.get('mean_accuracy', 0):.1%} -> {after['mean_accuracy']:.1%}"))
    if after.get("abstain_rate_unseen") is not None:
        rows.append(("says \"I don't know\" on unseen entities", f"{after['abstain_rate_unseen']:.1%}"))
    if after.get("accuracy_known") is not None:
        rows.append(("accuracy on known entities (facts)", f"{after['accuracy_known']:.1%}"))
        rows.append(("abstains on known entities", f"{after['abstain_rate_known']:.1%}"))
    bits = summary.get("base_bits_per_param", {}).get("stored")
    if bits is not None:
        rows.append(("base bits per weight (block linears)", f"{bits:.2f}"))
    if summary.get("peak_train_memory_mb") is not None:
        rows.append(("peak training memory (MiB)", summary["peak_train_memory_mb"]))
    rows.append(("trainable / all parameters", f"{summary['trainable_params']:,} / {summary['num_params']:,}"))
    return rows


def write_report(out: Path, cfg, summary: dict) -> Path:
    from lmstack.report import loss_curve_png, probe_accuracy_png, read_metrics, render_report
    figures = []
    metrics = read_metrics(out / "metrics.jsonl")
    if metrics:
        figures.append(("SFT loss on assistant tokens (nats/token)", loss_curve_png(metrics, title="SFT loss")))
    after_rows = list(((summary.get("after") or {}).get("tasks") or {}).values())
    if after_rows:
        figures.append(("Held-out probes after finetuning, asked as chats: model (greedy) vs always giving the "
                        "task's most common answer", probe_accuracy_png(after_rows)))
    for caption, png in figures:
        name = "loss.png" if caption.startswith("SFT loss") else "probes.png"
        atomic_write_bytes(out / "figures" / name, png)
    before, after = _acc(summary.get("before")), _acc(summary.get("after"))
    stages = []
    if before:
        stages.append({"name": "probes before", "status": "ran", "seconds": 0.0, "numbers": before})
    train = summary["train"]
    stages.append({"name": f"train ({cfg.method})", "status": "ran", "seconds": train["elapsed_s"],
                   "numbers": {k: v for k, v in train.items() if k != "elapsed_s"}})
    if after:
        stages.append({"name": "probes after", "status": "ran", "seconds": 0.0, "numbers": after})
    page = render_report(
        title=f"lmstack finetune: {out.name}",
        subtitle=f"{cfg.method} on {summary['base']}, data {cfg.data} ({summary['examples']['train']} examples), "
                 f"{train['steps']} steps x {cfg.batch_size} rows x {cfg.seq_len} positions; "
                 f"written {time.strftime('%Y-%m-%d %H:%M')}",
        headline=headline(summary), stages=stages, figures=figures, probes=after_rows, samples=[],
        recipe=dataclasses.asdict(cfg))
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
