// The deltaserve dashboard. Plain browser JavaScript, no build step and no dependency: it calls the
// same routes as any client (/tasks, /memory, /backbone, /health, /metrics, PUT /tasks/{name},
// POST /tasks/{name}/predict) with relative URLs, so it also works behind a proxy under a sub-path.
// Every text from the server goes in through textContent (never innerHTML): task names, labels and
// descriptions are user input.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const EXAMPLES = {
  "sequence-classification": "a gripping, funny film with a terrific cast",
  "token-classification": "Angela Merkel met Emmanuel Macron in Paris to talk about Airbus.",
  "embedding": "A man is playing a guitar.",
};
const EMBEDDING_SECOND = "Someone plays an instrument.";

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.setAttribute("class", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const grouped = (n) => Math.round(n).toLocaleString("en-US");

function humanBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${v} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

// Exact bytes first (what /memory says), then the readable size.
const bytesText = (n) => `${grouped(n)} B · ${humanBytes(n)}`;

// The key (API key, tenant key or admin token) is kept for this browser session only (sessionStorage:
// gone when the tab closes) and sent with every request; the server decides what it may see and do.
const KEY_ITEM = "deltaserve-key";
const storedKey = () => sessionStorage.getItem(KEY_ITEM) || "";

async function api(path, options = {}) {
  const key = storedKey();
  const headers = { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...(options.headers || {}) };
  const response = await fetch(path, { cache: "no-store", ...options, headers });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = body && typeof body === "object" ? (body.detail ?? body.error ?? JSON.stringify(body)) : body;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

// ------------------------------------------------------------------ tasks table and try-it cards

let taskKey = "";

async function refreshTasks() {
  const { tasks } = await api("tasks");
  const body = document.querySelector("#tasks tbody");
  body.replaceChildren(...tasks.map((t) => el("tr", { "data-task": t.name },
    el("td", {}, el("code", { text: t.name })),
    el("td", { text: t.method }),
    el("td", { text: t.task_type + (t.problem_type === "regression" ? " (regression)" : "") }),
    el("td", { class: "num", text: String(t.version) }),
    el("td", { class: "num", text: grouped(t.delta_bytes), title: humanBytes(t.delta_bytes) }),
    el("td", { class: "labels", text: t.labels.join(", ") }),
  )));
  document.getElementById("tasks-empty").hidden = tasks.length > 0;
  // Rebuild the try-it cards only when the set of tasks changed, so typed text survives a refresh.
  const key = tasks.map((t) => `${t.name}:${t.task_type}:${t.problem_type}`).join("|");
  if (key !== taskKey) {
    taskKey = key;
    renderTryCards(tasks);
  }
}

function renderTryCards(tasks) {
  const list = document.getElementById("try-list");
  const kept = new Map([...list.children].map((card) => [card.dataset.task, card]));
  list.replaceChildren(...tasks.map((t) => kept.get(t.name) || tryCard(t)));
}

function tryCard(task) {
  const tokens = task.task_type === "token-classification";
  // An embedding task compares two texts: both vectors in one request, their cosine similarity shown.
  const embedding = task.task_type === "embedding";
  const text = el("textarea", { class: "text-a", "aria-label": `text for ${task.name}` });
  text.value = EXAMPLES[task.task_type] || "";
  const textB = tokens ? null : el("input", { class: "text-b",
    placeholder: embedding ? "second text, to compare with the first" : "second text (sentence-pair tasks only)",
    "aria-label": `second text for ${task.name}` });
  if (embedding) textB.value = EMBEDDING_SECOND;
  const result = el("div", { class: "result" });
  const button = el("button", { type: "button", class: "predict", text: embedding ? "Compare" : "Predict" });
  const card = el("div", { class: "try", "data-task": task.name },
    el("h3", {}, el("code", { text: task.name }), " ", el("span", { class: "muted", text: `${task.method} · ${task.task_type}` })),
    text, ...(textB ? [textB] : []), button, result);
  button.addEventListener("click", async () => {
    button.disabled = true;
    const a = text.value;
    const b = textB ? textB.value.trim() : "";
    try {
      if (embedding && !b) throw new Error("type a second text to compare the first with");
      const answer = await api(`tasks/${encodeURIComponent(task.name)}/predict`, {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ inputs: embedding ? [a, b] : (b ? [[a, b]] : a) }),
      });
      if (embedding) showSimilarity(result, answer.predictions, answer.version);
      else showPrediction(result, answer.predictions[0], a, answer.version);
    } catch (err) {
      result.replaceChildren(el("p", { class: "error", text: err.message }));
    } finally {
      button.disabled = false;
    }
  });
  return card;
}

