// consa dashboard: plain JS, no build step. The pages (jobs, job, compare) read the v1 API with the key
// kept in localStorage; nothing is rendered through innerHTML, so job fields cannot inject markup.
"use strict";

const KEY_STORE = "consa.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const REFRESH_MS = 3000;
// Artifacts read as data rather than shown: their names in the artifact registry (consa.core.artifacts).
const MANIFEST = "manifest.json";     // the allocation; its sparsity_achieved is the share of SWA units
const RECORDS = "evaluation.json";    // the evaluation's records: loss, retrieval_acc, ... per method

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
    this.problem = problem || {};  // RFC 9457: detail, code, errors (per field: loc, msg)
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
const jobPath = (id) => "/v1/jobs/" + encodeURIComponent(id);
const artifactPath = (id, name) => jobPath(id) + "/artifacts/" + encodeURIComponent(name);
const jobLink = (id) => el("a", { href: "/dashboard/jobs/" + encodeURIComponent(id) }, id);

// Deleting is for ended jobs only (the API answers 409 otherwise) and cannot be undone: ask first.
async function deleteJob(id) {
  if (!confirm(`Delete job ${id} and all its artifacts? This cannot be undone.`)) return false;
  try {
    await api(jobPath(id), { method: "DELETE" });
    return true;
  } catch (err) {
    showMessage(explain(err));
    return false;
  }
}

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
function duration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
// From the job's start to its end (or now).
function elapsedS(job) {
  if (!job.started_at) return null;
  return ((job.finished_at ? Date.parse(job.finished_at) : Date.now()) - Date.parse(job.started_at)) / 1000;
}
// The rest of the search at its pace so far: the search's own clock (elapsed_s, from the first step of
// this attempt) over the steps this attempt has done (a resumed one began at start_step). The evaluation
// and export that follow have no pace to go by until they run, so they are left out (their phase bar
// shows them).
function etaS(job) {
  const p = job.progress;
  const done = p ? p.step - (p.start_step || 0) : 0;
  if (TERMINAL.includes(job.status) || !p || phaseOf(p).phase !== "search" || done <= 0 || !p.elapsed_s) return null;
  return (p.elapsed_s / done) * (p.total_steps - p.step);
}
// The allocation's achieved share of SWA units, read from its manifest once per job (it does not change).
// Not progress.sparsity: that is the gates' expected sparsity ŝ, which can sit far from the target.
const achievedCache = new Map();
function achievedSparsity(id) {
  if (!achievedCache.has(id)) {
    achievedCache.set(id, apiJson(artifactPath(id, MANIFEST)).then((m) => m.sparsity_achieved ?? null,
      () => { achievedCache.delete(id); return null; }));  // not published yet: ask again next time
  }
  return achievedCache.get(id);
}
const hasAllocation = (job) => job.status === "succeeded" || ["evaluation", "export"].includes((job.progress || {}).phase);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const whenShort = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "short", timeStyle: "short" }) : "–");
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

// A job's events, oldest first, from state.after on. Each claim of the job by a worker logs a status
// event "running": counting them gives each progress record the attempt it belongs to.
const eventState = () => ({ after: null, attempt: 0, points: [], log: [] });
async function readEvents(id, state) {
  for (;;) {
    const q = new URLSearchParams({ limit: "1000" });
    if (state.after !== null) q.set("after", String(state.after));
    const page = await apiJson(jobPath(id) + "/events?" + q);
    for (const ev of page.data) {
      state.after = ev.id;
      if (ev.type === "status" && ev.data && ev.data.status === "running") state.attempt++;
      if (ev.type === "progress" && ev.data) state.points.push(Object.assign({ attempt: state.attempt }, ev.data));
      state.log.push(`${when(ev.created_at)}  ${ev.type.padEnd(8)}  ${ev.message}`);
    }
    if (!page.has_more) return state;
  }
}
// The search's points split by attempt: a retried job's attempts are separate series, not one line
// drawn back over itself. A step that goes backwards starts a series too (a resume from a saved step).
// (The evaluation's and export's records repeat the search's last step: one point per search step.)
const isSearchPoint = (p) => p.step !== undefined && phaseOf(p).phase === "search";
function attemptSeries(points) {
  const series = [];
  let last = null, prev = -Infinity;
  for (const p of points.filter(isSearchPoint)) {
    if (!last || p.attempt !== last.attempt || p.step <= prev) series.push(last = { attempt: p.attempt, points: [] });
    last.points.push(p);
    prev = p.step;
  }
  return series.map((s, i) => ({ slot: i, label: `attempt ${i + 1}`, points: s.points }));
}

