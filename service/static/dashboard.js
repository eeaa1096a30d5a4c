// consa dashboard: plain JS, no build step. Both pages read the v1 API with the key kept in
// localStorage; nothing is rendered through innerHTML, so job fields cannot inject markup.
"use strict";

const KEY_STORE = "consa.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const REFRESH_MS = 3000;

// -- key handling -------------------------------------------------------------------------------
// A link may carry the key in the fragment (#key=...): the fragment never reaches the server.
// It is moved into localStorage and removed from the address bar at once.
(function takeKeyFromHash() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    localStorage.setItem(KEY_STORE, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const value = document.getElementById("key-input").value.trim();
  if (value) localStorage.setItem(KEY_STORE, value);
  location.reload();
});
document.getElementById("key-input").value = apiKey();

// -- helpers ------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + apiKey() }, options.headers || {});
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (!resp.ok) {
    let problem = null;
    try { problem = await resp.json(); } catch (e) { /* not JSON: keep the status alone */ }
    throw new ApiError(resp.status, problem);
  }
  return resp;
}
async function apiJson(path, options) { return (await api(path, options)).json(); }

// el("td", {class: "x"}, "text", childNode) — text is always set as text, never parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;  // through the CSSOM: the CSP refuses style attributes
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}
const svgEl = (tag, attrs) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
};

function showMessage(text) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.hidden = !text;
}
function explain(err) {
  if (err.status === 401) return "The API key was refused: enter a valid key above (consa keys create NAME makes one).";
  if (err.status === 404) return "Not found (or it belongs to another key).";
  return "Error: " + err.message;
}

const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function statusBadge(status) { return el("span", { class: "status status-" + status }, status); }
// A job works in phases: the search (steps), the evaluation (allocations scored), the export (stages).
const PHASES = ["search", "evaluation", "export"];
function phaseOf(p) {
  const phase = p.phase || "search";
  if (phase === "search") return { phase, done: p.phase_done ?? p.step, total: p.phase_total ?? p.total_steps };
  return { phase, done: p.phase_done, total: p.phase_total };
}
function progressBar(p) {
  if (!p || !p.total_steps) return el("span", { class: "muted" }, "–");
  const { phase, done, total } = phaseOf(p);
  const pct = total ? Math.min(100, (100 * done) / total) : 0;
  return el("div", { class: "progress", "data-phase": phase, title: `${phase} ${done}/${total} (search step ${p.step}/${p.total_steps})` },
    el("div", { class: "progress-fill phase-" + phase, style: `width:${pct.toFixed(1)}%` }),
    el("span", { class: "progress-text" }, `${phase} ${done}/${total}`));
}
// Every phase the job's progress events went through, in order, with the last count seen: a phase is
// done once a later one began (or the job succeeded), current while the job is in it.
function phaseList(points, status) {
  const last = new Map();
  for (const p of points) { const ph = phaseOf(p); last.set(ph.phase, ph); }
  const seen = PHASES.filter((name) => last.has(name));
  return el("ol", { id: "job-phases", class: "phases" }, ...seen.map((name, i) => {
    const { done, total } = last.get(name);
    const finished = i < seen.length - 1 || status === "succeeded";
    const state = finished ? "done" : TERMINAL.includes(status) ? "stopped" : "current";
    return el("li", { class: "phase phase-" + state, "data-phase": name, "data-state": state },
      `${name} ${finished ? total : done}/${total}`);
  }));
}

// -- jobs page ----------------------------------------------------------------------------------
async function jobsPage() {
  const tbody = document.querySelector("#jobs tbody");
  const more = document.getElementById("more");
  const filter = document.getElementById("status-filter");
  let after = null;

  function row(job) {
    const p = job.progress || {};
    return el("tr", { "data-job-id": job.id, "data-status": job.status },
      el("td", {}, el("a", { href: "/dashboard/jobs/" + encodeURIComponent(job.id) }, job.id)),
      el("td", { class: "model" }, job.model),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, progressBar(job.progress)),
      el("td", { class: "num" }, fmt(p.loss, 4)),
      el("td", { class: "num" }, fmt(p.sparsity, 3)),
      el("td", {}, when(job.created_at)));
  }

  async function load(append) {
    const q = new URLSearchParams({ limit: "50" });
    if (filter.value) q.set("status", filter.value);
    if (append && after) q.set("after", after);
    try {
      const page = await apiJson("/v1/jobs?" + q);
      if (!append) tbody.replaceChildren();
      for (const job of page.data) tbody.append(row(job));
      after = page.data.length ? page.data[page.data.length - 1].id : after;
      more.hidden = !page.has_more;
      showMessage(tbody.children.length ? "" : "No jobs yet: submit one with POST /v1/jobs or `consa jobs submit`.");
      return page.data;
    } catch (err) {
      showMessage(explain(err));
      return [];
    }
  }

  filter.addEventListener("change", () => load(false));
  more.addEventListener("click", () => load(true));
  if (!apiKey()) { showMessage("Enter an API key above to see your jobs."); return; }
  await load(false);
  document.body.dataset.loaded = "jobs";  // a marker for tests and scripts
  // Refresh the first page while anything shown is still moving.
  setInterval(() => {
    const moving = [...tbody.querySelectorAll("tr")].some((tr) => !TERMINAL.includes(tr.dataset.status));
    if (moving && more.hidden) load(false);
  }, REFRESH_MS);
}