// Cosine similarity of the two texts' vectors (their dot product when the task normalises them).
function showSimilarity(result, predictions, version) {
  const [u, v] = predictions.map((p) => p.embedding);
  let dot = 0, uu = 0, vv = 0;
  for (let i = 0; i < u.length; i += 1) { dot += u[i] * v[i]; uu += u[i] * u[i]; vv += v[i] * v[i]; }
  const cosine = dot / Math.sqrt(uu * vv);
  result.replaceChildren(
    el("p", {}, "cosine similarity ", el("span", { class: "verdict cosine", "data-value": String(cosine),
      text: cosine.toFixed(4) })),
    el("p", { class: "muted small size", "data-size": String(u.length),
      text: `vectors of ${u.length} numbers · answered by version ${version}` }));
}

function showPrediction(result, prediction, text, version) {
  const meta = el("p", { class: "muted small", text: `answered by version ${version}` });
  if ("value" in prediction) {  // regression
    result.replaceChildren(el("p", {}, "value ", el("span", { class: "verdict", text: prediction.value.toFixed(4) })), meta);
  } else if ("entities" in prediction) {  // token classification: the text with its entities marked
    result.replaceChildren(markEntities(text, prediction.entities), meta);
  } else {  // sequence classification: one bar per label
    const bars = Object.entries(prediction.scores).map(([label, score]) => el("div",
      { class: label === prediction.label ? "bar top" : "bar", "data-label": label, "data-score": String(score) },
      el("span", { class: "name", text: label, title: label }),
      el("span", { class: "track" }, el("span", { class: "fill", style: `display:block;width:${(score * 100).toFixed(2)}%` })),
      el("span", { class: "value", text: `${(score * 100).toFixed(1)} %` })));
    result.replaceChildren(
      el("p", {}, "label ", el("span", { class: "verdict", text: prediction.label }),
        ` (${(prediction.score * 100).toFixed(1)} %)`),
      ...bars, meta);
  }
}

function markEntities(text, entities) {
  const p = el("p", { class: "marked" });
  let at = 0;
  for (const e of [...entities].sort((x, y) => x.start - y.start)) {
    if (e.start < at) continue;  // overlapping spans cannot both be marked inline
    p.append(text.slice(at, e.start));
    const score = typeof e.score === "number" ? ` ${(e.score * 100).toFixed(1)} %` : "";
    p.append(el("mark", { class: `ent ent-${e.label}`, "data-label": e.label, title: `${e.label}${score}` },
      text.slice(e.start, e.end), el("sup", { text: e.label })));
    at = e.end;
  }
  p.append(text.slice(at));
  if (!entities.length) p.append(el("span", { class: "muted small", text: "  (no entity found)" }));
  return p;
}

// ------------------------------------------------------------------ memory card

async function refreshMemory() {
  const memory = await api("memory");
  for (const [key, value] of Object.entries(memory)) {
    const dd = document.getElementById(`mem-${key}`);
    if (!dd) continue;
    dd.dataset.value = String(value);
    if (key === "num_tasks") dd.textContent = String(value);
    else if (key === "saved_fraction") dd.textContent = `${(value * 100).toFixed(1)} %`;
    else dd.textContent = bytesText(value);
  }
  drawMemoryChart(memory);
}