// -- the submit form: built from the API's schema of the job body --------------------------------
// Every field, its default, bounds, choices and help come from the OpenAPI document the API serves
// (its JobCreate: consa.core.config's settings), so the form never lists fields of its own.
async function jobSchema() {
  const doc = await (await fetch("/openapi.json")).json();
  const resolve = (s) => (s && s.$ref ? doc.components.schemas[s.$ref.split("/").pop()] : s);
  return resolve(doc.paths["/v1/jobs"].post.requestBody.content["application/json"].schema);
}

function schemaField(name, prop, required) {
  // A nullable setting is anyOf [type, null]: its non-null branch has the type and the bounds.
  const s = Object.assign({}, prop, (prop.anyOf || []).find((b) => b.type !== "null"));
  const has = (v) => v !== undefined && v !== null;
  let input;
  if (s.enum) {
    input = el("select", {}, has(s.default) ? null : el("option", { value: "" }, required ? "choose…" : "(server default)"),
      ...s.enum.map((v) => el("option", { value: v }, v)));
  } else if (s.type === "boolean") {
    input = el("input", { type: "checkbox" });
  } else if (s.type === "integer" || s.type === "number") {
    input = el("input", { type: "number", step: s.type === "integer" ? "1" : "any" });
    const min = s.minimum ?? s.exclusiveMinimum, max = s.maximum ?? s.exclusiveMaximum;
    if (has(min)) input.min = min;
    if (has(max)) input.max = max;
  } else if (s.type === "object") {
    input = el("textarea", { rows: "2", placeholder: "key=value, one a line" });
  } else {
    input = el("input", { type: "text" });
    if (has(s.maxLength)) input.maxLength = s.maxLength;
  }
  input.name = name;
  input.id = "field-" + name;
  input.required = required && s.type !== "boolean";
  if (s.type === "boolean") input.checked = s.default === true;
  else if (has(s.default) && s.type !== "object") input.value = s.default;
  const bounds = [s.minimum !== undefined && `≥ ${s.minimum}`, s.exclusiveMinimum !== undefined && `> ${s.exclusiveMinimum}`,
    s.maximum !== undefined && `≤ ${s.maximum}`, s.exclusiveMaximum !== undefined && `< ${s.exclusiveMaximum}`].filter(Boolean);
  const notes = [required ? "required" : has(s.default) ? `default ${JSON.stringify(s.default)}` : "default: the server's",
    bounds.length ? bounds.join(", ") : null].filter(Boolean).join(" · ");
  const box = el("div", { class: "field", "data-field": name },
    el("label", { for: input.id }, name, required ? el("span", { class: "req" }, " *") : null),
    input,
    el("small", { class: "help" }, [prop.description || s.description, notes].filter(Boolean).join(" — ")));
  // What the body gets: only what differs from the default, so the server's defaults apply to the rest.
  box.read = () => {
    if (s.type === "boolean") return input.checked === (s.default === true) ? undefined : input.checked;
    const v = input.value.trim();
    if (v === "") return undefined;
    if (s.type === "object") {
      const pairs = v.split("\n").map((l) => l.trim()).filter(Boolean).map((l) => {
        const at = l.indexOf("=");
        if (at < 1) throw new Error(`${name}: "${l}" is not key=value`);
        return [l.slice(0, at).trim(), l.slice(at + 1).trim()];
      });
      return Object.fromEntries(pairs);
    }
    const value = s.type === "integer" || s.type === "number" ? Number(v) : v;
    return value === s.default ? undefined : value;
  };
  return box;
}

