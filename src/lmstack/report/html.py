"""One self-contained HTML page for a run: headline numbers, figures (PNG embedded as base64),
a table of every stage (status, time, numbers), probe results with examples the model got
right and wrong (whole prompts: a reading task's answer is in its context), samples taken
during training and at the end, and the recipe (YAML).

No external CSS, scripts or images: the file can be mailed, archived or opened offline.
"""
from __future__ import annotations

import base64
import html
from typing import Any

import yaml

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.1em} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:14px;width:100%}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600} .card .l{color:#666;font-size:12px}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#666;font-size:13px}
pre{background:#f7f7f7;padding:8px;white-space:pre-wrap;word-break:break-word;font-size:13px;margin:0}
pre.example{max-height:14em;overflow:auto;margin-bottom:4px}
.ok{color:#1a7f37;font-weight:600} .bad{color:#b42318} .cached{color:#777}
.prompt{color:#555} .completion{color:#0b5cad;font-weight:600}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(value: Any) -> str:
    """Numbers short and readable: 3 significant decimals for floats, thousands separators for ints."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _numbers(d: dict) -> str:
    return "<br>".join(f"{_esc(k)}: <b>{_esc(fmt(v))}</b>" for k, v in d.items()
                       if not isinstance(v, (dict, list)))


def render_report(title: str, subtitle: str, headline: list[tuple[str, Any]], stages: list[dict],
                  figures: list[tuple[str, bytes]], probes: list[dict], samples: list[dict],
                  recipe: dict, training_samples: list[dict] | None = None,
                  tables: list[tuple[str, str, list[str], list[list]]] | None = None) -> str:
    """The page as a string.

    stages:  [{"name", "status", "seconds", "numbers": {...}}]
    figures: [(caption, png_bytes)]
    probes:  ProbeResult.to_dict() rows; samples: [{"prompt", "completion"}]
    training_samples: [{"step", "samples": [{"prompt", "completion"}]}] (greedy, during training)
    tables:  [(title, note, header, rows)] shown after the headline (e.g. each stage's measured effect)
    """
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
           f"<style>{_CSS}</style></head><body>",
           f"<h1>{_esc(title)}</h1><p class='sub'>{_esc(subtitle)}</p>"]
    if headline:
        out.append("<div class='cards'>")
        out += [f"<div class='card'><div class='v'>{_esc(fmt(v))}</div><div class='l'>{_esc(k)}</div></div>"
                for k, v in headline]
        out.append("</div>")

    for title, note, header, rows in tables or []:
        out.append(f"<h2>{_esc(title)}</h2>" + (f"<p>{_esc(note)}</p>" if note else "") + "<table><tr>"
                   + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td class='num'>{_esc(fmt(v))}</td>" if isinstance(v, (int, float))
                                        and not isinstance(v, bool) else f"<td>{_esc(fmt(v))}</td>"
                                        for v in row) + "</tr>")
        out.append("</table>")

    out.append("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>time (s)</th><th>numbers</th></tr>")
    for s in stages:
        cls = {"ran": "ok", "cached": "cached"}.get(s["status"], "bad")
        out.append(f"<tr><td>{_esc(s['name'])}</td><td class='{cls}'>{_esc(s['status'])}</td>"
                   f"<td class='num'>{_esc(fmt(float(s.get('seconds', 0.0))))}</td>"
                   f"<td>{_numbers(s.get('numbers', {}))}</td></tr>")
    out.append("</table>")

    if figures:
        out.append("<h2>Figures</h2>")
        for caption, png in figures:
            b64 = base64.b64encode(png).decode("ascii")
            out.append(f"<figure><img alt='{_esc(caption)}' src='data:image/png;base64,{b64}'>"
                       f"<figcaption>{_esc(caption)}</figcaption></figure>")

    if probes:
        out.append("<h2>Held-out probes (greedy, exact match)</h2><table><tr><th>task</th><th>n</th>"
                   "<th>accuracy</th><th>chance</th><th>examples (prompt &rarr; completion | answer)</th></tr>")
        for r in probes:
            ex = "".join(
                f"<pre class='example'><span class='prompt'>{_esc(e['prompt'])}</span>"
                f"<span class='completion'>{_esc(e['completion'])}</span> "
                f"<span class='{'ok' if e['correct'] else 'bad'}'>| {_esc(e['answer'])} "
                f"{'(right)' if e['correct'] else '(wrong)'}</span></pre>"
                for e in r.get("examples", []))
            out.append(f"<tr><td>{_esc(r['task'])}</td><td class='num'>{r['n']}</td>"
                       f"<td class='num'>{r['accuracy']:.1%}</td><td class='num'>{r['chance']:.1%}</td>"
                       f"<td>{ex}</td></tr>")
        out.append("</table>")

    if training_samples:
        out.append("<h2>Samples during training (greedy)</h2><table><tr><th>step</th>"
                   "<th>prompt &rarr; completion</th></tr>")
        for rec in training_samples:
            cells = "".join(f"<pre class='example'><span class='prompt'>{_esc(x['prompt'])}</span>"
                            f"<span class='completion'>{_esc(x['completion'])}</span></pre>" for x in rec["samples"])
            out.append(f"<tr><td class='num'>{_esc(fmt(rec['step']))}</td><td>{cells}</td></tr>")
        out.append("</table>")

    if samples:
        out.append("<h2>Samples at the end</h2><table><tr><th>prompt &rarr; completion</th></tr>")
        out += [f"<tr><td><pre><span class='prompt'>{_esc(s['prompt'])}</span>"
                f"<span class='completion'>{_esc(s['completion'])}</span></pre></td></tr>" for s in samples]
        out.append("</table>")

    out.append("<h2>Recipe</h2><pre>" + _esc(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
               + "</pre>")
    out.append("</body></html>\n")
    return "\n".join(out)