// Bytes against the number of tasks, as in the masking paper: one fine-tuned copy per task grows by a
// whole backbone per task, one shared backbone grows by a delta per task. Solid: the tasks this server
// holds, in /memory's order (the last points are /memory's totals). Dashed: more tasks of the mean size.
function drawMemoryChart(memory) {
  const svg = document.getElementById("memory-chart");
  const W = 520, H = 260, left = 64, right = 16, top = 30, bottom = 34;
  const n = memory.num_tasks;
  const B = memory.backbone_bytes;
  const serving = [B];
  const copies = [0];
  for (const t of memory.tasks) {
    serving.push(serving.at(-1) + t.delta_bytes);
    copies.push(copies.at(-1) + B + t.head_bytes);
  }
  const nMax = Math.max(8, 2 * n);
  const meanDelta = n ? memory.delta_bytes_total / n : 0;
  const meanCopy = n ? (memory.finetuned_copies_bytes / n) : B;
  const yMax = Math.max(memory.finetuned_copies_bytes + (nMax - n) * meanCopy, serving.at(-1) + (nMax - n) * meanDelta);
  const x = (k) => left + (k / nMax) * (W - left - right);
  const y = (v) => H - bottom - (v / yMax) * (H - top - bottom);
  const path = (values, from) => values.map((v, i) => `${i ? "L" : "M"}${x(from + i).toFixed(1)},${y(v).toFixed(1)}`).join("");
  const nodes = [];
  for (let i = 0; i <= 4; i += 1) {
    const v = (yMax * i) / 4;
    nodes.push(el("svg:line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }),
      el("svg:text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", text: humanBytes(v) }));
  }
  const step = nMax <= 10 ? 1 : Math.ceil(nMax / 10);
  for (let k = 0; k <= nMax; k += step) {
    nodes.push(el("svg:text", { x: x(k), y: H - bottom + 15, "text-anchor": "middle", text: String(k) }));
  }
  nodes.push(
    el("svg:line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }),
    el("svg:line", { class: "axis", x1: left, x2: left, y1: top - 6, y2: H - bottom }),
    el("svg:text", { x: (left + W - right) / 2, y: H - 4, "text-anchor": "middle", text: "number of tasks" }),
    el("svg:path", { class: "copies projected", d: `M${x(n)},${y(copies.at(-1))}L${x(nMax)},${y(copies.at(-1) + (nMax - n) * meanCopy)}` }),
    el("svg:path", { class: "serving projected", d: `M${x(n)},${y(serving.at(-1))}L${x(nMax)},${y(serving.at(-1) + (nMax - n) * meanDelta)}` }),
    el("svg:path", { class: "copies", d: path(copies, 0), "data-series": "copies" }),
    el("svg:path", { class: "serving", d: path(serving, 0), "data-series": "serving" }),
    el("svg:circle", { class: "dot-copies", cx: x(n), cy: y(copies.at(-1)), r: 4 }),
    el("svg:circle", { class: "dot-serving", cx: x(n), cy: y(serving.at(-1)), r: 4 }),
    el("svg:rect", { class: "legend-copies", x: left + 8, y: 6, width: 12, height: 4 }),
    el("svg:text", { x: left + 24, y: 11, text: "one fine-tuned copy per task" }),
    el("svg:rect", { class: "legend-serving", x: left + 200, y: 6, width: 12, height: 4 }),
    el("svg:text", { x: left + 216, y: 11, text: "one shared backbone + deltas" }),
    el("svg:text", { x: W - right, y: 24, "text-anchor": "end", text: `now: ${n} tasks · dashed: more of the mean size` }),
  );
  svg.replaceChildren(...nodes);
}

// ------------------------------------------------------------------ live figures from /metrics

// The Prometheus text format: `name{label="value",...} number` lines; `#` lines are comments.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, key, value] of (m[2] || "").matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[key] = value;
    }
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

const total = (samples, name, keep = () => true) =>
  samples.filter((s) => s.name === name && keep(s.labels)).reduce((sum, s) => sum + s.value, 0);

let previous = null;
const rpsHistory = [];

async function refreshLive() {
  const samples = parseMetrics(await api("metrics"));
  const now = performance.now() / 1000;
  const figures = {
    requests: total(samples, "deltaserve_requests_total", (l) => l.route !== "/metrics"),
    rows: total(samples, "deltaserve_batch_rows_sum"),
    batches: total(samples, "deltaserve_batch_requests_count"),
    batchRequests: total(samples, "deltaserve_batch_requests_sum"),
    batchTasks: total(samples, "deltaserve_batch_tasks_sum"),
    hits: total(samples, "deltaserve_cache_hits_total") || total(samples, "deltaserve_cache_hits"),
    misses: total(samples, "deltaserve_cache_misses_total") || total(samples, "deltaserve_cache_misses"),
    queue: total(samples, "deltaserve_queue_depth"),
    tokens: total(samples, "deltaserve_batch_tokens_total"),
    padded: total(samples, "deltaserve_batch_padded_tokens_total"),
  };
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  if (previous) {
    const dt = Math.max(now - previous.at, 1e-3);
    const rate = (key) => Math.max(0, figures[key] - previous[key]) / dt;
    set("live-rps", rate("requests").toFixed(1));
    set("live-rows", rate("rows").toFixed(1));
    set("live-batches", rate("batches").toFixed(1));
    rpsHistory.push(rate("requests"));
    if (rpsHistory.length > 60) rpsHistory.shift();
    drawSparkline(rpsHistory);
  }
  const mean = (sum) => (figures.batches ? (sum / figures.batches).toFixed(2) : "–");
  set("live-batch-requests", mean(figures.batchRequests));
  set("live-batch-rows", mean(figures.rows));
  set("live-batch-tasks", mean(figures.batchTasks));
  set("live-cache", `${grouped(figures.hits)} / ${grouped(figures.misses)}`);
  const lookups = figures.hits + figures.misses;
  set("live-hit-rate", lookups ? `${((figures.hits / lookups) * 100).toFixed(1)} %` : "–");
  set("live-queue", String(figures.queue));
  set("live-padding", figures.padded ? `${((figures.tokens / figures.padded) * 100).toFixed(1)} %` : "–");
  previous = { ...figures, at: now };
}

