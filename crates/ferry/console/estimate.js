// ferry console: the Estimate view (registered in VIEW_FNS; uses app.js's
// S, el, api, badge, bytes, when, may, confirmThen and statistics.js's svg,
// niceStep, trimNum). JetStream's Estimate tab: observations of a
// workload's writes (GET /api/v1/estimates, asked every 2 s while the view
// is open and not at all otherwise), starting one (operator and up), the
// selected one's working-set curve W(T) as an SVG chart with its data
// table, stop and delete, and the forecast of its migration over a link
// (GET /api/v1/estimates/{name}/report) with each figure's "why": its
// formula, explanation and inputs. The wording follows `ferry estimate`.
"use strict";

const EST_REFRESH_MS = 2000;

const EST = {
  list: null, error: "", updated: null, timer: null, seq: 0, session: null,
  selected: null,
  form: { name: "", kind: "volume", source: "", duration: "24h" },
  formResult: "", formError: "",
  result: {},                // per estimate: the last stop/delete outcome
  link: { choice: "bandwidth", bandwidth: "100MiB/s", maxRate: "", shipDays: "", stat: "max" },
  probes: null, probing: false, probeResult: "", probeError: "",
  report: null, reportError: "", reportBusy: false,
  open: new Set(),           // ids of the <details> the person opened
};

const EST_KINDS = [
  ["volume", "Volume", "volume name"],
  ["workload", "Workload", "workload name"],
  ["share", "Share", "share name"],
  ["device", "Block device", "device path, e.g. /dev/sdb"],
];

const EST_METHODS = {
  filter: "filter (ferry's write path)",
  watcher: "watcher (the share's operations)",
  tracepoint: "tracepoint (block_rq_issue: written sectors)",
  diskstats: "diskstats (bytes only)",
};

// ---------- formatting and parsing ----------

function estDur(s) {
  if (s === null || s === undefined || !Number.isFinite(Number(s))) return "—";
  s = Number(s);
  if (s === 0) return "0 s";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return trimNum(s, s < 10 ? 2 : 1) + " s";
  s = Math.round(s);
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}
function estRate(n) { return bytes(n) + "/s"; }
function estWindow(s) {
  if (s % 86400 === 0) return s / 86400 + " d";
  if (s % 3600 === 0) return s / 3600 + " h";
  if (s % 60 === 0) return s / 60 + " min";
  return s + " s";
}

// `ferry estimate start --duration`: a whole number with s, m, h or d.
function estParseDuration(t) {
  const m = /^\s*(\d+)\s*([smhd]?)\s*$/.exec(String(t || ""));
  if (!m) return null;
  const n = Number(m[1]) * { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
  return n > 0 ? n : null;
}

// A size per second like `100MiB/s`, `1.5 GiB/s`, `500MB/s` (the /s is
// optional; KiB, MiB, GiB, TiB or K, M, G, T are powers of 1024; kB, MB, GB,
// TB powers of 1000): bytes/s, or null.
function estParseRate(t) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)(B?)\s*(?:\/\s*s)?\s*$/.exec(String(t || ""));
  if (!m) return null;
  const pow = { "": 0, k: 1, m: 2, g: 3, t: 4 }[m[2].toLowerCase()];
  const base = m[2] && !m[3] && m[4] ? 1000 : 1024;
  const n = Math.round(Number(m[1]) * Math.pow(base, pow));
  return n > 0 ? n : null;
}

function estInput(i) {
  switch (i.unit) {
    case "B": return bytes(i.value);
    case "B/s": return estRate(i.value);
    case "s": return estDur(i.value);
    case "": return String(Math.round(i.value * 1000) / 1000);
    default: return Math.round(i.value * 1000) / 1000 + " " + i.unit;
  }
}

function estVerdict(v) {
  if (!v) return "—";
  if (v.verdict === "converges") return "ready in " + estDur(v.seconds) + " (" + v.passes + (v.passes === 1 ? " pass)" : " passes)");
  if (v.verdict === "diverges") return "does not converge: writes dirty " + estRate(v.dirty_rate) + " against " + estRate(v.bandwidth) + " of link";
  if (v.verdict === "stalls") return "does not converge: the passes shrink towards " + estDur(v.pass_s) + " and stay there";
  return String(v.verdict);
}

function estThrottle(t) {
  if (t.throttle_pct === 0) return "converges without throttling";
  if (t.throttle_pct === null || t.throttle_pct === undefined) return "does not converge at any throttle";
  const to = t.write_rate_bytes_per_s !== null && t.write_rate_bytes_per_s !== undefined ? " (to " + estRate(t.write_rate_bytes_per_s) + ")" : "";
  return "converges with writes held back " + t.throttle_pct + "%" + to +
    (t.within_auto_converge ? ": --auto-converge reaches it" : ": beyond --auto-converge; lower the write load or raise the bandwidth");
}

