"""The HTML of a lab (index.html) and of the gallery that links every lab.

Pages are self-contained: CSS inline, PNG figures embedded as base64, interactive figures
embedded as an iframe `srcdoc` (their own files are written next to the page too). Nothing
is fetched from a network, so a page opens offline, mailed or archived.
"""
from __future__ import annotations

import base64
import html
from typing import Any

from lmstack.labs.base import LabResult
from lmstack.labs.registry import LabSpec
from lmstack.report.html import fmt

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1020px;margin:2em auto;padding:0 1em;
     color:#222;line-height:1.45}
h1{margin-bottom:.1em} .q{color:#555;font-size:1.1em;margin-top:.2em}
.insight{border-left:5px solid #1a7f37;background:#f0f9f2;padding:.7em 1em;margin:1.2em 0;font-size:1.05em}
.insight.bad{border-color:#b42318;background:#fdf1f0}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:14px}
th,td{border:1px solid #ddd;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1.2em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:13px} iframe{width:100%;height:560px;border:1px solid #ddd}
.note{color:#8a5a00} .foot{color:#777;font-size:12px;margin-top:2em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px} .card h3{margin:.1em 0 .3em}
.card img{width:100%;border:1px solid #eee} .ok{color:#1a7f37} .bad{color:#b42318} .miss{color:#8a5a00}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def flatten(numbers: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested numbers as (dotted.key, value) rows; lists of scalars are shown inline."""
    rows: list[tuple[str, Any]] = []
    for k, v in numbers.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += flatten(v, key + ".")
        elif isinstance(v, (list, tuple)):
            shown = ", ".join(fmt(x) for x in v[:24]) + (f", ... ({len(v)} values)" if len(v) > 24 else "")
            rows.append((key, f"[{shown}]"))
        else:
            rows.append((key, fmt(v)))
    return rows


def lab_page(spec: LabSpec, result: LabResult, seed: int, quick: bool, seconds: float) -> str:
    """index.html of one lab."""
    ins = result.insight
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Lab {spec.number}: {_esc(spec.title)}</title>"
           f"<style>{_CSS}</style></head><body>",
           f"<h1>Lab {spec.number}: {_esc(spec.title)}</h1><p class='q'>{_esc(spec.question)}</p>",
           f"<div class='insight{'' if ins.holds else ' bad'}'><b>Insight.</b> {_esc(ins.sentence)}</div>",
           "<h2>What was built</h2><ul>" + "".join(f"<li>{_esc(b)}</li>" for b in result.built) + "</ul>"]
    if result.notes:
        out.append("<ul>" + "".join(f"<li class='note'>{_esc(n)}</li>" for n in result.notes) + "</ul>")
    if result.figures:
        out.append("<h2>Figures</h2>")
    for f in result.figures:
        if f.png is not None:
            b64 = base64.b64encode(f.png).decode("ascii")
            body = f"<img alt='{_esc(f.caption)}' src='data:image/png;base64,{b64}'>"
        else:
            body = f"<iframe title='{_esc(f.caption)}' srcdoc=\"{_esc(f.html)}\"></iframe>"
        out.append(f"<figure>{body}<figcaption>{_esc(f.caption)} (<a href='{_esc(f.filename)}'>"
                   f"{_esc(f.filename)}</a>)</figcaption></figure>")
    out.append("<h2>Numbers</h2><table><tr><th>number</th><th>value</th></tr>")
    out += [f"<tr><td>{_esc(k)}</td><td class='num'>{_esc(v)}</td></tr>" for k, v in flatten(result.numbers)]
    out.append("</table>")
    mode = "--quick" if quick else "full"
    out.append(f"<p class='foot'>{mode} run, seed {seed}, {seconds:.1f} s. Reproduce: <code>lmstack lab {spec.name}"
               f"{' --quick' if quick else ''} --seed {seed}</code>. All numbers are in numbers.json.</p>")
    out.append("</body></html>\n")
    return "\n".join(out)


def gallery_page(entries: list[dict], quick: bool, seed: int) -> str:
    """The gallery: one card per lab. entries: {"spec", "status" (ok|failed|missing),
    "insight" (dict) or "message", "thumbnail" (relative path or None)}."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>lmstack labs</title><style>{_CSS}</style>"
           f"</head><body><h1>lmstack labs</h1><p class='q'>Build it, plot it, break it: one command per lab "
           f"({'--quick' if quick else 'full'} runs, seed {seed}).</p><div class='cards'>"]
    for e in entries:
        spec: LabSpec = e["spec"]
        head = f"<h3>{spec.number}. {_esc(spec.title)}</h3><p>{_esc(spec.question)}</p>"
        if e["status"] == "ok":
            ins = e["insight"]
            cls = "ok" if ins["holds"] else "bad"
            thumb = f"<img alt='' src='{_esc(e['thumbnail'])}'>" if e.get("thumbnail") else ""
            body = (f"<a href='{_esc(spec.name)}/index.html'>{thumb}</a><p class='{cls}'>{_esc(ins['sentence'])}</p>"
                    f"<a href='{_esc(spec.name)}/index.html'>open the lab</a>")
        elif e["status"] == "missing":
            body = f"<p class='miss'><b>Not run: missing dependency.</b> {_esc(e['message'])}</p>"
        else:
            body = f"<p class='bad'><b>Failed.</b> {_esc(e['message'])}</p>"
        out.append(f"<div class='card'>{head}{body}</div>")
    out.append("</div></body></html>\n")
    return "\n".join(out)
