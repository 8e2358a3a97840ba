// lmstack dashboard: chat (streamed SSE), live sampler, token visualizer, attention maps.
// Vanilla JS against this server's own endpoints; no libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let MODEL = null;

// ---------------------------------------------------------------- HTTP helpers
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function postJSON(path, body) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({ error: { message: "HTTP " + r.status } }));
  if (!r.ok) throw new Error(data.error ? data.error.message : "HTTP " + r.status);
  return data;
}

// Reads `data: ...` events from a fetch response; calls onEvent(obj) for each JSON event.
async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        onEvent(JSON.parse(payload));
      }
    }
  }
}

// Show each slider's value next to it.
function bindOutputs() {
  for (const out of document.querySelectorAll("output[for]")) {
    const input = $(out.htmlFor.value || out.getAttribute("for"));
    const show = () => { out.textContent = input.value; };
    input.addEventListener("input", show);
    show();
  }
}

// ---------------------------------------------------------------- tabs
function showView(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === name);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("active", v.id === "view-" + name);
  if (name === "tokens") runTokenize();
  if (name === "sampler" && !SAMPLER.data) runSampler();
}

// ---------------------------------------------------------------- chat
const CHAT = { history: [], controller: null };

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return body;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || CHAT.controller) return;
  $("chat-input").value = "";
  addMessage("user", text);
  CHAT.history.push({ role: "user", content: text });
  const messages = [];
  const system = $("chat-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...CHAT.history);
  const body = {
    model: MODEL ? MODEL.id : undefined, messages, stream: true,
    stream_options: { include_usage: true },
    temperature: parseFloat($("chat-temperature").value),
    top_p: parseFloat($("chat-top-p").value),
    top_k: parseInt($("chat-top-k").value, 10),
    min_p: parseFloat($("chat-min-p").value),
    max_tokens: parseInt($("chat-max-tokens").value, 10),
  };
  const seed = $("chat-seed").value;
  if (seed !== "") body.seed = parseInt(seed, 10);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  CHAT.controller = new AbortController();
  $("chat-send").disabled = true; $("chat-stop").disabled = false;
  $("chat-status").textContent = "generating…";
  const t0 = performance.now();
  let nTokens = 0, tFirst = null, reply = "", finish = null, usage = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: CHAT.controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : "HTTP " + r.status);
    }
    await readSSE(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          if (tFirst === null) tFirst = performance.now();
          reply += c.delta.content;
          nTokens += 1;
          out.textContent = reply;
          out.parentElement.dataset.chunks = nTokens;     // how many streamed pieces arrived
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    });
    CHAT.history.push({ role: "assistant", content: reply });
    const dt = (performance.now() - t0) / 1000;
    const ttft = tFirst === null ? "–" : ((tFirst - t0) / 1000).toFixed(2) + " s";
    const toks = usage ? usage.completion_tokens : nTokens;
    $("chat-status").textContent = `${toks} tokens in ${dt.toFixed(2)} s · first token ${ttft} · ` +
      `finish: ${finish}` + (usage ? ` · prompt ${usage.prompt_tokens} (cached ${usage.prompt_tokens_details.cached_tokens})` : "");
  } catch (e) {
    if (e.name === "AbortError") {
      CHAT.history.push({ role: "assistant", content: reply });
      $("chat-status").textContent = "stopped";
    } else {
      out.parentElement.classList.add("error");
      out.textContent = reply + (reply ? "\n" : "") + "error: " + e.message;
      CHAT.history.pop();
      $("chat-status").textContent = "";
    }
  } finally {
    out.parentElement.classList.remove("streaming");
    CHAT.controller = null;
    $("chat-send").disabled = false; $("chat-stop").disabled = true;
  }
}

// ---------------------------------------------------------------- live sampler
const SAMPLER = { data: null };

function tokenLabel(t) {
  // A token that is part of a multi-byte character has no text of its own: show its bytes.
  if (t.text.includes("\ufffd")) return "<0x" + t.bytes.toUpperCase() + ">";
  // Make whitespace visible: a leading space or a newline is what a token often is.
  return JSON.stringify(t.text).slice(1, -1).replace(/ /g, "␣");
}

// The filter chain on the server's top-N logits; returns probabilities (0 = cut).
function samplerProbs(tokens, temperature, topK, topP, minP) {
  const n = tokens.length;
  const probs = new Array(n).fill(0);
  if (n === 0) return probs;
  if (temperature < 1e-5) {                        // greedy: all mass on the argmax
    probs[0] = 1;                                  // tokens arrive sorted by logit
    return probs;
  }
  const z = tokens.map((t) => t.logit / temperature);
  const zmax = Math.max(...z);
  let p = z.map((v) => Math.exp(v - zmax));
  const keep = new Array(n).fill(true);
  if (topK > 0) for (let i = topK; i < n; i++) keep[i] = false;   // sorted: rank i >= k is cut
  let total = p.reduce((a, b, i) => a + (keep[i] ? b : 0), 0);
  if (topP < 1) {                                   // smallest prefix whose mass reaches top_p
    let cum = 0;
    for (let i = 0; i < n; i++) {
      if (!keep[i]) continue;
      if (cum >= topP * total) keep[i] = false;
      cum += p[i];
    }
  }
  if (minP > 0) {
    const pmax = p[0];
    for (let i = 0; i < n; i++) if (p[i] < minP * pmax) keep[i] = false;
  }
  total = p.reduce((a, b, i) => a + (keep[i] ? b : 0), 0);
  for (let i = 0; i < n; i++) probs[i] = keep[i] ? p[i] / total : 0;
  return probs;
}