function drawSparkline(values) {
  const svg = document.getElementById("live-chart");
  const W = 520, H = 90, pad = 6;
  const top = Math.max(1, ...values);
  const x = (i) => pad + (i / 59) * (W - 2 * pad);
  const y = (v) => H - 16 - (v / top) * (H - 30);
  const line = values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
  const area = `${line}L${x(values.length - 1).toFixed(1)},${H - 16}L${x(0)},${H - 16}Z`;
  svg.replaceChildren(
    el("svg:path", { class: "spark", d: area }),
    el("svg:text", { x: pad, y: 11, text: `requests/s, last ${values.length * 2} s (max ${top.toFixed(1)})` }),
    el("svg:line", { class: "axis", x1: pad, x2: W - pad, y1: H - 16, y2: H - 16 }),
  );
}

// ------------------------------------------------------------------ header and upload form

async function refreshHeader() {
  const health = document.getElementById("health");
  try {
    const h = await api("health");
    health.textContent = h.status;
    health.className = "pill ok";
  } catch (err) {
    health.textContent = "unreachable";
    health.className = "pill down";
    throw err;
  }
}

async function loadBackbone() {
  const b = await api("backbone");
  document.getElementById("backbone").textContent =
    `backbone ${b.name} · ${b.num_layers} layers · hidden ${b.hidden_size} · fingerprint ${String(b.fingerprint).slice(0, 12)}`;
}

function wireUpload() {
  const form = document.getElementById("upload-form");
  const out = document.getElementById("upload-result");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("upload-name").value.trim();
    const file = document.getElementById("upload-file").files[0];
    const data = new FormData();
    data.append("file", file);
    out.className = "";
    out.textContent = `uploading ${file.name} (${grouped(file.size)} B) …`;
    try {
      const info = await api(`tasks/${encodeURIComponent(name)}`, { method: "PUT", body: data });
      out.className = "ok";
      out.textContent = `${info.name}: version ${info.version} stored (${info.method}, ${info.task_type}, ${grouped(info.delta_bytes)} B)`;
      await Promise.all([refreshTasks(), refreshMemory()]);
    } catch (err) {
      out.className = "error";
      out.textContent = err.message;
    }
  });
}

function wireKey() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("key");
  input.value = storedKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
    document.body.removeAttribute("data-loaded");
    loadAll();
  });
}

// Everything the page shows; a refusal (401 without the key the server asks for) shows in the key's status.
function loadAll() {
  const status = document.getElementById("key-status");
  quietly(loadBackbone)();
  return Promise.all([refreshTasks(), refreshMemory(), refreshHeader()])
    .then(() => {
      status.textContent = "";
      document.body.setAttribute("data-loaded", "true");
    })
    .catch((err) => {
      status.textContent = err.message;
    });
}

// ------------------------------------------------------------------ start

// A failed poll shows in the page (the health pill) rather than as an unhandled rejection.
const quietly = (job) => () => job().catch(() => {});

document.addEventListener("DOMContentLoaded", () => {
  wireUpload();
  wireKey();
  loadAll();
  refreshLive().catch(() => {});
  setInterval(quietly(refreshLive), 2000);
  setInterval(quietly(() => Promise.all([refreshTasks(), refreshMemory(), refreshHeader()])), 10000);
});
