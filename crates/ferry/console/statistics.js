// ferry console: the Statistics view (registered in VIEW_FNS; uses app.js's
// S, el, api). Charts of the node's statistics history (GET /api/v1/stats),
// one SVG per metric of the chosen scope, drawn here with createElementNS:
// the mean as a line, the min–max of each point as a band, a gap wherever
// the store has no point. Refreshed every 10 s while the view is open (the
// sampler records every 10 s by default), never while it is not.
"use strict";

const STATS_REFRESH_MS = 10000;
const SVG_NS = "http://www.w3.org/2000/svg";

// Time ranges and the step asked of the store for each (at most ~360
// points a chart). The store answers from the finest tier that reaches back
// that far and is not finer than the step (10 s kept 24 h, 1 min kept 30 d,
// 1 h kept 1 y: crates/ferry-core/src/history.rs).
const STATS_RANGES = [
  { id: "15m", label: "15 min", since: 900, step: 10, cli: "15m" },
  { id: "1h", label: "1 h", since: 3600, step: 10, cli: "1h" },
  { id: "6h", label: "6 h", since: 21600, step: 60, cli: "6h" },
  { id: "24h", label: "24 h", since: 86400, step: 300, cli: "24h" },
  { id: "7d", label: "7 d", since: 604800, step: 1800, cli: "7d" },
  { id: "30d", label: "30 d", since: 2592000, step: 7200, cli: "30d" },
  { id: "1y", label: "1 y", since: 31536000, step: 86400, cli: "365d" },
];

// Metrics in the order charts are shown, with their title and unit.
const STATS_METRICS = [
  { id: "write_bytes_per_s", title: "Write rate", unit: "bytes/s", what: "bytes clients wrote per second" },
  { id: "link_bytes_per_s", title: "Link rate", unit: "bytes/s", what: "bytes sent on the replication link per second" },
  { id: "backlog_bytes", title: "Backlog", unit: "bytes", what: "bytes waiting to be sent (dirty and queued)" },
  { id: "lag_seconds", title: "Lag", unit: "s", what: "how far the replica is behind" },
  { id: "lag_p50_seconds", title: "Lag p50", unit: "s", what: "median of the lag probed ten times per sample" },
  { id: "lag_p99_seconds", title: "Lag p99", unit: "s", what: "99th percentile of the lag probed ten times per sample" },
  { id: "write_iops", title: "Write IOPS", unit: "iops", what: "client writes per second" },
  { id: "write_latency_p99_ms", title: "Write latency p99", unit: "ms", what: "99th percentile of client write latency (no write: no point)" },
  { id: "resync_percent", title: "Resync progress", unit: "%", what: "share of the data in sync with the replica" },
];
const STATS_SCOPES = [["node", "Node"], ["workload", "Workloads"], ["volume", "Volumes"], ["share", "Shares"]];

// The view's state, kept across re-renders (app.js renders every view
// again on each SSE snapshot).
const ST = {
  scope: null,        // "volume/v"
  range: "1h",
  list: null,         // GET /api/v1/stats/series
  data: {},           // series → GET /api/v1/stats reply (or { error })
  loadedFor: null,    // scope|range the data is for
  error: "",
  updated: null,      // Date of the last answer
  timer: null,
  seq: 0,
  tables: new Set(),  // series whose data table is open
  node: null,         // the rendered section, reused while nothing changed
  version: 0,
  builtVersion: -1,
  session: null,      // the session the state belongs to
};

function statsRange() { return STATS_RANGES.find((r) => r.id === ST.range) || STATS_RANGES[1]; }

// ---------- formatting ----------

// A number as Rust prints an f64 (`ferry stats --csv`): the shortest
// round-trip digits, never an exponent.
function rustFloat(x) {
  const s = String(x);
  const m = /^(-?)(\d)(?:\.(\d+))?e([+-]\d+)$/.exec(s);
  if (!m) return s;
  const [, sign, d, frac = "", e] = m;
  const exp = Number(e);
  if (exp < 0) return sign + "0." + "0".repeat(-exp - 1) + d + frac;
  return sign + d + frac + "0".repeat(Math.max(0, exp - frac.length));
}