function entropy(probs) {
  let h = 0;
  for (const q of probs) if (q > 0) h -= q * Math.log(q);
  return Math.max(0, h);
}

function renderSampler() {
  const d = SAMPLER.data;
  if (!d) return;
  const probs = samplerProbs(d.tokens, parseFloat($("s-temperature").value), parseInt($("s-top-k").value, 10),
                             parseFloat($("s-top-p").value), parseFloat($("s-min-p").value));
  const h = entropy(probs);
  $("sampler-entropy").textContent = `${h.toFixed(3)} nats (${(h / Math.LN2).toFixed(3)} bits)`;
  $("sampler-kept").textContent = `${probs.filter((q) => q > 0).length} of ${d.tokens.length}`;
  $("sampler-entropy-full").textContent = `${d.entropy.toFixed(3)} nats`;
  const bars = $("sampler-bars");
  bars.textContent = "";
  const shown = Math.min(25, d.tokens.length);
  for (let i = 0; i < shown; i++) {
    const row = document.createElement("div");
    row.className = "bar-row" + (probs[i] > 0 ? "" : " cut");
    row.dataset.prob = probs[i].toFixed(6);
    row.title = `id ${d.tokens[i].id} · logit ${d.tokens[i].logit.toFixed(3)} · p(T=1) ${d.tokens[i].prob.toExponential(2)}`;
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = tokenLabel(d.tokens[i]);
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = (100 * probs[i]).toFixed(2) + "%";
    track.append(fill);
    const pr = document.createElement("span");
    pr.className = "bar-prob";
    pr.textContent = (100 * probs[i]).toFixed(1) + "%";
    row.append(label, track, pr);
    bars.append(row);
  }
}

async function runSampler() {
  $("sampler-bars").textContent = "loading…";
  try {
    SAMPLER.data = await postJSON("/v1/internal/next_token_distribution",
                                  { prompt: $("sampler-prompt").value, top_n: 256 });
    renderSampler();
  } catch (e) {
    SAMPLER.data = null;
    $("sampler-bars").textContent = "error: " + e.message;
  }
}

