"""Figures for the run report, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

    png = loss_curve_png(read_metrics("runs/demo/metrics.jsonl"), baselines={"unigram entropy": 5.9})
    png = training_curves_png(read_metrics("runs/demo/metrics.jsonl"), grad_clip=1.0)   # lr, grad norm, tok/s
"""
from __future__ import annotations

import io
import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a trainer's metrics.jsonl; unreadable lines (a torn last write) are skipped."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _series(metrics: list[dict], split: str) -> tuple[list[float], list[float]]:
    rows = [m for m in metrics if m.get("split") == split and "loss" in m and "step" in m]
    return [float(m["step"]) for m in rows], [float(m["loss"]) for m in rows]


def loss_curve_png(metrics: list[dict], baselines: dict[str, float] | None = None,
                   title: str = "Pretraining loss") -> bytes:
    """Train and val loss (nats/token) against step; `baselines` drawn as dashed lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    steps, loss = _series(metrics, "train")
    if steps:
        ax.plot(steps, loss, color="#1f77b4", alpha=0.35, linewidth=1, label="train (per step)")
        if len(loss) >= 10:
            # Bias-corrected exponential moving average (as in Adam): the raw per-step loss is
            # noisy at small batch sizes, and an EMA started at 0 or at loss[0] lags early on.
            ema, smooth = 0.0, []
            for t, v in enumerate(loss, 1):
                ema = 0.9 * ema + 0.1 * v
                smooth.append(ema / (1 - 0.9 ** t))
            ax.plot(steps, smooth, color="#1f77b4", linewidth=2, label="train (EMA 0.9)")
    vsteps, vloss = _series(metrics, "val")
    if vsteps:
        ax.plot(vsteps, vloss, "o-", color="#d62728", linewidth=2, markersize=4, label="val")
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle="--", color=["#2ca02c", "#9467bd", "#8c564b"][i % 3], label=f"{name} ({value:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if steps or vsteps or baselines:
        ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def training_curves_png(metrics: list[dict], grad_clip: float = 0.0) -> bytes:
    """Three panels against step, from the trainer's train lines: learning rate, gradient norm
    (before clipping; `grad_clip` > 0 drawn dashed) and throughput (tokens/s). A panel whose
    key no line has says so instead of staying blank."""
    plt = _pyplot()
    rows = [m for m in metrics if m.get("split") == "train" and "step" in m]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, label in zip(axes, ("lr", "grad_norm", "tok_per_s"),
                              ("learning rate", "gradient norm", "tokens / s")):
        pts = [(float(m["step"]), float(m[key])) for m in rows if isinstance(m.get(key), (int, float))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#1f77b4", linewidth=1.2)
        else:
            ax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        if key == "grad_norm" and grad_clip > 0:
            ax.axhline(grad_clip, linestyle="--", color="#d62728", linewidth=1, label=f"clip {grad_clip:g}")
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def probe_accuracy_png(results: list[dict], title: str = "Held-out probes (exact match)") -> bytes:
    """Grouped bars per task: model accuracy vs the chance baseline. `results`: ProbeResult.to_dict()s."""
    plt = _pyplot()
    tasks = [r["task"] for r in results]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(tasks) + 2), 3.8))
    xs = range(len(tasks))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["accuracy"] for r in results], w, label="model", color="#1f77b4")
    ax.bar([x + w / 2 for x in xs], [r["chance"] for r in results], w, label="chance (majority answer)",
           color="#bbbbbb")
    for x, r in zip(xs, results):
        ax.text(x - w / 2, r["accuracy"] + 0.02, f"{r['accuracy']:.0%}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def grouped_bars_png(groups: list[str], series: dict[str, list[float | None]], title: str,
                     ylabel: str = "share of held-out questions") -> bytes:
    """Bars per group (x axis), one bar per series (e.g. metrics x the models of a run); None = no bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.0))
    w = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * w for g in range(len(groups))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], w,
               label=name)
    ax.set_xticks(list(range(len(groups))), groups, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