function estId(n) { return String(n).replace(/[^A-Za-z0-9_-]/g, "_"); }
function estPath(n, tail) { return "/api/v1/estimates/" + encodeURIComponent(n) + (tail || ""); }

// A <details> whose open state survives the re-render on every update.
function estDetails(id, summary, ...body) {
  const d = el("details", { id, open: EST.open.has(id) }, el("summary", {}, summary), ...body);
  d.addEventListener("toggle", () => { if (d.open) EST.open.add(id); else EST.open.delete(id); });
  return d;
}

// ---------- data ----------

async function estLoad() {
  if (!S.session) return;
  const seq = ++EST.seq;
  try {
    const list = await api("GET", "/api/v1/estimates");
    if (seq !== EST.seq) return;
    EST.list = list;
    EST.error = "";
    if (!EST.selected || !list.some((e) => e.name === EST.selected)) EST.selected = list.length ? list[0].name : null;
  } catch (e) {
    if (seq !== EST.seq) return;
    EST.error = "Could not list the estimates: " + e.message;
  }
  EST.updated = new Date();
  if (S.view === "estimate") render();
}

async function estLoadProbes() {
  try {
    EST.probes = await api("GET", "/api/v1/probes");
  } catch (e) {
    EST.probes = [];
    EST.probeError = "Could not list the probes: " + e.message;
  }
  if (S.view === "estimate") render();
}

function estTick() {
  if (!S.session || S.view !== "estimate") {
    clearInterval(EST.timer);
    EST.timer = null;
    return;
  }
  if (document.hidden) return;
  estLoad();
}

function estEnsureTimer() {
  if (EST.timer) return;
  EST.timer = setInterval(estTick, EST_REFRESH_MS);
  estLoad();
  estLoadProbes();
}

window.addEventListener("hashchange", () => {
  if (location.hash !== "#estimate" && EST.timer) {
    clearInterval(EST.timer);
    EST.timer = null;
  }
});

// After an action: its outcome, a fresh list, the focus back on `focusId`.
async function estAct(button, key, method, path, body, done, focusId) {
  button.disabled = true;
  EST.result[key] = "working…";
  render();
  try {
    const r = await api(method, path, body);
    EST.result[key] = done(r);
  } catch (e) {
    EST.result[key] = "Refused: " + e.message;
  }
  await estLoad();
  render();
  const again = $(focusId || button.id);
  if (again) again.focus();
}

// ---------- the start form ----------

function estField(id, label, obj, key, attrs) {
  const input = el("input", Object.assign({ id, name: id, value: obj[key] || "", autocomplete: "off", spellcheck: "false" }, attrs || {}));
  input.addEventListener("input", () => { obj[key] = input.value; });
  return el("div", { class: "field" }, el("label", { for: id }, label), input);
}

function estSelect(id, label, obj, key, options, onchange) {
  const sel = el("select", { id, name: id },
    options.map(([value, text]) => el("option", { value, selected: obj[key] === value }, text)));
  sel.addEventListener("change", () => { obj[key] = sel.value; if (onchange) onchange(); });
  return el("div", { class: "field" }, el("label", { for: id }, label), sel);
}

