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
// The server applies the engine's own sampler (temperature, top-k, top-p, min-p) to the whole
// vocabulary, so entropy and "kept" are the model's; it caches the prompt's logits, so moving a
// slider costs a round trip, not a forward.
const SAMPLER = { data: null, seq: 0, timer: null };

function tokenLabel(t) {
  // A token that is part of a multi-byte character has no text of its own: show its bytes.
  if (t.text.includes("\ufffd")) return "<0x" + t.bytes.toUpperCase() + ">";
  // Make whitespace visible: a leading space or a newline is what a token often is.
  return JSON.stringify(t.text).slice(1, -1).replace(/ /g, "␣");
}

function samplerSettings() {
  return { temperature: parseFloat($("s-temperature").value), top_k: parseInt($("s-top-k").value, 10),
           top_p: parseFloat($("s-top-p").value), min_p: parseFloat($("s-min-p").value) };
}

function renderSampler() {
  const d = SAMPLER.data;
  if (!d) return;
  const h = d.sampled_entropy;
  $("sampler-entropy").textContent = `${h.toFixed(3)} nats (${(h / Math.LN2).toFixed(3)} bits)`;
  $("sampler-kept").textContent = `${d.kept} of ${d.n_vocab}`;
  $("sampler-entropy-full").textContent = `${d.entropy.toFixed(3)} nats`;
  const bars = $("sampler-bars");
  bars.textContent = "";
  const shown = Math.min(25, d.tokens.length);
  for (let i = 0; i < shown; i++) {
    const t = d.tokens[i];
    const row = document.createElement("div");
    row.className = "bar-row" + (t.p > 0 ? "" : " cut");
    row.dataset.prob = t.p.toFixed(6);
    row.title = `id ${t.id} · logit ${t.logit.toFixed(3)} · p(T=1) ${t.prob.toExponential(2)}`;
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = tokenLabel(t);
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = (100 * t.p).toFixed(2) + "%";
    track.append(fill);
    const pr = document.createElement("span");
    pr.className = "bar-prob";
    pr.textContent = (100 * t.p).toFixed(1) + "%";
    row.append(label, track, pr);
    bars.append(row);
  }
  // What these bars show, for scripts and tests: the settings of the answer drawn.
  Object.assign(bars.dataset, Object.fromEntries(Object.entries(d.settings).map(([k, v]) => [k, String(v)])));
}

async function runSampler() {
  const seq = ++SAMPLER.seq, settings = samplerSettings();
  if (!SAMPLER.data) $("sampler-bars").textContent = "loading…";
  try {
    const d = await postJSON("/v1/internal/next_token_distribution",
                             { prompt: $("sampler-prompt").value, top_n: 25, ...settings });
    if (seq !== SAMPLER.seq) return;            // a newer request is on its way
    SAMPLER.data = { ...d, settings };
    renderSampler();
  } catch (e) {
    if (seq !== SAMPLER.seq) return;
    SAMPLER.data = null;
    $("sampler-bars").textContent = "error: " + e.message;
  }
}

function scheduleSampler() {
  clearTimeout(SAMPLER.timer);
  SAMPLER.timer = setTimeout(runSampler, 40);
}

// ---------------------------------------------------------------- token visualizer
const PALETTE = ["#fde68a", "#bfdbfe", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa", "#a5f3fc", "#e5e7eb"];
let tokTimer = null;

async function runTokenize() {
  try {
    const d = await postJSON("/v1/internal/tokenize", { prompt: $("tok-input").value });
    const spans = $("tok-spans");
    spans.textContent = "";
    // One span per printable piece: a character cut across tokens (an emoji, a CJK character)
    // is shown once, with all the ids that make it, as `lmstack tokenizer viz` does.
    d.spans.forEach((sp, i) => {
      const toks = d.tokens.slice(sp.first, sp.first + sp.ids.length);
      const s = document.createElement("span");
      s.className = "tok" + (toks.some((t) => t.special) ? " special" : "") + (toks.length > 1 ? " multi" : "");
      s.style.background = PALETTE[i % PALETTE.length];
      s.textContent = sp.text;
      const nBytes = toks.reduce((a, t) => a + t.n_bytes, 0);
      s.title = (toks.length > 1 ? `ids ${sp.ids.join(" + ")} (one character in ${toks.length} tokens)` : `id ${sp.ids[0]}`) +
        ` · ${nBytes} byte${nBytes === 1 ? "" : "s"} · 0x${toks.map((t) => t.bytes).join(" ")}`;
      s.dataset.id = sp.ids.join(" ");
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
  for (const id of ["s-temperature", "s-top-k", "s-top-p", "s-min-p"]) $(id).addEventListener("input", scheduleSampler);
  $("tok-input").addEventListener("input", () => { clearTimeout(tokTimer); tokTimer = setTimeout(runTokenize, 200); });
  $("att-run").addEventListener("click", runAttention);
  $("att-prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); runAttention(); }
  });
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
    await loadModelInfo();
  } catch (e) {
    $("model-info").textContent = "error: " + e.message;
  }
}

// A base model continues text; in a chat it has never learnt when to answer or stop. Say so.
async function loadModelInfo() {
  const r = await fetch("/v1/internal/model_info", { headers: headers() });
  const info = r.ok ? await r.json() : { chat_tuned: null };
  const notice = $("chat-notice");
  notice.hidden = info.chat_tuned !== false;
  notice.textContent = info.chat_tuned === false
    ? `This model is not chat-tuned (${info.chat_tuned_reason}). Its replies here continue the ` +
      "chat-formatted prompt and may ramble or never stop; finetune it for chat (lmstack finetune), " +
      "or use the Sampler and Tokens views on plain text."
    : "";
}

init();
