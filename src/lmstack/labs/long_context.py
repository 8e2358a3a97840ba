"""Lab 7: long context. Loss against position past the training length, full attention against
a sliding window, and the point where the context collapses.

Two tiny tinyworld LMs (RoPE) are trained by the Trainer on windows of T tokens; their
context_length allows 4T, so they can be run on sequences four times longer than any they
were trained on. One attends to every earlier token (full), the other only to the W = T/2
most recent (sliding_window). Per-position loss on held-out text up to 4T shows what
happens past T: full attention meets query-key distances it never saw (RoPE rotations it was
never trained on, and more keys to spread its attention over); a window never sees a distance
beyond W, whatever the position.

The collapse point: the first position past T where the loss (moving average over T/2
positions) exceeds the loss of the trained range's second half by THRESHOLD nats.
"""
from __future__ import annotations

import numpy as np

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import position_losses, tiny_lm_config, tinyworld_data, train

THRESHOLD = 0.2   # nats above the in-range loss that count as collapse


def moving_average(x: np.ndarray, w: int) -> np.ndarray:
    """Centered moving average (shorter windows at the ends)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    lo = np.clip(np.arange(len(x)) - w // 2, 0, len(x))
    hi = np.clip(np.arange(len(x)) + w - w // 2, 0, len(x))
    return (c[hi] - c[lo]) / (hi - lo)


def collapse_point(losses: np.ndarray, train_len: int, threshold: float = THRESHOLD) -> tuple[int | None, float]:
    """(first position >= train_len whose smoothed loss exceeds the in-range reference by
    `threshold`, or None; the reference: mean loss over positions [train_len/2, train_len))."""
    ref = float(losses[train_len // 2:train_len].mean())
    smooth = moving_average(losses, train_len // 2)
    over = np.nonzero(smooth[train_len:] > ref + threshold)[0]
    return (int(over[0]) + train_len if over.size else None), ref


def run(ctx: LabContext) -> LabResult:
    T = ctx.pick(32, 64)
    L = 4 * T
    W = T // 2
    steps = ctx.pick(120, 800)
    data = tinyworld_data(ctx.seed, size_mb=ctx.pick(0.2, 1.0))
    held = np.concatenate([data.tokens("val"), data.tokens("test")])
    variants = {"full attention": {}, f"sliding window {W}": {"sliding_window": W}}
    curves, points, refs, beyond = {}, {}, {}, {}
    for name, over in variants.items():
        cfg = tiny_lm_config(data.vocab_size, context_length=L, **over)
        r = train(ctx, name.replace(" ", "-"), cfg, steps=steps, data=data, seq_len=T, batch_size=16, lr=6e-3)
        losses = position_losses(r.model, held, L, ctx.pick(80, 400))
        curves[name] = losses
        points[name], refs[name] = collapse_point(losses, T)
        beyond[name] = float(losses[T:].mean())
    full, win = list(variants)
    p_full, p_win = points[full], points[win]
    holds = (p_full is not None and (p_win is None or p_win > p_full) and beyond[win] < beyond[full])
    where = lambda p: f"at position {p}" if p is not None else f"nowhere up to {L}"   # noqa: E731
    insight = Insight(
        "Full attention collapses past its training length while a sliding window keeps the loss flat",
        holds, f"trained on {T}-token windows, full attention's loss exceeds its in-range level by {THRESHOLD} nats "
               f"{where(p_full)} (mean past {T}: {beyond[full]:.2f} vs {refs[full]:.2f} in range); the {W}-token "
               f"window crosses {where(p_win)} (mean past {T}: {beyond[win]:.2f} vs {refs[win]:.2f})")
    numbers = {"train_len": T, "eval_len": L, "window": W, "steps": steps, "threshold_nats": THRESHOLD,
               "collapse_position": {k: v for k, v in points.items()}, "in_range_loss": refs,
               "mean_loss_beyond_train_len": beyond,
               "loss_by_quarter": {k: [float(v[i * T:(i + 1) * T].mean()) for i in range(4)]
                                   for k, v in curves.items()}}
    series = {k: (list(range(L)), moving_average(v, W).tolist()) for k, v in curves.items()}
    vlines = {f"training length {T}": T}
    for k, p in points.items():
        if p is not None:
            vlines[f"collapse: {k} ({p})"] = p
    figures = [Figure("loss_by_position", f"Held-out loss at each position (moving average over {W}); past {T} the "
                      f"models run on lengths they never trained on", png=plot.curves_png(
                          series, "loss against position", "position", "loss (nats/token)", vlines=vlines))]
    built = [f"two tiny RoPE LMs trained {steps} steps on {T}-token tinyworld windows by the Trainer: full attention "
             f"and a {W}-token sliding window, both with context_length {L}",
             f"per-position loss on {L}-token held-out windows (val + test splits)",
             "the collapse point found from the curve (first smoothed loss above the in-range level + threshold)"]
    return LabResult(built, numbers, figures, insight)