function estStartForm() {
  const f = EST.form;
  const kind = EST_KINDS.find((k) => k[0] === f.kind) || EST_KINDS[0];
  const go = el("button", { type: "submit", id: "est-start" }, "Start estimate");
  const form = el("form", { id: "est-form", class: "start-form", "aria-labelledby": "est-start-h", novalidate: true },
    el("div", { class: "fields" },
      estField("est-name", "Estimate name", f, "name", { placeholder: "e.g. web-24h", required: true }),
      estSelect("est-kind", "Source kind", f, "kind", EST_KINDS.map((k) => [k[0], k[1]]), () => render()),
      estField("est-source", kind[1] + (kind[0] === "device" ? " path" : " name"), f, "source", { placeholder: kind[2], required: true }),
      estField("est-duration", "Duration (s, m, h or d)", f, "duration", { placeholder: "24h", required: true })),
    el("div", { class: "actions" }, go),
    el("p", { class: "error", id: "est-form-error", role: "alert" }, EST.formError),
    el("p", { class: "result", id: "est-form-result", role: "status" }, EST.formResult));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    EST.formError = ""; EST.formResult = "";
    const dur = estParseDuration(f.duration);
    if (!f.name.trim()) EST.formError = "Name the estimate.";
    else if (!f.source.trim()) EST.formError = "Give the " + kind[2] + ".";
    else if (dur === null) EST.formError = "Duration: a whole number with s, m, h or d (e.g. 1h, 24h).";
    if (EST.formError) { render(); const n = $("est-form-error"); if (n) n.focus(); return; }
    const body = { name: f.name.trim(), duration_s: dur };
    body[f.kind] = f.source.trim();
    go.disabled = true;
    EST.formResult = "starting…";
    render();
    try {
      const s = await api("POST", "/api/v1/estimates", body);
      EST.formResult = "Observing " + s.source.kind + " " + s.source.name + " as estimate " + s.name + " for " + estDur(s.duration_s) + ".";
      EST.selected = s.name;
      EST.report = null;
      f.name = ""; f.source = "";
    } catch (e) {
      EST.formResult = "";
      EST.formError = "Refused: " + e.message;
    }
    await estLoad();
    render();
    const b = $("est-start");
    if (b) b.focus();
  });
  return el("div", { class: "card" }, el("h2", { id: "est-start-h" }, "Start an estimate"),
    el("p", { class: "note" }, "Observes the writes for the duration (default 24 h in the CLI), in the agent: it survives restarts, the time the agent is down is not counted. Same as ",
      el("code", {}, "ferry estimate start " + (f.name.trim() || "NAME") + " --" + f.kind + " " +
      (f.source.trim() || (f.kind === "device" ? "/dev/X" : f.kind.toUpperCase())) + " --duration " + (f.duration.trim() || "24h")), "."),
    form);
}

// ---------- the list ----------

function estList() {
  const list = EST.list || [];
  if (!list.length) {
    return el("div", { class: "card" }, el("h2", {}, "Estimates"),
      el("p", { class: "muted", id: "est-none" }, "No estimates on node " + S.node.node_name + " yet." +
        (may("operator") ? " Start one below." : " An operator starts them (ferry estimate start).")));
  }
  const rows = list.map((e) => {
    const id = estId(e.name);
    const left = Math.max(0, e.duration_s - e.observed_s);
    const pct = Math.round(Math.min(1, e.progress) * 1000) / 10;
    const method = EST_METHODS[e.method] || e.method;
    const sel = el("button", { type: "button", class: "secondary small", id: "est-select-" + id,
      "aria-pressed": e.name === EST.selected ? "true" : "false" }, e.name === EST.selected ? "Shown" : "Show");
    sel.addEventListener("click", () => {
      EST.selected = e.name; EST.report = null; EST.reportError = "";
      render();
      const again = $("est-select-" + id);
      if (again) again.focus();
    });
    return el("tr", { "data-name": e.name, class: e.name === EST.selected ? "selected" : null },
      el("th", { scope: "row" }, e.name),
      el("td", {}, e.source.kind + " ", el("strong", {}, e.source.name),
        e.source.members.length > 1 || (e.source.members[0] && e.source.members[0] !== e.source.name)
          ? el("div", { class: "note" }, "volumes: " + e.source.members.join(", ")) : null),
      el("td", {}, method, e.unique_bytes_upper_bound || e.method === "diskstats"
        ? el("div", {}, el("span", { class: "badge warn" }, "upper bound")) : null),
      el("td", {}, badge(e.state), e.error ? el("div", { class: "note" }, e.error) : null),
      el("td", { class: "est-progress" },
        el("progress", { max: "100", value: String(pct), "aria-label": e.name + ": observed " + pct + "%" }),
        el("div", { class: "note" }, estDur(e.observed_s) + " of " + estDur(e.duration_s) + " observed" +
          (e.state === "observing" || e.state === "waiting" ? " · " + estDur(left) + " left" : "") +
          (e.unobserved_s >= 1 ? " · " + estDur(e.unobserved_s) + " not observed" : ""))),
      el("td", { class: "nowrap" }, estRate(e.write_bytes_per_s), el("div", { class: "note" },
        trimNum(e.write_iops, 1) + " write IOPS · " + trimNum(e.read_iops, 1) + " read IOPS")),
      el("td", { class: "nowrap" }, bytes(e.allocated_bytes), el("div", { class: "note" }, "of " + bytes(e.size_bytes)),
        e.events_dropped > 0 ? el("div", { class: "badge warn", title: "estimate.tap_events_max was reached: W(T) is a lower bound" },
          e.events_dropped + " events dropped") : null),
      el("td", {}, sel));
  });
  return el("div", { class: "card" }, el("h2", { id: "est-list-h" }, "Estimates"),
    el("table", { id: "est-list", "aria-labelledby": "est-list-h" },
      el("thead", {}, el("tr", {}, ["Name", "Source", "Method", "State", "Observed", "Write rate (last 10 s)", "Allocated"]
        .map((h) => el("th", { scope: "col" }, h)), el("th", { scope: "col" }, el("span", { class: "sr-only" }, "Show")))),
      el("tbody", {}, rows)));
}