async function submitForm(onSubmitted) {
  const form = document.getElementById("submit-form");
  const fieldsBox = document.getElementById("submit-fields");
  const status = document.getElementById("submit-status");
  const errorBox = document.getElementById("submit-error");
  let fields;
  try {
    const schema = await jobSchema();
    const required = new Set(schema.required || []);
    // Required fields first, then the schema's order (the settings' own order).
    const names = Object.keys(schema.properties).sort((a, b) => required.has(b) - required.has(a));
    fields = names.map((n) => schemaField(n, schema.properties[n], required.has(n)));
    fieldsBox.replaceChildren(...fields);
    form.dataset.ready = "true";  // a marker for tests and scripts
  } catch (err) {
    fieldsBox.replaceChildren(el("p", { class: "error" }, "Could not read the job settings from /openapi.json: " + err.message));
    return;
  }
  function showProblem(err) {
    errorBox.replaceChildren(el("strong", {}, err.status ? `${err.status} ${err.problem.code || ""}`.trim() + ": " : ""),
      err.status === 401 ? explain(err) : err.message);
    errorBox.hidden = false;
    // A field the API names (loc ["body", field, ...]) gets its message under it.
    for (const e of (err.problem && err.problem.errors) || []) {
      const loc = e.loc || [];
      const field = fields.find((f) => f.dataset.field === String(loc[0] === "body" ? loc[1] : loc[0]));
      if (field) {
        field.classList.add("invalid");
        field.append(el("small", { class: "field-error" }, e.msg));
      }
    }
  }
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errorBox.hidden = true;
    for (const f of fields) { f.classList.remove("invalid"); f.querySelectorAll(".field-error").forEach((n) => n.remove()); }
    const button = document.getElementById("submit-job");
    button.disabled = true;
    status.textContent = "submitting…";
    try {
      const body = {};
      for (const f of fields) { const v = f.read(); if (v !== undefined) body[f.dataset.field] = v; }
      const job = await apiJson("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      status.replaceChildren("submitted ", Object.assign(jobLink(job.id), { id: "submitted-job" }));
      await onSubmitted(job);
    } catch (err) {
      status.textContent = "";
      showProblem(err);
    } finally {
      button.disabled = false;
    }
  });
}

// -- jobs page ----------------------------------------------------------------------------------
async function jobsPage() {
  const tbody = document.querySelector("#jobs tbody");
  const more = document.getElementById("more");
  const filter = document.getElementById("status-filter");
  const compare = document.getElementById("compare");
  const selected = new Set();  // job ids ticked for the comparison; kept across the table's refreshes
  let after = null;

  function row(job) {
    const p = job.progress || {};
    const config = job.config || {};
    const pick = el("input", { type: "checkbox", class: "pick", "aria-label": "select " + job.id });
    pick.checked = selected.has(job.id);
    pick.addEventListener("change", () => {
      if (pick.checked) selected.add(job.id); else selected.delete(job.id);
      compare.disabled = selected.size < 2;
    });
    const achieved = el("td", { class: "num achieved", title: `the gates' expected sparsity ŝ at the last step: ${fmt(p.sparsity, 3)}` }, "–");
    if (hasAllocation(job)) {
      achievedSparsity(job.id).then((v) => { if (v !== null) { achieved.textContent = fmt(v, 2); achieved.dataset.value = v; } });
    }
    const elapsed = elapsedS(job), eta = etaS(job);
    const remove = async () => { if (await deleteJob(job.id)) { selected.delete(job.id); tr.remove(); errorRow?.remove(); } };
    const tr = el("tr", { "data-job-id": job.id, "data-status": job.status },
      el("td", {}, pick),
      el("td", {}, jobLink(job.id)),
      el("td", { class: "model", title: job.model }, job.model),
      el("td", { class: "granularity" }, config.granularity ?? "–"),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, progressBar(job.progress)),
      el("td", { class: "num" }, fmt(p.loss, 4)),
      el("td", { class: "num target" }, fmt(config.sparsity, 2)),
      achieved,
      el("td", { class: "num elapsed", "data-s": elapsed ?? "" }, duration(elapsed)),
      el("td", { class: "num eta", "data-s": eta ?? "" }, duration(eta)),
      el("td", { title: when(job.created_at) }, whenShort(job.created_at)),
      el("td", {}, TERMINAL.includes(job.status) ? el("button", { class: "delete", onclick: remove }, "Delete") : null));
    // A failed job's error, whole, on a row of its own under the job's.
    const errorRow = job.error ? el("tr", { class: "error-row", "data-error-of": job.id },
      el("td", {}), el("td", { colspan: "12", class: "row-error" }, `${job.error.code}: ${job.error.message}`)) : null;
    return [tr, errorRow].filter(Boolean);
  }

  async function load(append) {
    const q = new URLSearchParams({ limit: "50" });
    if (filter.value) q.set("status", filter.value);
    if (append && after) q.set("after", after);
    try {
      const page = await apiJson("/v1/jobs?" + q);
      if (!append) tbody.replaceChildren();
      for (const job of page.data) tbody.append(...row(job));
      after = page.data.length ? page.data[page.data.length - 1].id : after;
      more.hidden = !page.has_more;
      showMessage(tbody.querySelector("tr[data-job-id]") ? "" : "No jobs yet: submit one with New job above, POST /v1/jobs or `consa jobs submit`.");
      return page.data;
    } catch (err) {
      showMessage(explain(err));
      return [];
    }
  }

  filter.addEventListener("change", () => load(false));
  more.addEventListener("click", () => load(true));
  compare.addEventListener("click", () => {
    location.href = "/dashboard/compare?" + new URLSearchParams({ jobs: [...selected].join(",") });
  });
  submitForm(() => load(false));
  if (!apiKey()) { showMessage("Enter an API key above to see your jobs."); return; }
  await load(false);
  document.body.dataset.loaded = "jobs";  // a marker for tests and scripts
  // Refresh the first page while anything shown is still moving.
  setInterval(() => {
    const moving = [...tbody.querySelectorAll("tr[data-status]")].some((tr) => !TERMINAL.includes(tr.dataset.status));
    if (moving && more.hidden) load(false);
  }, REFRESH_MS);
}