// -- job page -----------------------------------------------------------------------------------
async function jobPage() {
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const base = "/v1/jobs/" + encodeURIComponent(jobId);
  const points = [];          // progress events: {step, loss, sparsity, target}
  const log = [];
  let eventsAfter = null;
  let artifactsShown = null;  // names + digests of the artifacts on the page

  async function readEvents() {
    for (;;) {
      const q = new URLSearchParams({ limit: "100" });
      if (eventsAfter !== null) q.set("after", String(eventsAfter));
      const page = await apiJson(base + "/events?" + q);
      for (const ev of page.data) {
        eventsAfter = ev.id;
        if (ev.type === "progress" && ev.data) points.push(ev.data);
        log.push(`${when(ev.created_at)}  ${ev.type.padEnd(8)}  ${ev.message}`);
      }
      if (!page.has_more) return;
    }
  }

  function renderJob(job) {
    document.title = "consa · " + job.id;
    document.getElementById("job-id").textContent = job.id;
    document.getElementById("job-status").replaceWith(
      Object.assign(statusBadge(job.status), { id: "job-status" }));
    document.getElementById("job-progress").replaceChildren(progressBar(job.progress), phaseList(points, job.status));
    const error = document.getElementById("job-error");
    error.hidden = !job.error;
    if (job.error) error.textContent = `${job.error.code} (${job.error.type} error): ${job.error.message}`;
    const cancel = document.getElementById("cancel");
    cancel.hidden = !["queued", "running"].includes(job.status);
    const rows = [...Object.entries(job.config || {}), ...Object.entries(job.metadata || {}).map(([k, v]) => ["metadata." + k, v]),
      ["created", when(job.created_at)], ["started", when(job.started_at)], ["finished", when(job.finished_at)]];
    document.querySelector("#config tbody").replaceChildren(
      ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v === null ? "–" : typeof v === "object" ? JSON.stringify(v) : v))));
    document.getElementById("events").textContent = log.slice(-200).join("\n");
    // Until its table exists, the evaluation card says where the evaluation is (its own phase, unit by unit).
    const evalCard = document.getElementById("evaluation");
    if (!evalCard.querySelector("table")) {
      const p = job.progress || {};
      const text = !(job.config || {}).evaluate ? "none (submit with evaluate: true)"
        : p.phase === "evaluation" ? `running: ${p.phase_done}/${p.phase_total} units (baselines built, parts scored)`
        : ["queued", "running", "cancel_requested"].includes(job.status) ? "pending: after the search"
        : "none";
      evalCard.replaceChildren(el("p", { class: "muted", "data-evaluation": p.phase === "evaluation" ? "running" : "none" }, text));
    }
  }

  async function renderArtifacts(artifacts) {
    const key = artifacts.map((a) => a.name + a.sha256).join();
    if (key === artifactsShown) return;   // fetch the heatmap and tables once, not every refresh
    artifactsShown = key;
    if (!artifacts.length) {
      document.querySelector("#artifacts tbody").replaceChildren(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "none yet")));
      return;
    }
    document.querySelector("#artifacts tbody").replaceChildren(...artifacts.map((a) =>
      el("tr", { "data-artifact": a.name },
        el("td", {}, a.name), el("td", { class: "num" }, bytes(a.size)),
        el("td", { class: "mono", title: a.sha256 }, a.sha256.slice(0, 16) + "…"),
        el("td", {}, el("button", { onclick: () => download(a) }, "Download")))));
    // Which artifact is the heatmap and which the evaluation: the API says (`shown_as`, from the
    // artifact registry, consa.core.artifacts), so no file name is written here.
    const heat = artifacts.find((a) => a.shown_as === "image");
    if (heat) {
      const blob = await (await api(base + "/artifacts/" + encodeURIComponent(heat.name))).blob();
      const img = el("img", { id: "heatmap-img", alt: "FA/SWA allocation heatmap", src: URL.createObjectURL(blob) });
      document.getElementById("heatmap").replaceChildren(img);
    }
    const evaluation = artifacts.find((a) => a.shown_as === "table");
    if (evaluation) {
      const text = await (await api(base + "/artifacts/" + encodeURIComponent(evaluation.name))).text();
      document.getElementById("evaluation").replaceChildren(evaluationTable(evaluation.content_type, text));
    }
  }

  // Downloads go through fetch (the Bearer header cannot ride on a plain link), then a blob URL.
  async function download(a) {
    try {
      const blob = await (await api(base + "/artifacts/" + encodeURIComponent(a.name))).blob();
      const link = el("a", { href: URL.createObjectURL(blob), download: a.name });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    } catch (err) { showMessage(explain(err)); }
  }

  document.getElementById("cancel").addEventListener("click", async () => {
    try { renderJob(await apiJson(base + "/cancel", { method: "POST" })); } catch (err) { showMessage(explain(err)); }
  });

  if (!apiKey()) { showMessage("Enter an API key above to see this job."); return; }
  async function refresh() {
    try {
      const job = await apiJson(base);
      await readEvents();
      renderJob(job);
      drawChart(document.getElementById("chart"), points);
      await renderArtifacts((await apiJson(base + "/artifacts")).data);
      document.getElementById("job").hidden = false;
      showMessage("");
      if (!TERMINAL.includes(job.status)) return setTimeout(refresh, REFRESH_MS);
      const placeholder = document.querySelector("#heatmap p");
      if (placeholder) placeholder.textContent = "no heatmap for this job";
      document.body.dataset.loaded = "final";  // a marker for tests and scripts: nothing more will change
    } catch (err) {
      showMessage(explain(err));
    }
  }
  await refresh();
}