// ---------- W(T) ----------

// Drawn at about its own size in the card (its labels stay readable).
const WT = { w: 470, h: 250, l: 66, r: 14, t: 12, b: 40 };
const WT_TICKS = [1, 10, 60, 600, 3600, 6 * 3600, 86400];

// The working-set curve: distinct bytes written within a window of length
// T, T on a log scale from 1 s to 24 h; the max over all windows as a line
// with points, the mean dashed.
function estChart(e) {
  const keyBytes = e.block_bytes || 0;
  const pts = e.working_set.map((p) => {
    const kb = keyBytes || (p.max_keys ? p.max_bytes / p.max_keys : 0);
    return { t: p.window_s, max: p.max_bytes, mean: p.mean_keys * kb, p };
  }).filter((p) => p.t >= 1);
  const top = Math.max(0, ...pts.map((p) => p.max));
  const sc = statsScale("bytes", top);
  const scaled = top / sc.div;
  const yStep = scaled > 0 ? niceStep(scaled, 4) : 1;
  const yMax = scaled > 0 ? Math.ceil(scaled / yStep - 1e-9) * yStep : 4;
  const pw = WT.w - WT.l - WT.r, ph = WT.h - WT.t - WT.b;
  const lmin = 0, lmax = Math.log10(86400);
  const x = (t) => WT.l + ((Math.log10(Math.min(86400, Math.max(1, t))) - lmin) / (lmax - lmin)) * pw;
  const y = (v) => WT.t + ph - Math.min(1, Math.max(0, v / sc.div / yMax)) * ph;
  const f = (n) => n.toFixed(1);
  const last = pts[pts.length - 1];
  const label = "Working set W(T) of estimate " + e.name + ": distinct bytes written within a window of length T, " +
    pts.length + " window lengths measured" + (last ? ", up to " + estWindow(last.t) + " (max " + bytes(last.max) + ")" : "") + ".";
  const root = svg("svg", { viewBox: `0 0 ${WT.w} ${WT.h}`, class: "chart", role: "img", "aria-label": label,
    id: "wt-chart", "data-points": pts.length });
  const decimals = Math.min(3, (String(trimNum(yStep, 3)).split(".")[1] || "").length);
  for (let v = 0; v <= yMax + 1e-9; v += yStep) {
    const yy = WT.t + ph - (v / yMax) * ph;
    root.append(svg("line", { x1: WT.l, x2: WT.w - WT.r, y1: f(yy), y2: f(yy), class: v === 0 ? "axis" : "grid" }));
    root.append(svg("text", { x: WT.l - 6, y: f(yy + 4), class: "ylabel", "text-anchor": "end" }, v === 0 ? "0" : trimNum(v, decimals) + sc.suffix));
  }
  for (const t of WT_TICKS) {
    const xx = x(t);
    root.append(svg("line", { x1: f(xx), x2: f(xx), y1: WT.t, y2: WT.t + ph, class: "grid" }));
    root.append(svg("line", { x1: f(xx), x2: f(xx), y1: WT.t + ph, y2: WT.t + ph + 4, class: "axis" }));
    root.append(svg("text", { x: f(xx), y: WT.t + ph + 17, class: "xlabel", "text-anchor": t === 86400 ? "end" : t === 1 ? "start" : "middle" }, estWindow(t)));
  }
  root.append(svg("text", { x: WT.l + pw / 2, y: WT.h - 4, class: "xlabel", "text-anchor": "middle" }, "window length T (log scale)"));
  root.append(svg("line", { x1: WT.l, x2: WT.l, y1: WT.t, y2: WT.t + ph, class: "axis" }));
  if (pts.length) {
    root.append(svg("path", { d: "M" + pts.map((p) => f(x(p.t)) + "," + f(y(p.mean))).join(" L"), class: "wt-mean" }));
    root.append(svg("path", { d: "M" + pts.map((p) => f(x(p.t)) + "," + f(y(p.max))).join(" L"), class: "mean" }));
    for (const p of pts) {
      root.append(svg("circle", { cx: f(x(p.t)), cy: f(y(p.max)), r: 3, class: "dot" },
        svg("title", {}, estWindow(p.t) + ": max " + bytes(p.max) + ", mean " + bytes(p.mean))));
    }
  }
  return root;
}

