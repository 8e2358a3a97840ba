"""The figures of an alignment run, drawn from its metrics.jsonl into OUT/figures/*.png.

    write_figures("runs/grpo", "grpo")    # reward, kl, heldout, length, loss (those with data)

Each figure plots one quantity against the step: the per-step train value (thin line) and
the held-out measurements (val or sample lines, dots). Drawing needs matplotlib (the `plots`
extra); without it no figures are written and the run says so.
"""
from __future__ import annotations

from pathlib import Path

from lmstack.report.figures import read_metrics

# figure name -> (title, [(split, metric key, label)])
FIGURES = {
    "rm": {"loss": ("Bradley-Terry loss", [("train", "loss", "train"), ("val", "loss", "held-out")]),
           "heldout": ("Pairwise accuracy", [("train", "acc", "train"), ("val", "acc", "held-out")])},
    "dpo": {"loss": ("DPO loss", [("train", "loss", "train"), ("val", "loss", "held-out")]),
            "reward": ("Implicit reward margin", [("train", "margin", "train"), ("val", "margin", "held-out")]),
            "heldout": ("Preference accuracy", [("val", "logp_acc", "held-out: logp chosen > rejected"),
                                                ("val", "reward_acc", "held-out: implicit reward")]),
            "logp": ("Chosen log-prob", [("train", "logp_chosen", "chosen (train)"),
                                         ("train", "logp_rejected", "rejected (train)"),
                                         ("val", "logp_chosen", "chosen (held-out)")])},
    "grpo": {"reward": ("Rollout reward", [("train", "reward", "train rollouts")]),
             "kl": ("KL to reference (k3)", [("train", "kl", "train")]),
             "heldout": ("Held-out exact match", [("sample", "exact_match", "held-out (greedy)"),
                                                  ("sample", "exact_match_sampled", "held-out (sampled, T)")]),
             "length": ("Completion length", [("train", "completion_len", "train rollouts"),
                                              ("sample", "completion_len", "held-out (greedy)")])},
    "ppo": {"reward": ("Reward model score", [("train", "score", "train rollouts"),
                                              ("sample", "rm_score", "held-out")]),
            "kl": ("KL to reference", [("train", "kl", "train rollouts"), ("sample", "kl", "held-out")]),
            "length": ("Completion length", [("train", "completion_len", "train rollouts")]),
            "loss": ("Losses", [("train", "policy_loss", "policy"), ("train", "value_loss", "value")])},
}


def _plot(rows: list[dict], title: str, series, before: dict | None) -> bytes | None:
    from lmstack.report.figures import _png, _pyplot
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = False
    for split, key, label in series:
        pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r and "step" in r]
        if split != "train" and before and key in before and not any(x == 0 for x, _ in pts):  # the start
            pts = [(0, before[key])] + pts
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-" if split != "train" else "-", linewidth=2 if split != "train" else 1, markersize=4,
                label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def write_figures(out: str | Path, method: str, before: dict | None = None) -> list[str]:
    """Draw the method's figures from OUT/metrics.jsonl (and the starting model's held-out
    numbers `before`, drawn at step 0); returns the files written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed (pip install lmstack[plots]); no figures drawn")
        return []
    out = Path(out)
    rows = read_metrics(out / "metrics.jsonl")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, series) in FIGURES[method].items():
        png = _plot(rows, title, series, before)
        if png is not None:
            (out / "figures" / f"{name}.png").write_bytes(png)
            written.append(str(out / "figures" / f"{name}.png"))
    return written
