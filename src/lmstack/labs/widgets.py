"""Interactive figures as self-contained HTML pages: inline JavaScript and a <canvas>, the data
embedded as JSON. Nothing is loaded from a network (no CDN), so a page works offline.

    html = points_3d(title, {"rope": {"frames": [...], "labels": [...], "note": "..."}})
    html = slider_bars(title, "temperature", [0.5, 1.0], {"0.5": {"labels": [...], "values": [...]}})

points_3d: named sets of labelled 3-D points given as keyframes (frame f is a list of [x,y,z],
one per point); a slider and a play button move between keyframes (linear in between), the
view turns by itself and can be dragged. slider_bars: one bar chart per slider value.
"""
from __future__ import annotations

import html
import json

_STYLE = ("body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:12px;color:#222}"
          "canvas{border:1px solid #ddd;display:block;margin:6px 0;cursor:grab}"
          "button{margin-right:4px} .note{color:#555;font-size:13px;max-width:760px} label{margin-left:8px}")


def _page(title: str, body: str, data: object, script: str) -> str:
    # json inside <script>: "</" would end the script element early
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><b>{html.escape(title)}</b>{body}"
            f"<script>const DATA={payload};\n{script}</script></body></html>\n")


_POINTS_JS = r"""
const names = Object.keys(DATA.sets);
let cur = names[0], t = 0, yaw = 0.6, pitch = 0.35, playing = false, dragging = null;
const cv = document.getElementById('cv'), g = cv.getContext('2d');
const slider = document.getElementById('t'), note = document.getElementById('note');
const btns = document.getElementById('sets');
names.forEach(n => { const b = document.createElement('button'); b.textContent = n;
  b.onclick = () => { cur = n; draw(); }; btns.appendChild(b); });
slider.oninput = () => { t = slider.value / 1000; draw(); };
document.getElementById('play').onclick = () => { playing = !playing; if (playing && t >= 1) t = 0; };
cv.onmousedown = e => dragging = [e.clientX, e.clientY];
window.onmouseup = () => dragging = null;
window.onmousemove = e => { if (!dragging) return;
  yaw += (e.clientX - dragging[0]) / 150; pitch += (e.clientY - dragging[1]) / 150;
  pitch = Math.max(-1.4, Math.min(1.4, pitch)); dragging = [e.clientX, e.clientY]; draw(); };
function at(set, i) {   // point i at the slider's position, linear between keyframes
  const F = set.frames.length - 1, f = Math.min(F - 1e-9, t * F), k = Math.floor(f), w = f - k;
  const a = set.frames[k][i], b = set.frames[Math.min(k + 1, F)][i];
  return [0, 1, 2].map(d => a[d] + w * (b[d] - a[d]));
}
function project(p) {
  const [x, y, z] = p, cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
  const x1 = cy * x + sy * z, z1 = -sy * x + cy * z, y1 = cp * y - sp * z1, z2 = sp * y + cp * z1;
  const s = DATA.scale * 4 / (4 + z2);
  return [cv.width / 2 + s * x1, cv.height / 2 - s * y1, z2];
}
function draw() {
  const set = DATA.sets[cur], n = set.labels.length;
  g.clearRect(0, 0, cv.width, cv.height);
  const axes = [[1.2, 0, 0], [0, 1.2, 0], [0, 0, 1.2]], o = project([0, 0, 0]);
  axes.forEach((a, i) => { const q = project(a); g.strokeStyle = '#ccc'; g.beginPath(); g.moveTo(o[0], o[1]);
    g.lineTo(q[0], q[1]); g.stroke(); g.fillStyle = '#999'; g.fillText(DATA.axes[i], q[0] + 3, q[1]); });
  const pts = [...Array(n).keys()].map(i => project(at(set, i)));
  g.strokeStyle = 'rgba(80,80,80,0.35)'; g.beginPath();
  pts.forEach((p, i) => i ? g.lineTo(p[0], p[1]) : g.moveTo(p[0], p[1])); g.stroke();
  [...Array(n).keys()].sort((a, b) => pts[b][2] - pts[a][2]).forEach(i => {
    const p = pts[i], hue = Math.round(240 * i / Math.max(1, n - 1));
    g.fillStyle = `hsl(${hue},70%,45%)`; g.beginPath(); g.arc(p[0], p[1], 6, 0, 7); g.fill();
    g.fillStyle = '#222'; g.fillText(set.labels[i], p[0] + 8, p[1] - 6); });
  g.fillStyle = '#222'; g.fillText(`${cur}   t = ${t.toFixed(2)}`, 10, 16);
  note.textContent = set.note || '';
  slider.value = Math.round(t * 1000);
}
function tick() { if (playing) { t = Math.min(1, t + 0.006); if (t >= 1) playing = false; }
  if (!dragging) yaw += 0.004; draw(); requestAnimationFrame(tick); }
tick();
"""


