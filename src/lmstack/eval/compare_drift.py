"""Drift of a server's inputs between time windows (lmstack eval compare LOG reports it).

    report = input_drift(records, window_s=3600)     # records: the request log's, with "time", "input"
    report["windows"][k]   # {"start", "end", "n", "mean_chars", "mean_prompt_tokens",
                           #  "length_ks", "length_ks_p", "tokens_ks", "tokens_ks_p", "char_js", "drifted"}

Windows: consecutive spans of `window_s` seconds from the first record (none given: the
log's time range cut in two halves). Every window is compared with the first, the
reference, on three statistics of the requests' input text:

- length: the two-sample Kolmogorov-Smirnov statistic D (the largest gap between the two
  empirical CDFs of input length in characters) and its asymptotic p-value,
  Q_KS(sqrt(n*m/(n+m)) * D) with Q_KS(x) = 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 x^2), the
  limit (Kolmogorov) distribution, scipy.stats.kstwobign (fine for the hundreds of requests
  a window holds; scipy's ks_2samp is exact or finite-n for small samples);
- prompt tokens: the same on the prompts' token counts;
- content: the Jensen-Shannon divergence (base 2, in [0, 1]) between the two windows'
  character distributions, each the character counts of all its inputs, normalised.

A window "drifted" when a KS p-value is below `alpha` (default 0.01) or the divergence is
above `js_threshold` (default 0.1). Windows with fewer than `min_n` records are reported
but not judged (drifted: null).
"""
from __future__ import annotations

import math
from collections import Counter


def ks_2samp(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sample KS statistic D and its asymptotic two-sided p-value (see the module doc)."""
    if not a or not b:
        raise ValueError("ks_2samp needs two non-empty samples")
    xs, ys = sorted(a), sorted(b)
    n, m = len(xs), len(ys)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        v = min(xs[i], ys[j])
        while i < n and xs[i] == v:
            i += 1
        while j < m and ys[j] == v:
            j += 1
        d = max(d, abs(i / n - j / m))
    return d, kolmogorov_sf(math.sqrt(n * m / (n + m)) * d)


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution."""
    if x <= 0:
        return 1.0
    if x < 0.2:                 # the series converges slowly there, and the value is 1 to double precision
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence (base 2) between two count distributions."""
    sp, sq = sum(p.values()), sum(q.values())
    if sp == 0 or sq == 0:
        raise ValueError("js_divergence needs two non-empty distributions")
    total = 0.0
    for key in set(p) | set(q):
        a, b = p.get(key, 0) / sp, q.get(key, 0) / sq
        mid = (a + b) / 2
        if a:
            total += 0.5 * a * math.log2(a / mid)
        if b:
            total += 0.5 * b * math.log2(b / mid)
    return max(0.0, total)


def _windows(records: list[dict], window_s: float | None) -> list[tuple[float, float, list[dict]]]:
    times = [r["time"] for r in records]
    t0, t1 = min(times), max(times)
    if window_s is None:
        mid = (t0 + t1) / 2
        cuts = [(t0, mid), (mid, t1)]
    else:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s}")
        count = max(1, math.ceil((t1 - t0) / window_s + 1e-12)) if t1 > t0 else 1
        cuts = [(t0 + k * window_s, t0 + (k + 1) * window_s) for k in range(count)]
    out = []
    for k, (a, b) in enumerate(cuts):
        last = k == len(cuts) - 1
        out.append((a, b, [r for r in records if a <= r["time"] < b or (last and r["time"] == b)]))
    return out


def input_drift(records: list[dict], window_s: float | None = None, alpha: float = 0.01,
                js_threshold: float = 0.1, min_n: int = 5) -> dict:
    """Compare every time window's inputs with the first window's (see the module doc).
    `records`: dicts with "time" (seconds), "input" (text) and optionally "prompt_tokens"."""
    records = [r for r in records if isinstance(r.get("time"), (int, float)) and isinstance(r.get("input"), str)]
    if not records:
        return {"window_s": window_s, "windows": [], "reference": None}
    wins = _windows(records, window_s)
    ref = wins[0][2]
    ref_len = [len(r["input"]) for r in ref]
    ref_tok = [r["prompt_tokens"] for r in ref if isinstance(r.get("prompt_tokens"), int)]
    ref_chars = Counter("".join(r["input"] for r in ref))
    rows = []
    for a, b, rs in wins:
        lengths = [len(r["input"]) for r in rs]
        tokens = [r["prompt_tokens"] for r in rs if isinstance(r.get("prompt_tokens"), int)]
        row = {"start": a, "end": b, "n": len(rs),
               "mean_chars": sum(lengths) / len(rs) if rs else None,
               "mean_prompt_tokens": sum(tokens) / len(tokens) if tokens else None,
               "length_ks": None, "length_ks_p": None, "tokens_ks": None, "tokens_ks_p": None,
               "char_js": None, "drifted": None}
        if rs and ref:
            row["length_ks"], row["length_ks_p"] = ks_2samp(ref_len, lengths)
            if tokens and ref_tok:
                row["tokens_ks"], row["tokens_ks_p"] = ks_2samp(ref_tok, tokens)
            chars = Counter("".join(r["input"] for r in rs))
            if chars and ref_chars:
                row["char_js"] = js_divergence(ref_chars, chars)
            if len(rs) >= min_n and len(ref) >= min_n:
                ps = [p for p in (row["length_ks_p"], row["tokens_ks_p"]) if p is not None]
                row["drifted"] = bool(any(p < alpha for p in ps) or (row["char_js"] or 0.0) > js_threshold)
        rows.append(row)
    return {"window_s": window_s, "alpha": alpha, "js_threshold": js_threshold, "reference": 0, "windows": rows}