function estCurveCard(e) {
  const id = estId(e.name);
  const unit = e.key_kind === "files" ? "files" : bytes(e.block_bytes || 0) + " blocks";
  const parts = [el("h2", { id: "wt-h" }, "Working set W(T) of ", e.name)];
  parts.push(el("p", { class: "note what" }, "Distinct " + unit + " written within any window of length T: what a copy taking T has to send again (overwrites of one block count once)."));
  if (e.unique_bytes_upper_bound) {
    parts.push(el("p", { class: "alert", id: "wt-bound" }, "diskstats has no addresses: W(T) is not measured; the " +
      bytes(e.bytes_written) + " written bound the unique bytes from above."));
  }
  if (!e.working_set.length) {
    parts.push(el("p", { class: "empty", id: "wt-empty" }, "No full window yet: the shortest (1 s) needs a few seconds of observation, longer ones as they pass."));
  } else {
    const chart = estChart(e);
    chart.setAttribute("aria-describedby", "wt-d");
    const last = e.working_set[e.working_set.length - 1];
    parts.push(chart,
      el("p", { class: "summary", id: "wt-d" },
        el("span", { class: "key key-max" }, "max over the windows (line with points)"), " · ",
        el("span", { class: "key key-mean" }, "mean (dashed)"), " · ",
        "longest window measured ", el("strong", {}, estWindow(last.window_s)), ": max ", el("strong", {}, bytes(last.max_bytes)),
        " (" + last.max_keys + " " + (e.key_kind === "files" ? "files" : "blocks") + ")"),
      estDetails("wt-table-" + id, "Data table (" + e.working_set.length + " window lengths)",
        el("table", { class: "data", id: "wt-table" },
          el("caption", {}, "W(T) of estimate " + e.name + ", distinct " + unit),
          el("thead", {}, el("tr", {}, ["Window T", "Max (" + (e.key_kind === "files" ? "files" : "blocks") + ")", "Max bytes", "Mean", "Windows measured"]
            .map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, e.working_set.map((p) => el("tr", {},
            el("td", {}, estWindow(p.window_s)), el("td", {}, p.max_keys), el("td", {}, bytes(p.max_bytes)),
            el("td", {}, trimNum(p.mean_keys, 1)), el("td", {}, p.windows)))))));
  }
  parts.push(el("dl", { class: "kv" },
    el("dt", {}, "Written"), el("dd", {}, bytes(e.bytes_written) + " in " + e.write_ios + " writes (" + e.read_ios + " reads)"),
    el("dt", {}, "Started"), el("dd", {}, new Date(e.started_unix_ms).toLocaleString([], { hour12: false }) + ", ends " +
      new Date(e.ends_unix_ms).toLocaleString([], { hour12: false })),
    el("dt", {}, "Memory"), el("dd", {}, bytes(e.memory_bytes) + " (bound " + bytes(e.memory_bound_bytes) + ")")));
  if (e.events_dropped > 0) {
    parts.push(el("p", { class: "alert" }, e.events_dropped + " write events dropped (estimate.tap_events_max): W(T) is a lower bound."));
  }
  if (may("operator")) {
    const actions = [];
    if (e.state === "observing" || e.state === "waiting") {
      const stop = el("button", { type: "button", class: "secondary", id: "est-stop" }, "Stop observing");
      stop.addEventListener("click", () => confirmThen("Stop estimate " + e.name + "?",
        "It stops observing after " + estDur(e.observed_s) + "; what it observed stays for the forecast.", "Stop",
        () => estAct(stop, e.name, "POST", estPath(e.name, "/stop"), {},
          (s) => "Estimate " + s.name + " " + s.state + " after " + estDur(s.observed_s) + " observed.")));
      actions.push(stop);
    }
    const del = el("button", { type: "button", class: "danger", id: "est-delete" }, "Delete");
    del.addEventListener("click", () => confirmThen("Delete estimate " + e.name + "?",
      "It stops observing and forgets what it observed (" + estDur(e.observed_s) + "). This cannot be undone.", "Delete",
      () => estAct(del, e.name, "DELETE", estPath(e.name), undefined, (d) => "Estimate " + d.deleted + " deleted.", "est-list-h")));
    actions.push(del);
    parts.push(el("div", { class: "actions" }, actions));
  }
  parts.push(el("p", { class: "result", id: "est-result", role: "status" }, EST.result[e.name] || ""));
  return el("article", { class: "card chartcard", "aria-labelledby": "wt-h", id: "est-curve" }, parts);
}

// ---------- forecast ----------

function estLatestProbes() {
  const by = new Map();
  for (const p of EST.probes || []) {
    const was = by.get(p.to);
    if (!was || p.at_unix_ms > was.at_unix_ms) by.set(p.to, p);
  }
  return by;
}

function estProbeText(p) {
  return "link " + p.node + " → " + p.to + ": " + estRate(p.throughput_bytes_per_s) + " over " + estDur(p.seconds) +
    " (TLS replication transport), round trip " + p.rtt_ms_idle.toFixed(2) + " ms idle, " + p.rtt_ms_p50.toFixed(2) +
    " ms p50 / " + p.rtt_ms_p99.toFixed(2) + " ms p99 under load" +
    (p.limited ? "; at --max-rate " + estRate(p.limited.max_rate_bytes_per_s) + ": " + estRate(p.limited.throughput_bytes_per_s) : "") +
    (p.under_load.length ? "; under load: " + p.under_load.map((l) => "estimate " + l.estimate + " writing " + estRate(l.write_bytes_per_s)).join(", ")
      : "; no estimate was observing: an idle machine may overstate what a migration gets") + ".";
}

async function estForecast(e) {
  const L = EST.link;
  EST.reportError = ""; EST.probeError = "";
  const q = [];
  if (L.choice === "bandwidth") {
    const bw = estParseRate(L.bandwidth);
    if (bw === null) EST.reportError = "Bandwidth: a size per second, e.g. 100MiB/s or 1GiB/s.";
    else q.push("bandwidth_bytes_per_s=" + bw);
  } else {
    q.push("to=" + encodeURIComponent(L.choice.replace(/^to:/, "")));
  }
  if (L.maxRate.trim()) {
    const mr = estParseRate(L.maxRate);
    if (mr === null) EST.reportError = "Max rate: a size per second, e.g. 50MiB/s, or empty for none.";
    else q.push("max_rate_bytes_per_s=" + mr);
  }
  if (L.shipDays.trim()) {
    const d = Number(L.shipDays);
    if (!Number.isFinite(d) || d < 0) EST.reportError = "Ship days: a number of days, e.g. 2, or empty.";
    else q.push("ship_days=" + d);
  }
  q.push("stat=" + L.stat);
  if (EST.reportError) { render(); const n = $("fc-error"); if (n) n.focus(); return; }
  EST.reportBusy = true;
  render();
  try {
    EST.report = await api("GET", estPath(e.name, "/report?" + q.join("&")));
  } catch (err) {
    EST.report = null;
    EST.reportError = "No forecast: " + err.message;
  }
  EST.reportBusy = false;
  render();
  const go = $("fc-go");
  if (go) go.focus();
}

async function estProbe(to) {
  EST.probing = true;
  EST.probeError = ""; EST.probeResult = ""; EST.reportError = "";
  render();
  const body = { to, seconds: 5 };
  const mr = EST.link.maxRate.trim() ? estParseRate(EST.link.maxRate) : null;
  if (mr) body.max_rate_bytes_per_s = mr;
  try {
    const p = await api("POST", "/api/v1/probes", body);
    EST.probeResult = estProbeText(p);
    EST.link.choice = "to:" + p.to;
    await estLoadProbes();
  } catch (err) {
    EST.probeError = "Probe refused: " + err.message;
  }
  EST.probing = false;
  render();
  const b = $("fc-probe");
  if (b) b.focus();
}

function estForecastForm(e) {
  const L = EST.link;
  const latest = estLatestProbes();
  const peers = (S.nodes || []).map((p) => p.name);
  const choices = [["bandwidth", "A bandwidth I enter"]];
  for (const n of new Set([...latest.keys(), ...peers])) {
    const p = latest.get(n);
    choices.push(["to:" + n, p ? "Last probe to " + n + " (" + estRate(p.throughput_bytes_per_s) + ", " + when(p.at_unix_ms) + ")"
      : n + " (not probed yet)"]);
  }
  if (!choices.some((c) => c[0] === L.choice)) L.choice = "bandwidth";
  const fields = [estSelect("fc-link", "Link", L, "choice", choices, () => render())];
  if (L.choice === "bandwidth") fields.push(estField("fc-bandwidth", "Bandwidth", L, "bandwidth", { placeholder: "100MiB/s" }));
  fields.push(estField("fc-max-rate", "Max rate (optional)", L, "maxRate", { placeholder: "none, e.g. 50MiB/s" }),
    estField("fc-ship-days", "Ship days (optional)", L, "shipDays", { placeholder: "e.g. 2", inputmode: "decimal" }),
    estSelect("fc-stat", "W(T) statistic", L, "stat", [["max", "max (worst window)"], ["mean", "mean"]]));
  const go = el("button", { type: "submit", id: "fc-go", disabled: EST.reportBusy }, EST.reportBusy ? "Forecasting…" : "Forecast");
  const actions = [go];
  const probeTo = L.choice.startsWith("to:") ? L.choice.slice(3) : peers[0];
  if (may("operator") && probeTo) {
    const pb = el("button", { type: "button", class: "secondary", id: "fc-probe", disabled: EST.probing },
      EST.probing ? "Probing " + probeTo + "…" : "Probe link to " + probeTo);
    pb.addEventListener("click", () => estProbe(probeTo));
    actions.push(pb);
  }
  const form = el("form", { id: "fc-form", "aria-labelledby": "fc-h", novalidate: true },
    el("div", { class: "fields" }, fields),
    el("div", { class: "actions" }, actions),
    el("p", { class: "error", id: "fc-error", role: "alert", tabindex: "-1" }, EST.reportError || EST.probeError),
    el("p", { class: "result", id: "fc-probe-result", role: "status" },
      EST.probing ? "Measuring the link for 5 s" + (L.maxRate.trim() ? ", then 5 s at the max rate" : "") + " while the workload runs…" : EST.probeResult));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); estForecast(e); });
  return form;
}