def points_3d(title: str, sets: dict[str, dict], axes: tuple[str, str, str] = ("x", "y", "z"),
              subtitle: str = "") -> str:
    """An animated, draggable 3-D view. sets: name -> {"frames": [frame, ...] (each a list of
    [x, y, z] per point, at least 2 frames), "labels": [str per point], "note": str}.
    Coordinates should lie within about [-1, 1]."""
    for name, s in sets.items():
        if len(s["frames"]) < 2 or any(len(f) != len(s["labels"]) for f in s["frames"]):
            raise ValueError(f"set {name!r}: need >= 2 frames, each with one point per label")
    body = (f"<p class='note'>{html.escape(subtitle)}</p><div id='sets'></div>"
            "<canvas id='cv' width='760' height='430'></canvas>"
            "<button id='play'>play</button><label>encode <input id='t' type='range' min='0' max='1000' "
            "value='0' style='width:420px'></label><p id='note' class='note'></p>")
    data = {"sets": {k: {"frames": [[[round(float(c), 4) for c in p] for p in f] for f in v["frames"]],
                         "labels": list(v["labels"]), "note": v.get("note", "")} for k, v in sets.items()},
            "axes": list(axes), "scale": 240}
    return _page(title, body, data, _POINTS_JS)


_BARS_JS = r"""
const cv = document.getElementById('cv'), g = cv.getContext('2d'), s = document.getElementById('s');
const out = document.getElementById('v'), note = document.getElementById('note');
function draw() {
  const key = DATA.keys[s.value], d = DATA.frames[key], n = d.values.length;
  out.textContent = key; note.textContent = d.note || '';
  g.clearRect(0, 0, cv.width, cv.height);
  const top = DATA.ymax, H = cv.height - 90, W = (cv.width - 60) / n;
  g.strokeStyle = '#ccc'; g.beginPath(); g.moveTo(50, 10); g.lineTo(50, H + 10); g.lineTo(cv.width, H + 10); g.stroke();
  g.fillStyle = '#666'; g.fillText(top.toFixed(2), 8, 14); g.fillText('0', 36, H + 10);
  d.values.forEach((v, i) => {
    const h = H * Math.min(v, top) / top, x = 55 + i * W;
    g.fillStyle = (d.kept && !d.kept[i]) ? '#ddd' : '#1f77b4'; g.fillRect(x, H + 10 - h, W - 4, h);
    g.save(); g.translate(x + W / 2, H + 16); g.rotate(0.9); g.fillStyle = '#222';
    g.fillText(DATA.labels[i], 0, 0); g.restore(); });
}
s.oninput = draw; draw();
"""


def slider_bars(title: str, slider_name: str, keys: list[str], frames: dict[str, dict], labels: list[str],
                subtitle: str = "") -> str:
    """Bars (one per label) that change with a slider over `keys`. frames: key -> {"values":
    [float per label], "kept": [bool per label] (optional: greyed when False), "note": str}."""
    for k in keys:
        if len(frames[k]["values"]) != len(labels):
            raise ValueError(f"frame {k!r}: {len(frames[k]['values'])} values for {len(labels)} labels")
    ymax = max(max(frames[k]["values"]) for k in keys) * 1.05 or 1.0
    body = (f"<p class='note'>{html.escape(subtitle)}</p><label>{html.escape(slider_name)} <input id='s' "
            f"type='range' min='0' max='{len(keys) - 1}' value='0' style='width:380px'></label> <b id='v'></b>"
            "<canvas id='cv' width='760' height='380'></canvas><p id='note' class='note'></p>")
    return _page(title, body, {"keys": keys, "frames": frames, "labels": labels, "ymax": ymax}, _BARS_JS)