// The evaluation artifact as a table, read by its media type: JSON (a list of rows, or
// {name: {metric: value}}) or a markdown pipe table; anything else is shown as text.
function evaluationTable(contentType, text) {
  let rows = null;
  if (contentType === "application/json") {
    let data = JSON.parse(text);
    if (data && !Array.isArray(data) && Array.isArray(data.rows)) data = data.rows;
    if (Array.isArray(data)) rows = data;
    else if (data && typeof data === "object") {
      rows = Object.entries(data).map(([k, v]) => (v && typeof v === "object" ? Object.assign({ name: k }, v) : { name: k, value: v }));
    }
    if (rows) {
      const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
      return table(cols, rows.map((r) => cols.map((c) => r[c])));
    }
  }
  const lines = text.trim().split("\n");
  if (contentType === "text/markdown" && lines.some((l) => l.trim().startsWith("|"))) {
    const cells = lines.filter((l) => l.trim().startsWith("|") && !/^\s*\|[\s:|-]+\|\s*$/.test(l))
      .map((l) => l.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim()));
    return table(cells[0], cells.slice(1));
  }
  return el("pre", {}, text);
}

function table(header, rows) {
  const cell = (v) => (typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(4)) : v === undefined || v === null ? "" : typeof v === "object" ? JSON.stringify(v) : v);
  return el("table", { class: "evaluation" },
    el("thead", {}, el("tr", {}, ...header.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((v) => el("td", {}, cell(v)))))));
}

// Loss (left axis) and expected sparsity + its target (right axis, 0..1) against the step, in SVG.
function drawChart(box, pts) {
  // The evaluation's and export's records repeat the search's last step: one point per search step.
  pts = pts.filter((p) => p.step !== undefined && phaseOf(p).phase === "search");
  if (!pts.length) return;
  const W = 560, H = 260, L = 52, R = 44, T = 12, B = 30;
  const maxStep = Math.max(...pts.map((p) => p.total_steps || p.step), 1);
  const losses = pts.map((p) => p.loss).filter((v) => v !== null && v !== undefined);
  let lo = Math.min(...losses), hi = Math.max(...losses);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const x = (s) => L + ((W - L - R) * s) / maxStep;
  const yLoss = (v) => T + ((H - T - B) * (hi - v)) / (hi - lo);
  const ySparse = (v) => T + (H - T - B) * (1 - v);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", id: "chart-svg" });
  svg.append(svgEl("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
  const line = (key, y, cls) => {
    const d = pts.filter((p) => p[key] !== null && p[key] !== undefined)
      .map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p[key]).toFixed(1)}`).join("");
    if (d) svg.append(svgEl("path", { d, class: "line " + cls }));
  };
  line("target", ySparse, "line-target");
  line("sparsity", ySparse, "line-sparsity");
  line("loss", yLoss, "line-loss");
  const text = (s, attrs) => { const t = svgEl("text", attrs); t.textContent = s; svg.append(t); };
  for (const f of [0, 0.5, 1]) {
    text(fmt(lo + (hi - lo) * (1 - f), 3), { x: L - 6, y: T + (H - T - B) * f + 4, "text-anchor": "end", class: "axis loss" });
    text(fmt(1 - f, 1), { x: W - R + 6, y: T + (H - T - B) * f + 4, class: "axis sparsity" });
  }
  text("0", { x: L, y: H - 10, class: "axis" });
  text(`step ${maxStep}`, { x: W - R, y: H - 10, "text-anchor": "end", class: "axis" });
  const legend = el("div", { class: "legend" },
    el("span", { class: "key loss" }, "loss"), el("span", { class: "key sparsity" }, "sparsity"),
    el("span", { class: "key target" }, "target"));
  box.replaceChildren(svg, legend);
}

if (document.body.dataset.page === "jobs") jobsPage();
else jobPage();
