"""Drawing helpers shared by the labs: matplotlib without a display, figures as PNG bytes, and
the curve plot most labs need (several named series on one axis).

    fig, ax = subplots()
    ax.plot(...)
    png = to_png(fig)
    png = curves_png({"rope": (steps, losses), "none": (steps, losses2)}, "loss", "step", "loss")
"""
from __future__ import annotations

import io

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def subplots(ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 4.0, **kw):
    return pyplot().subplots(nrows, ncols, figsize=(width, height), **kw)


def to_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed (matplotlib keeps open ones alive)."""
    buf = io.BytesIO()
    if fig.get_layout_engine() is None:   # a figure made with layout="constrained" keeps its own
        fig.tight_layout()
    # no timestamp or software tag: the same numbers give byte-identical files
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def smooth(values: list[float], beta: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam): readable curves from noisy steps."""
    out, ema = [], 0.0
    for t, v in enumerate(values, 1):
        ema = beta * ema + (1 - beta) * v
        out.append(ema / (1 - beta ** t))
    return out


def curves_png(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
               *, logx: bool = False, logy: bool = False, smoothed: bool = False,
               hlines: dict[str, float] | None = None, vlines: dict[str, float] | None = None,
               styles: dict[str, str] | None = None) -> bytes:
    """Named (xs, ys) series on one axis; `hlines`/`vlines` are labelled dashed references."""
    fig, ax = subplots()
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, smooth(ys) if smoothed else ys, (styles or {}).get(label, "-"), color=COLORS[i % len(COLORS)],
                label=label, linewidth=1.8, markersize=4)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", color="#555", alpha=0.6 - 0.15 * (i % 3), label=label)
    for label, x in (vlines or {}).items():
        ax.axvline(x, linestyle=":", color="#333", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)


def bars_png(values: dict[str, float], title: str, ylabel: str, *, annotate: str = "{:.2f}",
             colors: list[str] | None = None, hline: tuple[str, float] | None = None) -> bytes:
    """One bar per name, each labelled with its value."""
    fig, ax = subplots(width=max(5.0, 0.9 * len(values) + 2.5))
    names = list(values)
    xs = range(len(names))
    ax.bar(xs, [values[n] for n in names], color=colors or [COLORS[i % len(COLORS)] for i in xs])
    for x, n in zip(xs, names):
        ax.text(x, values[n], annotate.format(values[n]), ha="center", va="bottom", fontsize=8)
    if hline is not None:
        ax.axhline(hline[1], linestyle="--", color="#555", label=hline[0])
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)