// One figure: its value in big, its words, and its "why" to open.
function estFigure(id, title, value, words, why) {
  const inputs = (why && why.inputs) || [];
  return el("div", { class: "figure fc-figure", id: "fc-" + id },
    el("span", { class: "l" }, title),
    el("span", { class: "n" }, value),
    words ? el("p", { class: "words" }, words) : null,
    why ? estDetails("why-" + id, "Why",
      el("p", { class: "formula" }, why.explanation, " ", el("span", { class: "muted" }, "(", el("code", {}, why.formula), ")")),
      inputs.length ? el("table", { class: "inputs" },
        el("caption", {}, "Inputs of " + title.toLowerCase()),
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Input"), el("th", { scope: "col" }, "Value"), el("th", { scope: "col" }, "Unit"))),
        el("tbody", {}, inputs.map((i) => el("tr", {}, el("td", {}, el("code", {}, i.name)), el("td", {}, estInput(i)), el("td", {}, i.unit || "—")))))
        : el("p", { class: "muted" }, "No inputs.")) : null);
}

function estReport(r) {
  const f = r.forecast;
  const c = f.cutover;
  const figs = [];
  // The copy gets what the streamed writes leave of the link (at most the
  // max rate): the why's copy_rate input.
  const cr = (f.initial_sync.why.inputs.find((i) => i.name === "copy_rate") || {}).value;
  const init = estFigure("initial-sync", "Initial sync", estDur(f.initial_sync.seconds),
    bytes(r.allocated_bytes) + " allocated (holes skipped) at a copy rate of " +
    estRate(cr === undefined ? r.link.bandwidth_bytes_per_s : cr) + " (of " + estRate(r.link.bandwidth_bytes_per_s) + ")", f.initial_sync.why);
  init.dataset.seconds = f.initial_sync.seconds;
  figs.push(init);
  for (const [id, t, rf] of [["ready-sync", "Time to ready, sync", f.ready_sync], ["ready-async", "Time to ready, async", f.ready_async]]) {
    const v = rf.verdict;
    const fig = estFigure(id, t, v.verdict === "converges" ? estDur(v.seconds) : "never", estVerdict(v), rf.why);
    fig.dataset.verdict = v.verdict;
    figs.push(fig);
  }
  for (const [id, t] of [["throttle-sync", f.throttle_sync], ["throttle-async", f.throttle_async]]) {
    figs.push(estFigure(id, "Throttle needed, " + t.mode,
      t.throttle_pct === null || t.throttle_pct === undefined ? "none works" : t.throttle_pct + " %", estThrottle(t), t.why));
  }
  if (f.lag) {
    const l = f.lag;
    figs.push(estFigure("lag", "Steady lag (async)", estDur(l.max_lag_s),
      "max " + estDur(l.max_lag_s) + ", mean " + estDur(l.mean_lag_s) +
      (l.overflows > 0 ? "; the backlog passed backlog_bytes_max " + l.overflows + " times (a resync)" : "") +
      (l.unbounded ? "; unbounded: writes reach the link's rate" : ""), l.why));
  } else {
    figs.push(estFigure("lag", "Steady lag (async)", "—", "Not forecast from this observation.", null));
  }
  figs.push(estFigure("cutover", "Cutover downtime", estDur(c.seconds),
    "drain " + estDur(c.drain_s) + " (" + bytes(c.drain_bytes) + ") + re-hash " + estDur(c.rehash_s) + " (" + bytes(c.rehash_bytes) +
    ") + commit " + estDur(c.commit_s) + " + start hook " + estDur(c.start_hook_s), c.why));
  const hours = f.best_hours.hours;
  const hourText = (h) => new Date(h.start_s * 1000).toLocaleString([], { hour12: false, month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }) +
    " (" + h.keys + " distinct, " + bytes(h.bytes_written) + " written)";
  figs.push(estFigure("best-hours", "Best cutover hours", hours.length ? new Date(hours[0].start_s * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false }) : "—",
    hours.length ? hours.map(hourText).join("; ") : "No whole hour observed yet.", f.best_hours.why));
  if (f.seeding) {
    const s = f.seeding;
    figs.push(estFigure("seeding", "Offline seeding", s.faster === "shipment" ? "ship the disk" : s.faster === "network" ? "send it" : "neither",
      "ship in " + estDur(s.ship_s) + " then catch up " + bytes(s.catch_up_bytes) + " (" + estVerdict(s.catch_up) + "), total " +
      (s.shipment_total_s === null || s.shipment_total_s === undefined ? "never" : estDur(s.shipment_total_s)) +
      "; over the link: " + estVerdict(s.network.verdict), s.why));
  } else {
    figs.push(estFigure("seeding", "Offline seeding", "—", "Enter the days a shipped disk takes to compare.", null));
  }
  const link = r.link.probe ? estRate(r.link.bandwidth_bytes_per_s) + " (probe to " + r.link.probe.to + ", " + r.link.probe.rtt_ms_p50.toFixed(2) + " ms p50 round trip under load)"
    : estRate(r.link.bandwidth_bytes_per_s) + " (given)";
  return el("div", { id: "fc-report" },
    el("p", { class: "fc-head" }, "Forecast for estimate ", el("strong", {}, r.name), " (" + r.source.kind + " " + r.source.name + "; observed " +
      estDur(r.observed_s) + "; W(T) statistic: " + r.stat + ") over link " + link +
      (r.link.max_rate_bytes_per_s ? ", --max-rate " + estRate(r.link.max_rate_bytes_per_s) : "") + "."),
    r.warnings.length ? el("ul", { class: "fc-warnings", id: "fc-warnings", "aria-label": "Notes on this forecast" },
      r.warnings.map((w) => el("li", {}, w))) : null,
    el("div", { class: "figures fc-figures" }, figs),
    r.shared_link ? el("p", {}, "Sharing the link: order " + r.shared_link.order.join(" → ") + ", total " +
      (r.shared_link.total_s === null || r.shared_link.total_s === undefined ? "never" : estDur(r.shared_link.total_s))) : null);
}