function trimNum(v, digits) {
  return Number(v.toFixed(digits)).toString();
}

// The display scale of a metric for values up to `max`: { div, suffix }.
function statsScale(unit, max) {
  const m = Math.abs(max);
  if (unit === "bytes" || unit === "bytes/s") {
    const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (m / Math.pow(1024, i) >= 1024 && i < u.length - 1) i++;
    return { div: Math.pow(1024, i), suffix: " " + u[i] + (unit === "bytes/s" ? "/s" : "") };
  }
  if (unit === "s") {
    if (m < 1) return { div: 0.001, suffix: " ms" };
    if (m < 120) return { div: 1, suffix: " s" };
    if (m < 7200) return { div: 60, suffix: " min" };
    return { div: 3600, suffix: " h" };
  }
  if (unit === "ms") return m >= 1000 ? { div: 1000, suffix: " s" } : { div: 1, suffix: " ms" };
  if (unit === "iops") {
    if (m >= 1e6) return { div: 1e6, suffix: "M IOPS" };
    if (m >= 1e3) return { div: 1e3, suffix: "k IOPS" };
    return { div: 1, suffix: " IOPS" };
  }
  if (unit === "%") return { div: 1, suffix: " %" };
  return { div: 1, suffix: "" };
}

// One value for people: "3.2 MiB/s", "12 ms", "99.5 %".
function statsValue(unit, v) {
  const sc = statsScale(unit, v);
  const x = v / sc.div;
  const digits = Math.abs(x) >= 100 ? 0 : Math.abs(x) >= 10 ? 1 : 2;
  return trimNum(x, digits) + sc.suffix;
}

// A "nice" step (1, 2, 2.5, 5 × 10^k) for about `n` ticks up to `max`.
function niceStep(max, n) {
  const raw = max / n;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const f of [1, 2, 2.5, 5, 10]) if (f * p >= raw) return f * p;
  return 10 * p;
}

const TIME_TICKS_S = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
  172800, 604800, 1209600, 2592000, 7776000];

function timeLabel(t, span) {
  const d = new Date(t * 1000);
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  if (span <= 86400) return hm;
  const day = d.toLocaleDateString([], { month: "short", day: "numeric" });
  return span <= 7 * 86400 ? day + " " + hm : day;
}

function timeFull(t) {
  return new Date(t * 1000).toLocaleString([], { hour12: false });
}

// ---------- data ----------

function statsScopes() {
  const out = new Map();
  for (const s of (ST.list && ST.list.series) || []) {
    const [scope, name, metric] = s.split("/");
    const key = scope + "/" + name;
    if (!out.has(key)) out.set(key, { scope, name, metrics: [] });
    out.get(key).metrics.push(metric);
  }
  return out;
}

function statsSummary(points) {
  if (!points.length) return null;
  let min = Infinity, max = -Infinity, sum = 0, n = 0;
  for (const p of points) {
    min = Math.min(min, p.min);
    max = Math.max(max, p.max);
    sum += p.mean * p.count;
    n += p.count;
  }
  const last = points[points.length - 1];
  return { latest: last.mean, latestAt: last.t, min, max, mean: n ? sum / n : 0 };
}

async function statsLoad() {
  if (!S.session) return;
  const seq = ++ST.seq;
  try {
    const list = await api("GET", "/api/v1/stats/series");
    if (seq !== ST.seq) return;
    ST.list = list;
    const scopes = statsScopes();
    if (!ST.scope || !scopes.has(ST.scope)) {
      const first = [...scopes.keys()].sort((a, b) => statsScopeOrder(a) - statsScopeOrder(b) || a.localeCompare(b))[0];
      ST.scope = first || null;
    }
    const r = statsRange();
    const data = {};
    const sc = ST.scope && scopes.get(ST.scope);
    if (sc) {
      const series = STATS_METRICS.filter((m) => sc.metrics.includes(m.id)).map((m) => ST.scope + "/" + m.id);
      await Promise.all(series.map(async (s) => {
        try {
          data[s] = await api("GET", "/api/v1/stats?series=" + encodeURIComponent(s) +
            "&since=" + r.since + "&step=" + r.step);
        } catch (e) {
          data[s] = { error: e.message };
        }
      }));
    }
    if (seq !== ST.seq) return;
    ST.data = data;
    ST.loadedFor = ST.scope + "|" + ST.range;
    ST.error = "";
  } catch (e) {
    if (seq !== ST.seq) return;
    ST.error = "Could not read the statistics: " + e.message;
  }
  ST.updated = new Date();
  ST.version++;
  if (S.view === "statistics") render();
}

