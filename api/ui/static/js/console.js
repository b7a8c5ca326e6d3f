// tuneserve console: Alpine.js components over the public JSON API.
//
// Every figure on every page is fetched here, from the API, with the key the user signed in with (kept in
// sessionStorage: this tab only, gone when it closes or on "Sign out"). The server renders only empty shells, so
// what a page shows is exactly what `curl -H "Authorization: Bearer $KEY"` would show: another tenant's things
// cannot appear. No script, style or font comes from anywhere but this API's host.
"use strict";

const KEY_STORAGE = "tuneserve.apiKey";
const PREFIX = document.documentElement.dataset.prefix || "/ui";
// The statuses that end a record: core/statuses.py, through the page.
const TERMINAL = new Set((document.documentElement.dataset.terminalStatuses || "").split(" "));

// Set once Alpine has started every component on the page: what a test (or a script) waits for before acting.
document.addEventListener("alpine:initialized", () => {
  document.body.dataset.ready = "true";
});

// ---------------------------------------------------------------------------------------------------------------
// The key and the API

function getKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function signOut() {
  sessionStorage.removeItem(KEY_STORAGE);
  window.location.assign(`${PREFIX}`);
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || { type: "error", code: String(status), message: `HTTP ${status}`, param: null };
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.param = error.param;
  }
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// fetch() against the API; JSON in and out; an error in the API's one shape becomes an ApiError.
// A 401 means the key is gone or was revoked: back to the sign-in page.
async function api(path, options) {
  // Signed out (maybe by this very click, with a poll still due): send nothing without a key.
  if (getKey() === null) throw new ApiError(401, null);
  const opts = Object.assign({}, options || {});
  const headers = authHeaders(opts.headers);
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  opts.headers = headers;
  const response = await fetch(path, opts);
  if (response.status === 401 && !opts.noRedirect) {
    sessionStorage.removeItem(KEY_STORAGE);
    window.location.assign(`${PREFIX}?expired=1`);
    throw new ApiError(401, null);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (e) {
    body = null;
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// Read a text/event-stream response with fetch (EventSource cannot send an Authorization header).
// onEvent(name, data) for each event; resolves when the stream ends.
async function readSSE(path, options, onEvent, signal) {
  const opts = Object.assign({}, options || {});
  opts.headers = authHeaders(opts.headers);
  if (opts.json !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  opts.signal = signal;
  const response = await fetch(path, opts);
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    throw new ApiError(response.status, body);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      let name = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Formatting

function fmtTime(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleString();
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function fmtNumber(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  return x.toFixed(digits === undefined ? 4 : digits);
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function fmtValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

// "file:2:completion" -> "train file, line 2, field completion": the API's param, said for a person.
function describeParam(param) {
  if (!param) return "";
  const m = /^(file|test_file):(\d+):(.+)$/.exec(param);
  if (m) return `${m[1] === "file" ? "train file" : "test file"}, line ${m[2]}, field ${m[3]}`;
  const n = /^(file|test_file):(.+)$/.exec(param);
  if (n) return `${n[1] === "file" ? "train file" : "test file"}: ${n[2]}`;
  return param;
}

// ---------------------------------------------------------------------------------------------------------------
// Charts (uPlot)

function lineChart(el, { title, xLabel, series, height }) {
  const width = Math.max(280, el.clientWidth || 600);
  const colors = ["#2563eb", "#dc2626", "#059669", "#9333ea"];
  const opts = {
    title,
    width,
    height: height || 260,
    scales: { x: { time: false } },
    axes: [{ label: xLabel }, {}],
    series: [{ label: xLabel }].concat(
      series.map((label, i) => ({ label, stroke: colors[i % colors.length], width: 2, points: { show: true, size: 5 } }))
    ),
  };
  const data = [[]].concat(series.map(() => []));
  const plot = new uPlot(opts, data, el);
  const resize = () => plot.setSize({ width: Math.max(280, el.clientWidth || 600), height: opts.height });
  window.addEventListener("resize", resize);
  return plot;
}

// ---------------------------------------------------------------------------------------------------------------
// Components

function shell() {
  return {
    tenantHint: "",
    init() {
      const page = document.body.dataset.page;
      const key = getKey();
      if (page !== "signin" && key === null) {
        window.location.assign(`${PREFIX}?next=${encodeURIComponent(window.location.pathname)}`);
        return;
      }
      this.tenantHint = key ? `key ${key.slice(0, 8)}…` : key === "" ? "auth off (demo)" : "";
    },
    signOut,
  };
}

function signIn() {
  return {
    key: "",
    error: "",
    busy: false,
    async init() {
      const params = new URLSearchParams(window.location.search);
      if (params.get("expired")) this.error = "Your key was refused (revoked or unknown): sign in again.";
      // With TUNESERVE_AUTH_ENABLED=false (make demo) the API needs no key: go straight in.
      if (document.body.dataset.auth === "off") {
        sessionStorage.setItem(KEY_STORAGE, "");
        this.go();
      }
    },
    go() {
      const next = new URLSearchParams(window.location.search).get("next");
      window.location.assign(next && next.startsWith(`${PREFIX}/`) ? next : `${PREFIX}/jobs`);
    },
    async submit() {
      this.error = "";
      const key = this.key.trim();
      if (!key) {
        this.error = "Enter an API key.";
        document.getElementById("api-key").focus();
        return;
      }
      this.busy = true;
      try {
        // Any keyed route proves the key: /usage is small and every tenant has it.
        const response = await fetch("/usage", { headers: { Authorization: `Bearer ${key}` } });
        if (!response.ok) {
          const body = await response.json().catch(() => null);
          this.error = (body && body.error && body.error.message) || `refused (HTTP ${response.status})`;
          document.getElementById("api-key").focus();
          return;
        }
        sessionStorage.setItem(KEY_STORAGE, key);
        this.go();
      } finally {
        this.busy = false;
      }
    },
  };
}

function datasetsPage() {
  return {
    datasets: [],
    loading: true,
    listError: "",
    file: null,
    testFile: null,
    split: "none", // none | file | fraction
    testFraction: 0.1,
    seed: 0,
    uploading: false,
    uploadError: null,
    uploaded: null,
    dragging: false,
    preview: {},
    async init() {
      await this.load();
    },
    async load() {
      try {
        this.datasets = (await api("/datasets?limit=100")).data;
        this.listError = "";
      } catch (e) {
        this.listError = e.message;
      } finally {
        this.loading = false;
      }
    },
    drop(event) {
      this.dragging = false;
      const files = event.dataTransfer.files;
      if (files.length) this.file = files[0];
      if (files.length > 1) {
        this.testFile = files[1];
        this.split = "file";
      }
    },
    async upload() {
      this.uploadError = null;
      this.uploaded = null;
      if (!this.file) {
        this.uploadError = { message: "Choose a train file (JSONL).", param: "file" };
        return;
      }
      const form = new FormData();
      form.append("file", this.file, this.file.name);
      if (this.split === "file" && this.testFile) form.append("test_file", this.testFile, this.testFile.name);
      if (this.split === "fraction") {
        form.append("test_fraction", String(this.testFraction));
        form.append("seed", String(this.seed));
      }
      this.uploading = true;
      try {
        this.uploaded = await api("/datasets", { method: "POST", body: form });
        await this.load();
      } catch (e) {
        this.uploadError = { message: e.message, param: e.param, where: describeParam(e.param) };
        this.$nextTick(() => document.getElementById("upload-error").focus());
      } finally {
        this.uploading = false;
      }
    },
    // The first rows of each split, as the API stored them (GET /datasets/{id}/rows).
    async togglePreview(d) {
      if (this.preview[d.id]) {
        const copy = Object.assign({}, this.preview);
        delete copy[d.id];
        this.preview = copy;
        return;
      }
      const splits = Object.entries(d.splits || {}).filter(([, n]) => n > 0).map(([name]) => name);
      const out = {};
      try {
        for (const split of splits) {
          out[split] = (await api(`/datasets/${encodeURIComponent(d.id)}/rows?split=${split}&limit=3`)).data;
        }
      } catch (e) {
        out.error = e.message;
      }
      this.preview = Object.assign({}, this.preview, { [d.id]: out });
    },
    previewText(row) {
      return JSON.stringify(row, null, 1);
    },
    splitsText(d) {
      return Object.entries(d.splits || {})
        .map(([k, v]) => `${k} ${v}`)
        .join(" · ");
    },
    // Stats as the API gives them, whatever their keys: nested ones (per split) as "key value" pairs.
    statsList(d) {
      return Object.entries(d.stats || {})
        .filter(([, v]) => v !== null && v !== undefined)
        .map(([k, v]) => [k, typeof v === "object" ? Object.entries(v).map(([a, b]) => `${a} ${fmtValue(b)}`).join(", ") : fmtValue(v)]);
    },
    fmtTime,
    fmtBytes,
    fmtValue,
  };
}

// The job form is drawn from the API's own OpenAPI document (JobSpec and its hyperparameters): defaults, limits,
// choices and descriptions are the server's, and a field the API gains shows up here without a console change.
const COMMON_HYPERPARAMETERS = ["max_steps", "n_epochs", "learning_rate", "batch_size", "lora_r", "lora_alpha", "target_modules"];
const SKIPPED_TOP_FIELDS = new Set(["dataset_id", "hyperparameters", "evaluation", "base_model"]);

function resolveRef(spec, schema) {
  if (schema && schema.$ref) return spec.components.schemas[schema.$ref.split("/").pop()];
  return schema;
}

// A form field for one schema property, or null for what a form cannot say simply (objects, lists of objects).
function fieldOf(spec, path, name, schema, required) {
  schema = resolveRef(spec, schema) || {};
  let options = schema.anyOf || schema.oneOf;
  let kind = schema.type;
  let choices = schema.enum || null;
  let nullable = false;
  let free = false;
  let range = schema;
  if (options) {
    const real = options.map((o) => resolveRef(spec, o)).filter((o) => o.type !== "null");
    nullable = real.length < options.length;
    if (real.length === 1) {
      kind = real[0].type;
      choices = real[0].enum || null;
      range = real[0];
    } else if (real.some((o) => o.enum)) {
      kind = "string";
      choices = real.find((o) => o.enum).enum;
      free = real.some((o) => o.type === "array"); // e.g. target_modules: a choice or a list of module names
    } else {
      kind = real[0] && real[0].type;
      range = real[0] || {};
    }
  }
  // A list of scalars (evaluation metrics, scales) is typed comma-separated; lists of objects are left out.
  let list = null;
  if (kind === "array" && !free) {
    const items = resolveRef(spec, range.items) || {};
    if (!["number", "integer", "string"].includes(items.type)) return null;
    list = items.type;
    choices = items.enum || null;
  }
  if (kind === "object") return null;
  const id = `f-${path}`.replace(/[^A-Za-z0-9_-]/g, "-");
  const limits = [];
  if (range.minimum !== undefined) limits.push(`≥ ${range.minimum}`);
  if (range.exclusiveMinimum !== undefined) limits.push(`> ${range.exclusiveMinimum}`);
  if (range.maximum !== undefined && range.maximum < 2147483647) limits.push(`≤ ${range.maximum}`);
  if (range.exclusiveMaximum !== undefined) limits.push(`< ${range.exclusiveMaximum}`);
  return {
    path,
    name,
    id,
    label: name,
    kind: list ? "text" : kind === "boolean" ? "boolean" : choices && !free ? "choice" : kind === "integer" || kind === "number" ? "number" : "text",
    list,
    numberKind: kind,
    choices,
    free,
    nullable,
    required,
    default: schema.default,
    step: kind === "integer" ? "1" : "any",
    min: range.minimum,
    max: range.maximum,
    help: [
      schema.description,
      list ? `comma-separated${choices ? `: ${choices.join(", ")}` : ""}` : "",
      limits.length ? limits.join(", ") : "",
      schema.default !== undefined ? `default ${fmtValue(schema.default)}` : "",
    ]
      .filter(Boolean)
      .join(" · "),
    value: schema.default === undefined || schema.default === null ? "" : Array.isArray(schema.default) ? schema.default.join(", ") : schema.default,
  };
}

function jobFormFields(spec) {
  const jobSpec = spec.components.schemas.JobSpec;
  const required = new Set(jobSpec.required || []);
  const top = [];
  for (const [name, schema] of Object.entries(jobSpec.properties)) {
    if (SKIPPED_TOP_FIELDS.has(name)) continue;
    const f = fieldOf(spec, name, name, schema, required.has(name));
    if (f) top.push(f);
  }
  const hp = resolveRef(spec, jobSpec.properties.hyperparameters);
  const common = [];
  const advanced = [];
  for (const [name, schema] of Object.entries((hp && hp.properties) || {})) {
    const f = fieldOf(spec, `hyperparameters.${name}`, name, schema, false);
    if (!f) continue;
    (COMMON_HYPERPARAMETERS.includes(name) ? common : advanced).push(f);
  }
  common.sort((a, b) => COMMON_HYPERPARAMETERS.indexOf(a.name) - COMMON_HYPERPARAMETERS.indexOf(b.name));
  const evaluation = [];
  const ev = resolveRef(spec, jobSpec.properties.evaluation);
  for (const [name, schema] of Object.entries((ev && ev.properties) || {})) {
    const f = fieldOf(spec, `evaluation.${name}`, name, schema, false);
    if (f) evaluation.push(f);
  }
  return { top, common, advanced, evaluation };
}

// The JSON body from the form: only the fields the user set (an untouched field keeps the server's default).
function jobBody(datasetId, groups) {
  const body = { dataset_id: datasetId };
  for (const f of [].concat(groups.top, groups.common, groups.advanced, groups.evaluation)) {
    let v = f.value;
    if (v === "" || v === null || v === undefined) continue;
    if (f.kind === "number") {
      v = Number(v);
      if (Number.isNaN(v)) v = f.value; // let the API say what is wrong with it, next to the field
    }
    if (f.kind === "text" && f.free && typeof v === "string" && v.includes(",")) {
      v = v.split(",").map((s) => s.trim()).filter(Boolean);
    }
    if (f.list && typeof v === "string") {
      v = v.split(",").map((s) => s.trim()).filter(Boolean);
      if (f.list !== "string") v = v.map((x) => (Number.isNaN(Number(x)) ? x : Number(x)));
    }
    if (f.default !== undefined && JSON.stringify(v) === JSON.stringify(f.default)) continue;
    const parts = f.path.split(".");
    let target = body;
    for (const p of parts.slice(0, -1)) target = target[p] = target[p] || {};
    target[parts[parts.length - 1]] = v;
  }
  return body;
}

function jobsPage() {
  return {
    jobs: [],
    datasets: [],
    loading: true,
    listError: "",
    groups: { top: [], common: [], advanced: [], evaluation: [] },
    datasetId: "",
    formError: null,
    fieldErrors: {},
    submitting: false,
    timer: null,
    async init() {
      const [spec] = await Promise.all([fetch("/openapi.json").then((r) => r.json()), this.load()]);
      this.groups = jobFormFields(spec);
      try {
        this.datasets = (await api("/datasets?limit=100")).data;
        if (this.datasets.length) this.datasetId = this.datasets[0].id;
      } catch (e) {
        this.formError = e.message;
      }
      const wanted = new URLSearchParams(window.location.search).get("dataset");
      if (wanted) this.datasetId = wanted;
      this.timer = setInterval(() => this.load(), 3000);
    },
    async load() {
      try {
        this.jobs = (await api("/jobs?limit=50")).data;
        this.listError = "";
      } catch (e) {
        this.listError = e.message;
      } finally {
        this.loading = false;
      }
    },
    errorFor(f) {
      return this.fieldErrors[f.path] || "";
    },
    async submit() {
      this.formError = null;
      this.fieldErrors = {};
      if (!this.datasetId) {
        this.fieldErrors = { dataset_id: "Choose a dataset (upload one on the Datasets page)." };
        return;
      }
      this.submitting = true;
      try {
        const job = await api("/jobs", { method: "POST", json: jobBody(this.datasetId, this.groups) });
        window.location.assign(`${PREFIX}/jobs/${encodeURIComponent(job.id)}`);
      } catch (e) {
        // The API names the field it refuses (param); show the message there, and move focus to it.
        const fields = [].concat(this.groups.top, this.groups.common, this.groups.advanced, this.groups.evaluation);
        const field = e.param && fields.find((f) => f.path === e.param || e.param.startsWith(`${f.path}[`));
        if (field) {
          this.fieldErrors = { [field.path]: e.message };
          if (this.groups.advanced.includes(field) || this.groups.evaluation.includes(field)) {
            document.getElementById("advanced").open = true;
          }
          this.$nextTick(() => document.getElementById(field.id).focus());
        } else if (e.param === "dataset_id") {
          this.fieldErrors = { dataset_id: e.message };
          this.$nextTick(() => document.getElementById("f-dataset_id").focus());
        } else {
          this.formError = e.param ? `${e.param}: ${e.message}` : e.message;
          this.$nextTick(() => document.getElementById("form-error").focus());
        }
      } finally {
        this.submitting = false;
      }
    },
    percent(job) {
      if (job.status === "succeeded") return 100;
      return job.progress && job.progress.percent !== null ? job.progress.percent : 0;
    },
    fmtTime,
    fmtNumber,
  };
}

function jobPage(jobId) {
  return {
    jobId,
    job: null,
    error: "",
    events: [],
    checkpoints: [],
    lossPoints: 0,
    report: null,
    reportError: "",
    samples: [],
    samplesTotal: 0,
    adapterScales: null,
    offset: 0,
    pageSize: 10,
    onlyChanged: false,
    cancelling: false,
    plot: null,
    sweepPlot: null,
    lossData: [[], []],
    lastEventId: null,
    controller: null,
    async init() {
      try {
        this.job = await api(`/jobs/${encodeURIComponent(jobId)}`);
      } catch (e) {
        this.error = e.status === 404 ? `No job ${jobId} for this key.` : e.message;
        return;
      }
      this.$nextTick(() => {
        this.plot = lineChart(this.$refs.loss, { title: "Training loss", xLabel: "step", series: ["loss"] });
        this.follow();
      });
      this.loadCheckpoints();
    },
    // The live part: GET /jobs/{id}/events/stream (SSE); reconnects with ?after= if the stream ends early.
    async follow() {
      this.controller = new AbortController();
      for (let attempt = 0; attempt < 1000; attempt += 1) {
        let ended = null;
        const after = this.lastEventId !== null ? `?after=${this.lastEventId}` : "";
        try {
          await readSSE(
            `/jobs/${encodeURIComponent(jobId)}/events/stream${after}`,
            { headers: { Accept: "text/event-stream" } },
            (name, data) => {
              const body = JSON.parse(data);
              if (name === "event") this.addEvent(body);
              else if (name === "job") this.job = body;
              else if (name === "end") ended = body;
            },
            this.controller.signal
          );
        } catch (e) {
          if (e.name === "AbortError") return;
          await new Promise((r) => setTimeout(r, 2000));
        }
        if (ended && ended.reason !== "timeout") break;
      }
      this.loadCheckpoints();
      this.waitForReport();
    },
    addEvent(event) {
      this.lastEventId = event.id;
      this.events.push(event);
      if (event.loss !== null && event.loss !== undefined && event.step !== null && event.step !== undefined) {
        this.lossData[0].push(event.step);
        this.lossData[1].push(event.loss);
        this.lossPoints = this.lossData[0].length;
        if (this.plot) this.plot.setData(this.lossData);
      }
    },
    async loadCheckpoints() {
      try {
        this.checkpoints = (await api(`/jobs/${encodeURIComponent(jobId)}/checkpoints`)).data;
      } catch (e) {
        this.checkpoints = [];
      }
    },
    // After training the before/after evaluations run; the job's summary says when both are done.
    async waitForReport() {
      for (;;) {
        const job = await api(`/jobs/${encodeURIComponent(jobId)}`);
        this.job = job;
        const status = job.evaluation && job.evaluation.status;
        if (job.status !== "succeeded" || !job.evaluation || status === "none") return;
        if (TERMINAL.has(status)) break;
        await new Promise((r) => setTimeout(r, 2000));
      }
      try {
        this.report = await api(`/jobs/${encodeURIComponent(jobId)}/report`);
        await this.loadSamples();
        this.$nextTick(() => this.drawSweep());
      } catch (e) {
        this.reportError = e.message;
      }
    },
    drawSweep() {
      const sweep = (this.report && this.report.scale_sweep) || [];
      if (!sweep.length || !this.$refs.sweep) return;
      const metrics = Object.keys(sweep[0].metrics).filter((m) => m !== "loss" && m !== "perplexity");
      const shown = metrics.slice(0, 3);
      if (!shown.length) return;
      this.sweepPlot = lineChart(this.$refs.sweep, { title: "Adapter scale sweep", xLabel: "scale", series: shown });
      const rows = sweep.filter((r) => r.scale !== null).sort((a, b) => a.scale - b.scale);
      this.sweepPlot.setData([rows.map((r) => r.scale)].concat(shown.map((m) => rows.map((r) => r.metrics[m]))));
    },
    // Base and adapter samples, joined by example index, a page at a time; "only changed" filters the page.
    async loadSamples() {
      const ev = this.report.evaluation;
      if (!ev.base_evaluation_id || !ev.adapter_evaluation_id) {
        this.samples = this.report.examples.map((x) => ({ ...x, baseOk: null, adapterOk: null }));
        this.samplesTotal = this.samples.length;
        return;
      }
      const q = `limit=${this.pageSize}&offset=${this.offset}`;
      // The adapter's samples at the scale the report compares (an evaluation with a sweep has one per scale).
      if (this.adapterScales === null) this.adapterScales = (await api(`/evaluations/${ev.adapter_evaluation_id}`)).scales || [];
      const s = this.report.adapter_scale;
      const scale = s !== null && s !== undefined && this.adapterScales.includes(s) ? `&scale=${s}` : "";
      const [base, adapter] = await Promise.all([
        api(`/evaluations/${ev.base_evaluation_id}/samples?${q}`),
        api(`/evaluations/${ev.adapter_evaluation_id}/samples?${q}${scale}`),
      ]);
      const byIndex = new Map(adapter.data.map((s) => [s.index, s]));
      this.samplesTotal = base.total;
      this.samples = base.data.map((b) => {
        const a = byIndex.get(b.index) || { prediction: "", scores: {} };
        return {
          index: b.index,
          prompt: b.prompt,
          reference: b.reference,
          base: b.prediction,
          adapter: a.prediction,
          baseOk: this.correct(b.scores),
          adapterOk: this.correct(a.scores),
        };
      });
    },
    correct(scores) {
      for (const m of ["exact_match", "contains"]) if (scores && scores[m] !== undefined) return scores[m] >= 1;
      return null;
    },
    shownSamples() {
      return this.onlyChanged ? this.samples.filter((s) => s.base !== s.adapter) : this.samples;
    },
    async page(delta) {
      this.offset = Math.max(0, this.offset + delta * this.pageSize);
      await this.loadSamples();
    },
    async cancel() {
      if (!window.confirm(`Cancel job ${jobId}?`)) return;
      this.cancelling = true;
      try {
        this.job = await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
      } catch (e) {
        this.error = e.message;
      } finally {
        this.cancelling = false;
      }
    },
    percent() {
      if (!this.job) return 0;
      if (this.job.status === "succeeded") return 100;
      return this.job.progress.percent || 0;
    },
    facts() {
      if (!this.job) return [];
      const skip = new Set(["object", "hyperparameters", "progress", "evaluation", "error"]);
      return Object.entries(this.job).filter(([k]) => !skip.has(k));
    },
    markOf(ok) {
      return ok === null ? "" : ok ? "✓ right" : "✗ wrong";
    },
    fmtTime,
    fmtDuration,
    fmtNumber,
    fmtValue,
    fmtBytes,
  };
}

function adaptersPage() {
  return {
    adapters: [],
    loading: true,
    listError: "",
    message: "",
    scale: {},
    importFile: null,
    importSuffix: "",
    importError: null,
    watching: null,
    busy: false,
    async init() {
      await this.load();
    },
    async load() {
      try {
        this.adapters = (await api("/adapters?limit=100")).data;
        this.listError = "";
      } catch (e) {
        this.listError = e.message;
      } finally {
        this.loading = false;
      }
    },
    async operate(adapter, kind) {
      const scale = Number(this.scale[adapter.name] || 1);
      if (!window.confirm(`${kind} ${adapter.name} at scale ${scale}?`)) return;
      try {
        const op = await api(`/adapters/${encodeURIComponent(adapter.name)}/${kind}`, { method: "POST", json: { scale } });
        this.message = `${kind} queued: ${op.id}`;
        for (;;) {
          const now = await api(`/adapter-operations/${op.id}`);
          this.message = `${kind} ${op.id}: ${now.status}${now.result ? ` → ${now.result}` : ""}${now.error ? ` (${now.error.message})` : ""}`;
          if (TERMINAL.has(now.status)) break;
          await new Promise((r) => setTimeout(r, 2000));
        }
        await this.load();
      } catch (e) {
        this.message = e.message;
      }
    },
    async remove(adapter) {
      if (!window.confirm(`Delete ${adapter.name}? Its name never comes back.`)) return;
      try {
        await api(`/adapters/${encodeURIComponent(adapter.name)}`, { method: "DELETE" });
        this.message = `${adapter.name} deleted`;
        await this.load();
      } catch (e) {
        this.message = e.message;
      }
    },
    async importAdapter() {
      this.importError = null;
      if (!this.importFile) {
        this.importError = { message: "Choose an archive (.tar, .tar.gz or .zip).", param: "file" };
        return;
      }
      const form = new FormData();
      form.append("file", this.importFile, this.importFile.name);
      if (this.importSuffix) form.append("suffix", this.importSuffix);
      this.busy = true;
      try {
        let adapter = await api("/adapters", { method: "POST", body: form });
        this.watching = adapter;
        await this.load();
        // The canary runs on a worker: watch until it says ready or unhealthy.
        while (adapter.status === "validating") {
          await new Promise((r) => setTimeout(r, 2000));
          adapter = await api(`/adapters/${encodeURIComponent(adapter.name)}`);
          this.watching = adapter;
        }
        await this.load();
      } catch (e) {
        this.importError = { message: e.message, param: e.param, where: describeParam(e.param) };
      } finally {
        this.busy = false;
      }
    },
    fmtTime,
    fmtBytes,
    fmtValue,
  };
}

function playground() {
  return {
    models: [],
    base: "",
    chosen: [],
    mode: "chat",
    system: "",
    input: "",
    temperature: 0,
    topP: 1,
    maxTokens: 32,
    columns: [],
    error: "",
    running: false,
    async init() {
      try {
        const models = (await api("/v1/models")).data;
        this.base = models.length ? models[0].id : "";
        this.models = models.slice(1).map((m) => m.id);
        const wanted = new URLSearchParams(window.location.search).get("adapter");
        if (wanted && this.models.includes(wanted)) this.chosen = [wanted];
        else if (this.models.length) this.chosen = [this.models[0]];
      } catch (e) {
        this.error = e.message;
      }
    },
    toggle(name) {
      if (this.chosen.includes(name)) this.chosen = this.chosen.filter((n) => n !== name);
      else if (this.chosen.length < 3) this.chosen = this.chosen.concat([name]);
    },
    async send() {
      this.error = "";
      if (!this.input.trim()) {
        this.error = "Write a message or prompt first.";
        return;
      }
      this.running = true;
      this.columns = [this.base].concat(this.chosen).map((model) => ({
        model,
        text: "",
        tokens: 0,
        seconds: 0,
        tps: null,
        error: "",
        done: false,
      }));
      await Promise.all(this.columns.map((_, i) => this.run(i)));
      this.running = false;
    },
    // One streamed request per column, all at once: serving batches them.
    async run(i) {
      const col = this.columns[i];
      const common = {
        model: col.model,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number(this.temperature),
        top_p: Number(this.topP),
        max_tokens: Number(this.maxTokens),
      };
      const chat = this.mode === "chat";
      const messages = [];
      if (chat && this.system.trim()) messages.push({ role: "system", content: this.system });
      if (chat) messages.push({ role: "user", content: this.input });
      const body = chat ? Object.assign(common, { messages }) : Object.assign(common, { prompt: this.input });
      const started = performance.now();
      let first = null;
      let usageTokens = null;
      try {
        await readSSE(chat ? "/v1/chat/completions" : "/v1/completions", { method: "POST", json: body }, (name, data) => {
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk.error) {
            this.columns[i].error = chunk.error.message;
            return;
          }
          if (chunk.usage && chunk.usage.completion_tokens !== undefined) usageTokens = chunk.usage.completion_tokens;
          for (const choice of chunk.choices || []) {
            const piece = chat ? choice.delta && choice.delta.content : choice.text;
            if (piece) {
              if (first === null) first = performance.now();
              this.columns[i].text += piece;
              this.columns[i].tokens += 1;
            }
          }
        });
      } catch (e) {
        this.columns[i].error = e.param ? `${e.param}: ${e.message}` : e.message;
      }
      const seconds = (performance.now() - started) / 1000;
      const tokens = usageTokens !== null ? usageTokens : this.columns[i].tokens;
      this.columns[i].tokens = tokens;
      this.columns[i].seconds = seconds;
      this.columns[i].tps = seconds > 0 && tokens ? tokens / seconds : null;
      this.columns[i].done = true;
    },
    fmtNumber,
  };
}