// -- job page -----------------------------------------------------------------------------------
async function jobPage() {
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const base = jobPath(jobId);
  const events = eventState();  // progress points ({step, loss, sparsity, target, attempt}) and the log
  const points = events.points, log = events.log;
  let artifactsShown = null;  // names + digests of the artifacts on the page

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
    document.getElementById("delete").hidden = !TERMINAL.includes(job.status);
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
  document.getElementById("delete").addEventListener("click", async () => {
    if (await deleteJob(jobId)) location.href = "/dashboard";
  });

  if (!apiKey()) { showMessage("Enter an API key above to see this job."); return; }
  async function refresh() {
    try {
      const job = await apiJson(base);
      await readEvents(jobId, events);
      renderJob(job);
      drawChart(document.getElementById("chart"), attemptSeries(points), { sparsity: true, kind: "attempts" });
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

// Loss (left axis) and, with `sparsity`, expected sparsity + its target (right axis, 0..1) against the
// step, in SVG. Each of `series` ({slot, label, points}) is drawn as its own paths: the attempts of a job
// (kind "attempts": told apart by dash pattern) or the runs of a comparison (kind "runs": by colour).
// An SVG chart of W x H with margins L, R, T, B: its plot area's frame, and `text` to add a label.
function chartFrame(id, kind, W, H, L, R, T, B) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", id, class: "chart-" + kind });
  svg.append(svgEl("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
  const text = (s, attrs) => { const t = svgEl("text", attrs); t.textContent = s; svg.append(t); return t; };
  return { svg, text };
}

function drawChart(box, series, { sparsity = true, kind = "attempts" } = {}) {
  series = series.map((s) => Object.assign({}, s, { points: s.points.filter(isSearchPoint) })).filter((s) => s.points.length);
  if (!series.length) return;
  const pts = series.flatMap((s) => s.points);
  const W = 560, H = 260, L = 52, R = 44, T = 12, B = 30;
  const maxStep = Math.max(...pts.map((p) => p.total_steps || p.step), 1);
  const losses = pts.map((p) => p.loss).filter((v) => v !== null && v !== undefined);
  let lo = Math.min(...losses), hi = Math.max(...losses);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const x = (s) => L + ((W - L - R) * s) / maxStep;
  const yLoss = (v) => T + ((H - T - B) * (hi - v)) / (hi - lo);
  const ySparse = (v) => T + (H - T - B) * (1 - v);
  const { svg, text } = chartFrame("chart-svg", kind, W, H, L, R, T, B);
  const line = (s, key, y, cls) => {
    const d = s.points.filter((p) => p[key] !== null && p[key] !== undefined)
      .map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p[key]).toFixed(1)}`).join("");
    if (d) svg.append(svgEl("path", { d, class: "line " + cls, "data-series": s.slot, "data-label": s.label }));
  };
  for (const s of series) {
    if (sparsity) {
      line(s, "target", ySparse, "line-target");
      line(s, "sparsity", ySparse, "line-sparsity");
    }
    line(s, "loss", yLoss, "line-loss");
  }
  for (const f of [0, 0.5, 1]) {
    text(fmt(lo + (hi - lo) * (1 - f), 3), { x: L - 6, y: T + (H - T - B) * f + 4, "text-anchor": "end", class: sparsity ? "axis loss" : "axis" });
    if (sparsity) text(fmt(1 - f, 1), { x: W - R + 6, y: T + (H - T - B) * f + 4, class: "axis sparsity" });
  }
  text("0", { x: L, y: H - 10, class: "axis" });
  text(`step ${maxStep}`, { x: W - R, y: H - 10, "text-anchor": "end", class: "axis" });
  const metrics = sparsity ? [el("span", { class: "key loss" }, "loss"), el("span", { class: "key sparsity" }, "sparsity"),
    el("span", { class: "key target" }, "target")] : [];
  // One key per series (a job with one attempt needs none); a run's attempts share its key.
  const labels = [...new Map(series.map((s) => [s.label, s.slot])).entries()];
  const keys = kind === "runs" || labels.length > 1
    ? labels.map(([label, slot]) => el("span", { class: "key series", "data-series": slot }, label)) : [];
  box.replaceChildren(svg, el("div", { class: "legend legend-" + kind }, ...metrics, ...keys));
}

// Every method of every run's evaluation as a point: loss (lower is better) against retrieval accuracy
// (higher is better), coloured by run. `runs`: [{slot, id, records}] with records from evaluation.json.
function drawScatter(box, runs) {
  const pts = runs.flatMap((r) => (r.records || [])
    .filter((rec) => Number.isFinite(rec.loss) && Number.isFinite(rec.retrieval_acc))
    .map((rec) => ({ run: r.id, slot: r.slot, name: rec.name || rec.method, method: rec.method || "", loss: rec.loss, retrieval: rec.retrieval_acc })));
  if (!pts.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no evaluation with loss and retrieval among these runs (submit with evaluate: true)"));
    return;
  }
  const W = 560, H = 260, L = 52, R = 16, T = 12, B = 34;
  let lo = Math.min(...pts.map((p) => p.loss)), hi = Math.max(...pts.map((p) => p.loss));
  const pad = hi > lo ? (hi - lo) * 0.08 : 0.5;
  lo -= pad; hi += pad;
  const x = (v) => L + (W - L - R) * v;  // retrieval accuracy is a share: the axis is 0..1 always
  const y = (v) => T + ((H - T - B) * (hi - v)) / (hi - lo);
  const { svg, text } = chartFrame("scatter-svg", "runs", W, H, L, R, T, B);
  for (const p of pts) {
    const dot = svgEl("circle", { cx: x(p.retrieval).toFixed(1), cy: y(p.loss).toFixed(1), r: 5, class: "dot",
      "data-series": p.slot, "data-run": p.run, "data-method": p.name });
    const tip = svgEl("title", {});
    tip.textContent = `${p.run} · ${p.name}: loss ${fmt(p.loss, 4)}, retrieval ${fmt(p.retrieval, 3)}`;
    dot.append(tip);
    svg.append(dot);
    // Named on the chart: the reference (full attention) and the run's own allocation (learned-<objective>);
    // the many baselines would bury them, so they are named in their tooltips only.
    if (p.method === "full" || p.method.startsWith("learned")) text(p.name, { x: x(p.retrieval) + 7, y: y(p.loss) + 4, class: "axis point-label" });
  }
  for (const f of [0, 0.5, 1]) {
    text(fmt(hi - (hi - lo) * f, 3), { x: L - 6, y: T + (H - T - B) * f + 4, "text-anchor": "end", class: "axis" });
    text(fmt(f, 1), { x: x(f), y: H - 18, "text-anchor": "middle", class: "axis" });
  }
  text("retrieval accuracy →", { x: W - R, y: H - 4, "text-anchor": "end", class: "axis" });
  text("↑ loss", { x: L + 4, y: T + 12, class: "axis" });
  const skipped = runs.reduce((n, r) => n + (r.records || []).length, 0) - pts.length;
  box.replaceChildren(svg, el("div", { class: "legend legend-runs" },
    ...runs.filter((r) => r.records).map((r) => el("span", { class: "key series", "data-series": r.slot }, r.id)),
    skipped ? el("span", { class: "muted" }, `${skipped} without a retrieval score not drawn`) : null));
}

// -- compare page -------------------------------------------------------------------------------
// /dashboard/compare?jobs=a,b,...: the runs' settings and results, loss curves on one chart, their
// evaluations as points, heatmaps and evaluation tables side by side.
async function comparePage() {
  const ids = [...new Set((new URLSearchParams(location.search).get("jobs") || "").split(",").filter(Boolean))];
  if (!apiKey()) { showMessage("Enter an API key above to compare jobs."); return; }
  if (ids.length < 2) { showMessage("Tick two or more jobs on the jobs page, then Compare selected."); return; }
  const images = new Map();  // artifact digest -> blob URL: a heatmap is fetched once

  async function loadRun(id, slot) {
    try {
      const [job, artifacts, events] = await Promise.all([apiJson(jobPath(id)),
        apiJson(jobPath(id) + "/artifacts").then((a) => a.data), readEvents(id, eventState())]);
      const run = { id, slot, job, points: events.points, achieved: null, records: null, heatmap: null, table: null };
      const named = (name) => artifacts.find((a) => a.name === name);
      if (named(MANIFEST)) run.achieved = await achievedSparsity(id);
      if (named(RECORDS)) run.records = await apiJson(artifactPath(id, RECORDS));
      const heat = artifacts.find((a) => a.shown_as === "image");
      if (heat) {
        if (!images.has(heat.sha256)) images.set(heat.sha256, URL.createObjectURL(await (await api(artifactPath(id, heat.name))).blob()));
        run.heatmap = images.get(heat.sha256);
      }
      const table = artifacts.find((a) => a.shown_as === "table");
      if (table) run.table = evaluationTable(table.content_type, await (await api(artifactPath(id, table.name))).text());
      return run;
    } catch (err) {
      return { id, slot, error: explain(err) };  // one missing run does not hide the others
    }
  }

  function render(runs) {
    const ok = runs.filter((r) => !r.error);
    document.querySelector("#runs tbody").replaceChildren(...runs.map((r) => {
      const head = el("td", {}, el("span", { class: "swatch", "data-series": r.slot }), jobLink(r.id));
      if (r.error) return el("tr", { "data-job-id": r.id }, head, el("td", { colspan: "8", class: "error" }, r.error));
      const p = r.job.progress || {}, config = r.job.config || {};
      return el("tr", { "data-job-id": r.id, "data-status": r.job.status }, head,
        el("td", { class: "model" }, r.job.model), el("td", {}, config.granularity ?? "–"),
        el("td", {}, statusBadge(r.job.status)), el("td", { class: "num" }, config.steps ?? "–"),
        el("td", { class: "num" }, fmt(config.sparsity, 2)),
        el("td", { class: "num achieved" }, fmt(r.achieved, 2)),
        el("td", { class: "num" }, fmt(p.loss, 4)), el("td", { class: "num" }, duration(elapsedS(r.job))));
    }));
    drawChart(document.getElementById("chart"),
      ok.flatMap((r) => attemptSeries(r.points).map((s) => Object.assign(s, { slot: r.slot, label: r.id }))),
      { sparsity: false, kind: "runs" });
    drawScatter(document.getElementById("scatter"), ok.map((r) => ({ slot: r.slot, id: r.id, records: r.records })));
    document.getElementById("heatmaps").replaceChildren(...ok.map((r) => el("div", { class: "card", "data-job-id": r.id },
      el("h3", {}, el("span", { class: "swatch", "data-series": r.slot }), r.id),
      r.heatmap ? el("img", { class: "heatmap", alt: "FA/SWA allocation heatmap of " + r.id, src: r.heatmap })
        : el("p", { class: "muted" }, "no heatmap"))));
    document.getElementById("evaluations").replaceChildren(...ok.map((r) => el("div", { class: "run-evaluation", "data-job-id": r.id },
      el("h3", {}, el("span", { class: "swatch", "data-series": r.slot }), r.id),
      r.table || el("p", { class: "muted" }, "none (submit with evaluate: true)"))));
  }

  async function load() {
    const runs = await Promise.all(ids.map((id, slot) => loadRun(id, slot)));
    render(runs);
    document.getElementById("compare").hidden = false;
    const errors = runs.filter((r) => r.error);
    showMessage(errors.length === runs.length ? errors[0].error : "");
    if (runs.some((r) => r.job && !TERMINAL.includes(r.job.status))) return setTimeout(load, REFRESH_MS);
    document.body.dataset.loaded = "final";  // a marker for tests and scripts: nothing more will change
  }
  await load();
}

({ jobs: jobsPage, job: jobPage, compare: comparePage })[document.body.dataset.page]();