function statsScopeOrder(key) {
  return STATS_SCOPES.findIndex(([s]) => key.startsWith(s + "/"));
}

// Refreshes while the view is open; stops itself when it is left or the
// session ends.
function statsTick() {
  if (!S.session || S.view !== "statistics") {
    clearInterval(ST.timer);
    ST.timer = null;
    return;
  }
  if (document.hidden) return; // a tab in the background asks nothing
  statsLoad();
}

function statsEnsureTimer() {
  if (ST.timer) return;
  ST.timer = setInterval(statsTick, STATS_REFRESH_MS);
  statsLoad();
}

window.addEventListener("hashchange", () => {
  if (location.hash !== "#statistics" && ST.timer) {
    clearInterval(ST.timer);
    ST.timer = null;
  }
});

function statsChoose(change) {
  Object.assign(ST, change);
  ST.version++;
  ST.seq++; // an answer still on its way is for the old choice
  render();
  statsLoad();
}

// ---------- charts ----------

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  for (const k of kids) if (k) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

const CH = { w: 600, h: 230, l: 78, r: 14, t: 12, b: 28 };

// The chart of one series: axes, time ticks, min–max band, mean line.
function statsChart(metric, reply, label) {
  const pts = reply.points;
  const sum = statsSummary(pts);
  const from = reply.from, to = reply.to, span = Math.max(1, to - from);
  let top = metric.unit === "%" ? 100 : Math.max(0, ...pts.map((p) => p.max));
  const sc = statsScale(metric.unit, top);
  let yStep, yMax;
  if (metric.unit === "%") { yStep = 25; yMax = 100; } else {
    const scaled = top / sc.div;
    yStep = scaled > 0 ? niceStep(scaled, 4) : 1;
    yMax = scaled > 0 ? Math.ceil(scaled / yStep - 1e-9) * yStep : 4;
  }
  const pw = CH.w - CH.l - CH.r, ph = CH.h - CH.t - CH.b;
  const x = (t) => CH.l + ((t - from) / span) * pw;
  const y = (v) => CH.t + ph - Math.min(1, Math.max(0, v / sc.div / yMax)) * ph;
  const f = (n) => n.toFixed(1);

  const root = svg("svg", { viewBox: `0 0 ${CH.w} ${CH.h}`, class: "chart", role: "img", "aria-label": label,
    "data-series": reply.series, "data-points": pts.length });
  // Y grid and labels.
  // As many decimals as the step has (2.5 → 1), at most 3.
  const decimals = Math.min(3, (String(trimNum(yStep, 3)).split(".")[1] || "").length);
  for (let v = 0; v <= yMax + 1e-9; v += yStep) {
    const yy = CH.t + ph - (v / yMax) * ph;
    root.append(svg("line", { x1: CH.l, x2: CH.w - CH.r, y1: f(yy), y2: f(yy), class: v === 0 ? "axis" : "grid" }));
    root.append(svg("text", { x: CH.l - 6, y: f(yy + 4), class: "ylabel", "text-anchor": "end" },
      v === 0 ? "0" : trimNum(v, decimals) + sc.suffix));
  }
  // Time ticks.
  const tickS = TIME_TICKS_S.find((s) => span / s <= 6) || TIME_TICKS_S[TIME_TICKS_S.length - 1];
  const tz = new Date().getTimezoneOffset() * 60; // ticks on local round times
  const t0 = Math.ceil((from - tz) / tickS) * tickS + tz;
  for (let t = t0; t <= to; t += tickS) {
    const xx = x(t);
    if (xx < CH.l + 22 || xx > CH.w - CH.r - 14) continue; // its label would hit the y axis' or leave the chart
    root.append(svg("line", { x1: f(xx), x2: f(xx), y1: CH.t + ph, y2: CH.t + ph + 4, class: "axis" }));
    root.append(svg("text", { x: f(xx), y: CH.h - 8, class: "xlabel", "text-anchor": "middle" }, timeLabel(t, span)));
  }
  // Runs of points without a gap.
  const runs = [];
  let run = [];
  for (const p of pts) {
    if (run.length && p.t - run[run.length - 1].t > reply.step_s) { runs.push(run); run = []; }
    run.push(p);
  }
  if (run.length) runs.push(run);
  // Each point covers [t, t + step): drawn at its middle.
  const mid = (p) => x(Math.min(to, p.t + reply.step_s / 2));
  const band = [], line = [];
  for (const r of runs) {
    const upper = r.map((p) => f(mid(p)) + "," + f(y(p.max)));
    const lower = r.slice().reverse().map((p) => f(mid(p)) + "," + f(y(p.min)));
    band.push("M" + upper.join(" L") + " L" + lower.join(" L") + " Z");
    line.push("M" + r.map((p) => f(mid(p)) + "," + f(y(p.mean))).join(" L"));
  }
  if (band.length) root.append(svg("path", { d: band.join(" "), class: "band" }));
  if (line.length) root.append(svg("path", { d: line.join(" "), class: "mean" }));
  for (const r of runs) {
    if (r.length === 1) root.append(svg("circle", { cx: f(mid(r[0])), cy: f(y(r[0].mean)), r: 2.5, class: "dot" }));
  }
  root.append(svg("line", { x1: CH.l, x2: CH.l, y1: CH.t, y2: CH.t + ph, class: "axis" }));
  // The pointer's readout: the nearest point's time and values (for the
  // mouse; the data table below is the same for everyone).
  const cursor = svg("line", { y1: CH.t, y2: CH.t + ph, class: "cursor", visibility: "hidden", "aria-hidden": "true" });
  const readout = svg("text", { x: CH.w - CH.r - 4, y: CH.t + 12, class: "readout", "text-anchor": "end",
    visibility: "hidden", "aria-hidden": "true" });
  root.append(cursor, readout);
  const hide = () => { cursor.setAttribute("visibility", "hidden"); readout.setAttribute("visibility", "hidden"); };
  root.addEventListener("pointermove", (ev) => {
    const box = root.getBoundingClientRect();
    const sx = ((ev.clientX - box.left) * CH.w) / Math.max(1, box.width);
    let best = null, dist = Infinity;
    for (const p of pts) {
      const dd = Math.abs(mid(p) - sx);
      if (dd < dist) { dist = dd; best = p; }
    }
    if (!best || dist > 30 || sx < CH.l) { hide(); return; }
    const v = (n) => statsValue(metric.unit, n);
    cursor.setAttribute("x1", f(mid(best)));
    cursor.setAttribute("x2", f(mid(best)));
    readout.textContent = timeFull(best.t) + ": " + v(best.mean) +
      (best.min !== best.max ? " (" + v(best.min) + " – " + v(best.max) + ")" : "");
    cursor.setAttribute("visibility", "visible");
    readout.setAttribute("visibility", "visible");
  });
  root.addEventListener("pointerleave", hide);
  if (sum) {
    root.dataset.latest = sum.latest;
    root.dataset.min = sum.min;
    root.dataset.max = sum.max;
  }
  return root;
}