function estForecastCard(e) {
  const stale = EST.report && EST.report.name !== e.name;
  return el("article", { class: "card", "aria-labelledby": "fc-h", id: "est-forecast" },
    el("h2", { id: "fc-h" }, "Forecast of migrating ", e.name),
    el("p", { class: "note" }, "Over the link measured by the last probe to a node (", el("code", {}, "ferry estimate probe --to NODE"),
      ", run while the workload writes) or over a bandwidth you enter. Each figure's Why shows its formula and inputs."),
    estForecastForm(e),
    EST.report && !stale ? estReport(EST.report) : null);
}

// ---------- the view ----------

function estimate() {
  document.title = "Estimate · ferry";
  if (EST.session !== S.session.csrf) {
    Object.assign(EST, { session: S.session.csrf, list: null, error: "", updated: null, selected: null, report: null,
      reportError: "", probes: null, probeResult: "", probeError: "", formResult: "", formError: "", result: {} });
  }
  estEnsureTimer();
  const parts = [el("h1", { id: "h" }, "Estimate")];
  parts.push(el("p", { class: "note", id: "est-status", role: "status" },
    EST.updated ? "Updated " + EST.updated.toLocaleTimeString() + "; refreshed every " + EST_REFRESH_MS / 1000 + " s while this view is open." : "Loading…"));
  if (EST.error) parts.push(el("p", { class: "error", role: "alert" }, EST.error));
  if (EST.list) {
    parts.push(estList());
    const e = EST.list.find((x) => x.name === EST.selected);
    if (e) parts.push(el("div", { class: "est-detail" }, el("div", { class: "stats" }, estCurveCard(e)), estForecastCard(e)));
    if (may("operator")) parts.push(estStartForm());
  }
  return el("section", { "aria-labelledby": "h", class: "migrate est" }, parts);
}

VIEW_FNS.estimate = estimate;
