"""The chat stages' part of report.html: each stage's measured effect, every model on the same
held-out sets, what retrieval adds, how to serve the final model, and a figure per stage.

    tables, figures = chat_sections(run)     # for render_report(tables=..., figures=...)
"""
from __future__ import annotations

import json
from pathlib import Path

from lmstack.pipeline.options import model_chain
from lmstack.pipeline.runner import Run

DASHBOARD = "http://127.0.0.1:8000/"


def serve_line(run: Run) -> str:
    from lmstack.pipeline.chat_stages import final_model
    return f"serve the final model: lmstack serve {final_model(run)}   (dashboard {DASHBOARD}, API {DASHBOARD}v1)"


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def chat_sections(run: Run) -> tuple[list, list]:
    from lmstack.pipeline.measure import LABELS, METRICS
    from lmstack.report.figures import grouped_bars_png, loss_curve_png, read_metrics
    tables, figures = [], []
    m = _read(run.dir / "measure.json") if "measure" in run.records else None
    if m:
        rows = [[e["stage"], e["metric"], e["from"], e["before"], e["after"], round(100 * e["delta"], 1), e["n"],
                 e["verdict"]] for e in m["effects"]]
        tables.append(("Each stage's effect, measured on held-out data",
                       "Greedy answers to questions no stage trained on; a change counts when it exceeds two "
                       "standard errors (binomial, n questions). Where it does not, the stage shows no effect "
                       "at this budget.",
                       ["stage", "measure", "compared with", "before", "after", "change (points)", "n",
                        "verdict"], rows))
        keys = [k for k in METRICS if any(m["rows"][s].get(k) is not None for s in m["models"])]
        header = ["model"] + [METRICS[k][0] for k in keys] + ["file MB", "decode tokens/s"]
        body = []
        for s in m["models"]:
            r = m["rows"][s]
            body.append([LABELS[s]] + [r.get(k) for k in keys] + [r.get("file_mb", ""), r.get("tokens_per_s", "")])
        q = m["rows"].get("quantize")
        if q and "float_tokens_per_s" in q:
            body.append(["(its float model)"] + [""] * len(keys) + [q["float_file_mb"], q["float_tokens_per_s"]])
        tables.append(("Every stage's model on the same held-out sets", "", header, body))
        figures.append(("stages.png", "Every stage's model on the same held-out sets (greedy, exact match)",
                        grouped_bars_png([METRICS[k][0] for k in keys],
                                         {LABELS[s]: [m["rows"][s].get(k) for k in keys] for s in m["models"]},
                                         "Held-out measures per stage")))
    rag = _read(run.dir / "rag.json") if "rag" in run.records else None
    if rag:
        c, b = rag["closed_book"], rag["bm25_top3"]
        tables.append(("Retrieval: knowledge-base questions", "The final model answers questions about entities "
                       "it never saw in training, alone and with the top 3 BM25 chunks of the knowledge base: "
                       + rag.get("verdict", "") + ".",
                       ["", "accuracy", "recall@3", "citation precision", "n"],
                       [["closed book", c["accuracy"], "", "", c["n"]],
                        ["with retrieval", b["accuracy"], b.get("recall@3"), b.get("citation_precision"), b["n"]]]))
    for stage, title in (("sft", "SFT loss"),):
        metrics = read_metrics(run.dir / stage / "metrics.jsonl")
        if stage in run.records and metrics:
            figures.append((f"{stage}_loss.png", f"{title} (nats/token) against step",
                            loss_curve_png(metrics, title=title)))
    for stage in ("dpo", "grpo"):
        if stage not in run.records:
            continue
        for png in sorted((run.dir / stage / "figures").glob("*.png")):
            figures.append((f"{stage}_{png.name}", f"{stage.upper()}: {png.stem} against step", png.read_bytes()))
    if any(s in run.records for s in model_chain(run.opts)[1:]):
        tables.append(("Serve it", "", ["command"], [[serve_line(run)]]))
    return tables, figures