function statsCsv(reply) {
  return "t,mean,min,max,count\n" + reply.points.map((p) =>
    [p.t, rustFloat(p.mean), rustFloat(p.min), rustFloat(p.max), p.count].join(",") + "\n").join("");
}

function statsDownload(reply) {
  const blob = new Blob([statsCsv(reply)], { type: "text/csv" });
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: reply.series.replace(/\//g, "_") + "_" + ST.range + ".csv", hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function statsId(series) { return series.replace(/[^A-Za-z0-9_-]/g, "_"); }

function statsCard(metric, series) {
  const reply = ST.data[series];
  const r = statsRange();
  const id = statsId(series);
  const head = el("h2", { id: "t-" + id }, metric.title, " ", el("span", { class: "series" }, series));
  if (!reply) return el("article", { class: "card chartcard", "aria-labelledby": "t-" + id }, head, el("p", { class: "muted" }, "Loading…"));
  if (reply.error) {
    return el("article", { class: "card chartcard", "aria-labelledby": "t-" + id }, head,
      el("p", { class: "error" }, "Could not read " + series + ": " + reply.error));
  }
  const sum = statsSummary(reply.points);
  const every = "one point every " + statsStepText(reply.step_s);
  if (!sum) {
    return el("article", { class: "card chartcard", "aria-labelledby": "t-" + id }, head,
      el("p", { class: "empty", id: "empty-" + id },
        "No samples in the last " + r.label + ". " +
        (metric.id === "write_latency_p99_ms" ? "A point is recorded only for intervals with writes. " :
          "The series exists but has no point in this range (the agent was down, or the object did not exist then). ") +
        "Try a longer range."));
  }
  const v = (n) => statsValue(metric.unit, n);
  const label = metric.title + " of " + ST.scope.replace("/", " ") + ", last " + r.label + ": latest " + v(sum.latest) +
    ", min " + v(sum.min) + ", max " + v(sum.max) + ", mean " + v(sum.mean) + " (" + reply.points.length + " points, " + every + ")";
  const chart = statsChart(metric, reply, label);
  chart.setAttribute("aria-describedby", "d-" + id);
  const open = ST.tables.has(series);
  const details = el("details", { id: "table-" + id },
    el("summary", { id: "sum-" + id }, "Data table (" + reply.points.length + " points)"),
    open ? el("table", { class: "data" },
      el("caption", {}, metric.title + ", " + series + " (" + metric.unit + ")"),
      el("thead", {}, el("tr", {}, ["Time", "Mean", "Min", "Max", "Samples"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, reply.points.slice().reverse().map((p) => el("tr", {},
        el("td", {}, timeFull(p.t)), el("td", {}, v(p.mean)), el("td", {}, v(p.min)), el("td", {}, v(p.max)), el("td", {}, p.count))))) : null);
  if (open) details.open = true;
  details.addEventListener("toggle", () => {
    const was = ST.tables.has(series);
    if (details.open === was) return;
    if (details.open) ST.tables.add(series); else ST.tables.delete(series);
    ST.version++;
    render();
  });
  const dl = el("button", { type: "button", class: "secondary small", id: "csv-" + id,
    "aria-label": "Download CSV of " + series + ", last " + r.label }, "Download CSV");
  dl.addEventListener("click", () => statsDownload(reply));
  return el("article", { class: "card chartcard", "aria-labelledby": "t-" + id, id: "card-" + id },
    head,
    el("p", { class: "note what" }, metric.what),
    chart,
    el("p", { class: "summary", id: "d-" + id },
      el("span", {}, "latest ", el("strong", {}, v(sum.latest))), " · ",
      el("span", {}, "min ", el("strong", {}, v(sum.min))), " · ",
      el("span", {}, "max ", el("strong", {}, v(sum.max))), " · ",
      el("span", {}, "mean ", el("strong", {}, v(sum.mean))), " · ",
      el("span", { class: "muted" }, every + ", band: min–max")),
    el("div", { class: "chartactions" }, dl, details));
}

function statsStepText(s) {
  if (s % 86400 === 0) return s / 86400 + " d";
  if (s % 3600 === 0) return s / 3600 + " h";
  if (s % 60 === 0) return s / 60 + " min";
  return s + " s";
}

function statsControls(scopes) {
  const sel = el("select", { id: "stats-scope" });
  for (const [scope, title] of STATS_SCOPES) {
    const keys = [...scopes.keys()].filter((k) => k.startsWith(scope + "/")).sort();
    if (!keys.length) continue;
    const g = el("optgroup", { label: title });
    for (const k of keys) g.append(el("option", { value: k, selected: k === ST.scope }, scope + " " + scopes.get(k).name));
    sel.append(g);
  }
  sel.value = ST.scope;
  sel.addEventListener("change", () => statsChoose({ scope: sel.value }));
  const radios = STATS_RANGES.map((r) => {
    const input = el("input", { type: "radio", name: "stats-range", id: "range-" + r.id, value: r.id, checked: r.id === ST.range });
    input.addEventListener("change", () => { if (input.checked) statsChoose({ range: r.id }); });
    return [input, el("label", { for: "range-" + r.id }, r.label)];
  });
  return el("div", { class: "card statsbar" },
    el("div", { class: "field" }, el("label", { for: "stats-scope" }, "Scope"), sel),
    el("fieldset", { class: "ranges" }, el("legend", {}, "Time range"), el("div", { class: "seg" }, radios)));
}

function statistics() {
  document.title = "Statistics · ferry";
  if (ST.session !== S.session.csrf) {
    // Another login: nothing of the last session's view is shown.
    Object.assign(ST, { session: S.session.csrf, list: null, data: {}, loadedFor: null, error: "", updated: null, node: null });
    ST.version++;
  }
  statsEnsureTimer();
  if (ST.node && ST.builtVersion === ST.version) return ST.node;
  ST.builtVersion = ST.version;
  const head = el("h1", { id: "h" }, "Statistics");
  const r = statsRange();
  const status = el("p", { class: "note", id: "stats-status", role: "status" },
    ST.error ? "" : ST.updated ? "Updated " + ST.updated.toLocaleTimeString() + "; refreshed every " + STATS_REFRESH_MS / 1000 + " s while this view is open." : "Loading…");
  const parts = [head];
  if (ST.error) parts.push(el("p", { class: "error", role: "alert" }, ST.error));
  if (!ST.list) {
    parts.push(status);
  } else if (!ST.list.enabled) {
    parts.push(el("div", { class: "placeholder empty", id: "stats-empty" },
      el("p", {}, "Statistics history is off on node " + ST.list.node + " (history.enabled = false in its config): nothing is recorded here."),
      el("p", {}, "Turn it on in the [history] table of the agent's config and restart the agent; samples appear every 10 s (history.sample_interval_ms).")));
  } else if (!ST.list.series.length) {
    parts.push(el("div", { class: "placeholder empty", id: "stats-empty" },
      el("p", {}, "No samples yet on node " + ST.list.node + ": the sampler records every series every 10 s (history.sample_interval_ms), " +
        "the first within one interval of the agent's start, a volume's rates from its second sample."),
      el("p", {}, "This page refreshes every 10 s.")), status);
  } else {
    const scopes = statsScopes();
    const sc = scopes.get(ST.scope);
    parts.push(statsControls(scopes), status);
    const metrics = sc ? STATS_METRICS.filter((m) => sc.metrics.includes(m.id)) : [];
    const fresh = ST.loadedFor === ST.scope + "|" + ST.range;
    parts.push(el("div", { class: "charts", id: "charts", "aria-busy": fresh ? "false" : "true" },
      metrics.map((m) => fresh ? statsCard(m, ST.scope + "/" + m.id)
        : el("article", { class: "card chartcard" }, el("h2", {}, m.title), el("p", { class: "muted" }, "Loading…")))));
    const any = ST.scope + "/" + (metrics[0] ? metrics[0].id : "write_bytes_per_s");
    parts.push(el("p", { class: "note", id: "stats-cli" }, "The same data from the CLI: ",
      el("code", {}, "ferry stats " + any + " --since " + r.cli + " --step " + r.step + " --csv"),
      " (" + ST.list.series.length + " series on node " + ST.list.node + ", each at most " +
      bytes(ST.list.series_bytes_max) + " on disk; " + bytes(ST.list.disk_bytes) + " in all)."));
  }
  ST.node = el("section", { "aria-labelledby": "h", class: "stats" }, parts);
  return ST.node;
}

VIEW_FNS.statistics = statistics;