// ---------------------------------------------------------------- token visualizer
const PALETTE = ["#fde68a", "#bfdbfe", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa", "#a5f3fc", "#e5e7eb"];
let tokTimer = null;

async function runTokenize() {
  try {
    const d = await postJSON("/v1/internal/tokenize", { prompt: $("tok-input").value });
    const spans = $("tok-spans");
    spans.textContent = "";
    d.tokens.forEach((t, i) => {
      const s = document.createElement("span");
      s.className = "tok" + (t.special ? " special" : "");
      s.style.background = PALETTE[i % PALETTE.length];
      s.textContent = t.text;
      s.title = `id ${t.id} · ${t.n_bytes} byte${t.n_bytes === 1 ? "" : "s"} · 0x${t.bytes}`;
      s.dataset.id = t.id;
      spans.append(s);
    });
    $("tok-ids").textContent = JSON.stringify(d.tokens.map((t) => t.id));
    $("tok-stats").innerHTML = "";
    for (const [k, v] of [["tokens", d.n_tokens], ["bytes", d.n_bytes], ["characters", d.n_chars],
                          ["bytes / token", d.bytes_per_token.toFixed(2)]]) {
      const div = document.createElement("div");
      div.innerHTML = `${k} <b></b>`;
      div.querySelector("b").textContent = v;
      $("tok-stats").append(div);
    }
  } catch (e) {
    $("tok-spans").textContent = "error: " + e.message;
  }
}

// ---------------------------------------------------------------- attention maps
const ATT = { data: null, layer: 0, head: 0 };

// A viridis-like ramp: 0 -> dark purple, 1 -> yellow.
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(v) {
  const x = Math.min(1, Math.max(0, v)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x)), f = x - i;
  const c = RAMP[i].map((a, k) => Math.round(a + f * (RAMP[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// Draws a (T, T) map: row = query position, column = key position.
function drawMap(canvas, map, labels) {
  const ctx = canvas.getContext("2d");
  const T = map.length, pad = labels ? 90 : 0;
  const cell = (canvas.width - pad) / T;
  ctx.fillStyle = "white";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  // Causal rows spread their mass over q+1 keys, so late rows look dark on an absolute
  // scale; scaling each row to its own max shows where each query looks.
  const rowNorm = $("att-rownorm").checked;
  for (let q = 0; q < T; q++) {
    const scale = rowNorm ? Math.max(...map[q]) || 1 : 1;
    for (let k = 0; k < T; k++) {
      ctx.fillStyle = colour(map[q][k] / scale);
      const x0 = Math.floor(pad + k * cell), y0 = Math.floor(pad + q * cell);
      ctx.fillRect(x0, y0, Math.floor(pad + (k + 1) * cell) - x0, Math.floor(pad + (q + 1) * cell) - y0);
    }
  }
  if (!labels) return;
  ctx.fillStyle = "#1d2330";
  ctx.font = `${Math.min(12, Math.max(7, cell - 2))}px monospace`;
  ctx.textBaseline = "middle";
  labels.forEach((t, i) => {
    const s = t.length > 10 ? t.slice(0, 9) + "…" : t;
    ctx.textAlign = "right";
    ctx.fillText(s, pad - 4, pad + (i + 0.5) * cell);
    ctx.save();
    ctx.translate(pad + (i + 0.5) * cell, pad - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(s, 0, 0);
    ctx.restore();
  });
}

function renderAttention() {
  const d = ATT.data;
  if (!d) return;
  const grid = $("att-grid");
  grid.textContent = "";
  const heads = d.attentions[ATT.layer];
  heads.forEach((map, h) => {
    const cellDiv = document.createElement("div");
    cellDiv.className = "att-cell" + (h === ATT.head ? " selected" : "");
    const c = document.createElement("canvas");
    c.width = c.height = 120;
    c.dataset.head = h;
    drawMap(c, map, null);
    const cap = document.createElement("div");
    cap.textContent = `L${ATT.layer} H${h}`;
    cellDiv.append(c, cap);
    cellDiv.addEventListener("click", () => { ATT.head = h; renderAttention(); });
    grid.append(cellDiv);
  });
  const labels = d.tokens.map((t) => tokenLabel(t));
  drawMap($("att-canvas"), heads[ATT.head], labels);
  $("att-status").textContent = `${d.tokens.length} tokens · ${d.n_layer} layers × ${d.n_head} heads · ` +
    `layer ${ATT.layer}, head ${ATT.head} enlarged (rows: queries, columns: keys)`;
}

async function runAttention() {
  $("att-status").textContent = "computing…";
  try {
    ATT.data = await postJSON("/v1/internal/attention", { prompt: $("att-prompt").value });
    const sel = $("att-layer");
    sel.textContent = "";
    for (let l = 0; l < ATT.data.n_layer; l++) sel.add(new Option(`layer ${l}`, l));
    ATT.layer = Math.min(ATT.layer, ATT.data.n_layer - 1);
    ATT.head = Math.min(ATT.head, ATT.data.n_head - 1);
    sel.value = ATT.layer;
    renderAttention();
  } catch (e) {
    ATT.data = null;
    $("att-grid").textContent = "";
    $("att-status").textContent = "error: " + e.message;
  }
}

function hoverAttention(ev) {
  const d = ATT.data;
  if (!d) return;
  const canvas = $("att-canvas"), rect = canvas.getBoundingClientRect();
  const T = d.tokens.length, pad = 90, cell = (canvas.width - pad) / T;
  const k = Math.floor((ev.clientX - rect.left - pad) / cell), q = Math.floor((ev.clientY - rect.top - pad) / cell);
  if (q < 0 || k < 0 || q >= T || k >= T) { $("att-hover").textContent = ""; return; }
  const w = d.attentions[ATT.layer][ATT.head][q][k];
  $("att-hover").textContent = `query ${q} "${tokenLabel(d.tokens[q])}" → key ${k} "${tokenLabel(d.tokens[k])}": ${w.toFixed(4)}`;
}

// ---------------------------------------------------------------- start
async function init() {
  $("api-key").value = localStorage.getItem("lmstack-api-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("lmstack-api-key", $("api-key").value); loadModel(); });
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => showView(t.dataset.view));
  bindOutputs();
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => CHAT.controller && CHAT.controller.abort());
  $("chat-clear").addEventListener("click", () => { CHAT.history = []; $("chat-log").textContent = ""; });
  $("sampler-run").addEventListener("click", runSampler);
  for (const id of ["s-temperature", "s-top-k", "s-top-p", "s-min-p"]) $(id).addEventListener("input", renderSampler);
  $("tok-input").addEventListener("input", () => { clearTimeout(tokTimer); tokTimer = setTimeout(runTokenize, 200); });
  $("att-run").addEventListener("click", runAttention);
  $("att-layer").addEventListener("change", () => { ATT.layer = parseInt($("att-layer").value, 10); renderAttention(); });
  $("att-canvas").addEventListener("mousemove", hoverAttention);
  $("att-rownorm").addEventListener("change", renderAttention);
  await loadModel();
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const d = await r.json();
    if (!r.ok) throw new Error(d.error ? d.error.message : "HTTP " + r.status);
    MODEL = d.data[0];
    $("model-info").textContent = `${MODEL.id} · context ${MODEL.max_model_len}`;
    // Leave room for the prompt: a reply may use at most a quarter of the context by default.
    $("chat-max-tokens").max = MODEL.max_model_len;
    $("chat-max-tokens").value = Math.min(128, Math.floor(MODEL.max_model_len / 4));
    $("chat-max-tokens").dispatchEvent(new Event("input"));
  } catch (e) {
    $("model-info").textContent = "error: " + e.message;
  }
}

init();
