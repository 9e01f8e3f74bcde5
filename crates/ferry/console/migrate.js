// ferry console: the Migrate view (registered in VIEW_FNS; uses app.js's
// S, el, api, badge, bytes, when, may, act, confirmThen). Start a
// migration; per migration its phase, a progress bar with bytes left and
// ETA, write vs link rate, lag, not_converging with the status's advice,
// and the actions its phase allows (operator and up only): live rate
// change, test cutover, cutover, scheduled cutover, rollback, finalize;
// once cut over, the cutover report and a link to the printable report.
// Every datum comes from the migration status (S.migrations, live over
// the SSE `migrations` event); the form's values live in MIG below so that
// the re-render on each update keeps them.
"use strict";

const MIG = {
  // The start form.
  form: { workload: "", to: "", mode: "sync", rate: "", autoConverge: false },
  // Per workload: the rate field, the schedule fields, the last result.
  rate: {}, sched: {}, result: {}, open: {},
  // From GET /api/v1/workloads and /api/v1/volumes: the bar's total is
  // the bytes allocated in the workload's volumes (what the seeding copies).
  workloads: null, sizes: {}, loading: false, loadError: "", loadedAt: 0,
  // The largest bytes_remaining seen per workload (if larger than its volumes).
  peak: {},
};

const MIG_LIVE = ["seeding", "syncing", "ready"];

async function migLoad() {
  if (MIG.loading) return;
  MIG.loading = true;
  try {
    const [workloads, volumes] = await Promise.all([api("GET", "/api/v1/workloads"), api("GET", "/api/v1/volumes")]);
    MIG.workloads = workloads;
    MIG.sizes = {};
    for (const v of volumes) MIG.sizes[v.name] = v.allocated_bytes;
    MIG.loadError = "";
  } catch (e) {
    MIG.loadError = "Could not list the workloads: " + e.message;
    MIG.workloads = MIG.workloads || [];
  } finally {
    MIG.loading = false;
    MIG.loadedAt = Date.now();
    if (S.view === "migrate") render();
  }
}

function migId(w) { return w.replace(/[^A-Za-z0-9_-]/g, "_"); }
function migPath(w, tail) { return "/api/v1/migrations/" + encodeURIComponent(w) + (tail || ""); }
function migRate(n) { return bytes(n) + "/s"; }
function migSecs(s) {
  if (s === null || s === undefined) return null;
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
}
function migUs(us) { return us < 1000 ? us + " µs" : (us / 1000).toFixed(1) + " ms"; }
function migHasVm(w) { const spec = (MIG.workloads || []).find((x) => x.name === w); return !!(spec && spec.vm); }
function migMs(x) { return x === null || x === undefined ? "—" : Number(x).toFixed(1) + " ms"; }
function migMiB(text) {
  const t = String(text || "").trim();
  if (t === "") return 0;
  const n = Number(t);
  if (!Number.isFinite(n) || n < 0) return null;
  return Math.round(n * 1048576);
}

// A field bound to MIG: label + input, its value kept across re-renders.
function migField(id, label, obj, key, attrs) {
  const input = el("input", Object.assign({ id, name: id, value: obj[key] || "" }, attrs || {}));
  input.addEventListener("input", () => { obj[key] = input.value; });
  // The view re-renders on every update: render() gives focus back to the
  // new input; give the caret back too.
  const old = document.activeElement;
  if (old && old.id === id && typeof old.selectionStart === "number") {
    const [a, b] = [old.selectionStart, old.selectionEnd];
    queueMicrotask(() => { try { input.setSelectionRange(a, b); } catch (_) { /* not a text field */ } });
  }
  return el("div", { class: "field" }, el("label", { for: id }, label), input);
}

function migSelect(id, label, obj, key, options, attrs) {
  const sel = el("select", Object.assign({ id, name: id }, attrs || {}),
    options.map(([value, text]) => el("option", { value, selected: obj[key] === value }, text)));
  sel.addEventListener("change", () => { obj[key] = sel.value; });
  return el("div", { class: "field" }, el("label", { for: id }, label), sel);
}

function migStartForm() {
  const f = MIG.form;
  if (MIG.workloads === null) {
    migLoad();
    return el("div", { class: "card" }, el("h2", {}, "Start a migration"), el("p", { class: "muted" }, "Loading the workloads…"));
  }
  // A workload with a migration record here is not offered again (a
  // completed one has moved; a rolled-back one is retried by cutting over
  // once ready); only a failed one may be started again.
  const busy = new Set((S.migrations || []).filter((m) => m.phase !== "failed").map((m) => m.workload));
  const free = MIG.workloads.map((w) => w.name).filter((n) => !busy.has(n));
  const peers = (S.nodes || []).map((p) => p.name);
  if (!free.includes(f.workload)) f.workload = free[0] || "";
  if (!peers.includes(f.to)) f.to = peers[0] || "";
  const result = migSink("");
  const go = el("button", { type: "submit", id: "start-migration", disabled: !free.length || !peers.length || migBusy("") }, "Start migration");
  const form = el("form", { id: "start-form", class: "start-form", "aria-labelledby": "start-h" },
    el("div", { class: "fields" },
      migSelect("mig-workload", "Workload", f, "workload", free.length ? free.map((n) => [n, n]) : [["", "no workload to migrate"]]),
      migSelect("mig-to", "Target node", f, "to", peers.length ? peers.map((n) => [n, n]) : [["", "no paired node"]]),
      migSelect("mig-mode", "Replication mode", f, "mode", [["sync", "sync (acknowledged by both)"], ["async", "async (the target trails)"]]),
      migField("mig-rate", "Copy rate limit, MiB/s", f, "rate", { type: "text", placeholder: "unlimited", inputmode: "decimal", autocomplete: "off", spellcheck: "false" })),
    el("div", { class: "check" },
      (() => {
        const c = el("input", { type: "checkbox", id: "mig-auto-converge", checked: f.autoConverge });
        c.addEventListener("change", () => { f.autoConverge = c.checked; });
        return c;
      })(),
      el("label", { for: "mig-auto-converge" }, "Auto-converge: slow the workload's writes while they outrun the link")),
    el("div", { class: "actions" }, go),
    el("p", { class: "result", id: "result-start", role: "status" }, MIG.result[""] || MIG.loadError));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const r = migMiB(f.rate);
    if (r === null) { MIG.result[""] = "The rate limit must be a number of MiB/s (empty: unlimited)."; render(); return; }
    const body = { workload: f.workload, to: f.to, mode: f.mode, max_rate_bytes_per_s: r || null, auto_converge: f.autoConverge };
    act(go, result, "POST", "/api/v1/migrations", body, (m) => {
      f.rate = "";
      return ("Started: " + m.workload + " " + m.source + " → " + m.target + ", " + m.phase + ".");
    });
  });
  const why = !free.length ? (MIG.workloads.length ? "Every workload on this node has a migration already (see below)." :
    "No workload is defined on this node (ferry workload create).") : !peers.length ? "No paired node to migrate to (ferry node add)." : null;
  return el("div", { class: "card" }, el("h2", { id: "start-h" }, "Start a migration"),
    why ? [el("p", { class: "note" }, why), el("p", { class: "result", id: "result-start", role: "status" }, MIG.result[""] || MIG.loadError)] : form);
}

function migTotal(m) {
  const spec = (MIG.workloads || []).find((w) => w.name === m.workload);
  let total = 0;
  if (spec) for (const v of spec.volumes || []) total += MIG.sizes[v] || 0;
  MIG.peak[m.workload] = Math.max(MIG.peak[m.workload] || 0, m.bytes_remaining || 0);
  return Math.max(total, MIG.peak[m.workload]);
}

function migProgress(m) {
  const id = migId(m.workload);
  const total = migTotal(m);
  const done = m.phase === "ready" || m.phase === "completed" || m.bytes_remaining === 0;
  const pct = done ? 100 : total > 0 ? Math.max(0, Math.min(100, Math.floor(100 * (total - m.bytes_remaining) / total))) : 0;
  let eta;
  if (done) eta = m.phase === "completed" ? "cut over" : "ready to cut over";
  else if (m.eta_seconds !== null && m.eta_seconds !== undefined) eta = "ETA " + migSecs(m.eta_seconds);
  else eta = m.not_converging ? "no ETA: not converging" : "ETA unknown yet";
  return el("div", { class: "progress" },
    el("progress", { id: "progress-" + id, max: "100", value: String(pct), "aria-label": "Copy progress of " + m.workload, "aria-describedby": "progress-text-" + id }),
    el("p", { class: "progress-text", id: "progress-text-" + id },
      el("strong", {}, pct + "%"), " · ", bytes(m.bytes_remaining) + " left", " · ", eta));
}

// Where act() writes "working…", the reply's summary or "Refused: …":
// into MIG.result (the view re-renders on every update, so an element
// would be replaced and its text lost).
function migSink(w) {
  return { set textContent(t) { MIG.result[w] = t; }, get textContent() { return MIG.result[w] || ""; } };
}
function migBusy(w) { return MIG.result[w] === "working…"; }

// One action button: offered to operators only; confirm first if asked.
function migButton(m, key, label, cls, run, confirm) {
  const id = migId(m.workload);
  const b = el("button", { type: "button", class: cls || null, id: key + "-" + id, disabled: migBusy(m.workload) }, label);
  b.addEventListener("click", () => {
    const result = migSink(m.workload);
    const go = () => run(b, result);
    if (confirm) confirmThen(confirm[0], confirm[1], confirm[2], go); else go();
  });
  return b;
}

function migActions(m) {
  if (!may("operator")) return [];
  const w = m.workload, id = migId(w);
  const out = [];
  const say = (text) => text;
  const live = MIG_LIVE.includes(m.phase) || m.phase === "rolled-back";
  const buttons = [];
  if (m.phase === "ready" && !m.test && !m.reverse) {
    buttons.push(migButton(m, "cutover", "Cut over to " + m.target, "danger",
      (b, res) => act(b, res, "POST", migPath(w, "/cutover"), {},
        (r) => say((r.vm && r.vm.mode === "live" ? "Moved live to " + r.to + ": guest paused " + migMs(r.downtime_ms) : "Cut over to " + r.to + ": downtime " + migMs(r.downtime_ms)) +
          ", outage " + migMs(r.outage_ms) + (r.target_healthy ? "." : "; the target is not healthy."))),
      ["Cut " + w + " over to " + m.target + "?",
        (migHasVm(w) ? "Its VM moves live: its memory is copied to " + m.target + " while it runs, then the guest pauses (it does not reboot); " : "") +
        "The stop hook runs on " + m.source + ", its volumes freeze, the links drain and both copies are compared; then " + m.target +
        " serves " + w + " and replicates back to " + m.source + " (rollback stays possible until you finalize). Clients see a short pause.",
        "Cut over"]));
  }
  if (m.phase === "ready" && m.reverse) {
    buttons.push(migButton(m, "rollback", "Roll back to " + m.target, "danger",
      (b, res) => act(b, res, "POST", migPath(w, "/rollback"), undefined,
        (r) => say("Rolled back to " + r.to + ": downtime " + migMs(r.downtime_ms) + ".")),
      ["Roll " + w + " back to " + m.target + "?", "The same verified cutover, from " + m.source + " back to " + m.target + ". Clients see a short pause.", "Roll back"]));
  }
  if ((m.phase === "syncing" || m.phase === "ready") && !m.reverse) {
    if (!m.test) {
      buttons.push(migButton(m, "test-start", "Start test cutover", "secondary",
        (b, res) => act(b, res, "POST", migPath(w, "/test"), undefined,
          (r) => say("Test instance on " + r.node + ": " + (r.check_ok ? "its check passed" : "its check FAILED (left up for inspection)") +
            " after " + r.start_to_check_ms + " ms" + (r.source_frozen_us !== undefined ? "; the source paused " + migUs(r.source_frozen_us) : "") + "."))));
    }
  }
  if (m.test) {
    buttons.push(migButton(m, "test-end", "End test cutover", "secondary",
      (b, res) => act(b, res, "DELETE", migPath(w, "/test"), undefined,
        (r) => say("Test ended on " + r.node + ": " + bytes(r.overlay_bytes_discarded) + " of overlays discarded."))));
  }
  if (m.phase === "completed" && !m.reverse && !m.finalized) {
    buttons.push(migButton(m, "rollback", "Roll back to " + m.source, "danger",
      (b, res) => act(b, res, "POST", migPath(w, "/rollback"), undefined,
        (r) => say("Rolled back to " + r.to + ": downtime " + migMs(r.downtime_ms) + ".")),
      ["Roll " + w + " back to " + m.source + "?", "The same verified cutover, from " + m.target + " back to " + m.source +
        " (once the way back is ready). Clients see a short pause.", "Roll back"]));
  }
  if ((m.phase === "completed" || m.reverse) && !m.finalized) {
    buttons.push(migButton(m, "finalize", "Finalize", "secondary",
      (b, res) => act(b, res, "POST", migPath(w, "/finalize"), undefined,
        (r) => say("Finalized: " + r.note)),
      ["Finalize the migration of " + w + "?", "Replication back to the old source stops; its copy stays but no rollback is possible after this.", "Finalize"]));
  }
  const pending = m.schedule && (m.schedule.state === "pending" || m.schedule.state === "cutting-over");
  if (live && !m.reverse && pending) {
    buttons.push(migButton(m, "schedule-cancel", "Cancel scheduled cutover", "secondary",
      (b, res) => act(b, res, "DELETE", migPath(w, "/schedule"), undefined, () => say("Scheduled cutover cancelled."))));
  }
  if (buttons.length) out.push(el("div", { class: "actions" }, buttons));

  if (live && !m.reverse) {
    // Live rate change.
    const rf = MIG.rate;
    if (rf[w] === undefined) rf[w] = "";
    const set = el("button", { type: "submit", class: "secondary", id: "rate-set-" + id }, "Set rate");
    const form = el("form", { class: "inline", id: "rate-form-" + id },
      migField("rate-" + id, "New copy rate limit, MiB/s (empty or 0: unlimited)", rf, w, { type: "text",
        placeholder: m.max_rate_bytes_per_s ? "now " + (m.max_rate_bytes_per_s / 1048576).toFixed(1) : "now unlimited",
        inputmode: "decimal", autocomplete: "off", spellcheck: "false" }),
      set);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const r = migMiB(rf[w]);
      if (r === null) { MIG.result[w] = "The rate limit must be a number of MiB/s."; render(); return; }
      act(set, migSink(w), "PATCH", migPath(w), { max_rate_bytes_per_s: r },
        (s) => { rf[w] = ""; return say("Copy rate limit now " + (s.max_rate_bytes_per_s ? migRate(s.max_rate_bytes_per_s) : "unlimited") + "."); });
    });
    out.push(form);
    // Scheduled cutover (its cancel button is with the others above).
    if (!pending) {
      const sf = MIG.sched[w] || (MIG.sched[w] = { at: "", window: "", deadline: "" });
      const go = el("button", { type: "submit", class: "secondary", id: "schedule-" + id }, "Schedule cutover");
      const form2 = el("form", { id: "schedule-form-" + id },
        el("div", { class: "fields" },
          migField("at-" + id, "At (RFC 3339 with zone)", sf, "at", { placeholder: "2026-12-24T02:00:00Z", spellcheck: "false" }),
          migField("window-" + id, "Inside window", sf, "window", { placeholder: "Sat,Sun 02:00-04:00 Europe/Paris", spellcheck: "false" }),
          migField("deadline-" + id, "Give up after", sf, "deadline", { placeholder: "2026-12-31T23:00:00Z", spellcheck: "false" })),
        el("div", { class: "actions" }, go));
      form2.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const body = { at: sf.at.trim() || null, window: sf.window.trim() || null, deadline: sf.deadline.trim() || null };
        act(go, migSink(w), "POST", migPath(w, "/schedule"), body,
          (r) => { MIG.sched[w] = { at: "", window: "", deadline: "" }; return say("Cutover scheduled" + (r.scheduled_at ? " for " + r.scheduled_at : "") + " (" + r.schedule.state + ")."); });
      });
      const d = el("details", { id: "schedule-box-" + id, open: !!MIG.open[w] }, el("summary", { id: "schedule-summary-" + id }, "Schedule a cutover (a time, a maintenance window, a deadline)"), form2);
      d.addEventListener("toggle", () => { MIG.open[w] = d.open; });
      out.push(d);
    }
  }
  return out;
}

function migCutoverReport(m) {
  const c = m.last_cutover;
  if (!c) return null;
  const id = migId(m.workload);
  const steps = c.steps_us || [];
  return el("section", { class: "cutover-report", id: "cutover-report-" + id, "aria-labelledby": "cr-h-" + id },
    el("h3", { id: "cr-h-" + id }, "Cutover report: " + c.from + " → " + c.to),
    el("div", { class: "figures" },
      el("div", { class: "figure" }, el("span", { class: "n", id: "downtime-" + id }, migMs(c.downtime_ms)),
        el("span", { class: "l" }, c.vm && c.vm.mode === "live" ? "guest paused (vCPUs stopped → running at " + c.to + ")" : "downtime (freeze → target serving)")),
      el("div", { class: "figure" }, el("span", { class: "n", id: "outage-" + id }, migMs(c.outage_ms)), el("span", { class: "l" }, "application outage (stop hook → check passing)")),
      el("div", { class: "figure" }, el("span", { class: "n" }, c.target_healthy ? "healthy" : "not healthy"), el("span", { class: "l" }, "target after the cutover"))),
    c.vm && c.vm.mode === "live" ? el("p", { class: "note", id: "vm-report-" + id }, "VM moved live: RAM pre-copied in " + migMs(c.vm.precopy_ms) +
      ", " + bytes(c.vm.qemu.transferred_bytes || 0) + " in " + (c.vm.qemu.dirty_sync_count || 0) + " passes; inside the pause: frozen at " + migMs(c.vm.freeze_ms) +
      ", verified at " + migMs(c.vm.verify_ms) + ", committed at " + migMs(c.vm.commit_ms) + "; QEMU's own downtime " + migMs(c.vm.qemu.downtime_ms) + ".") : null,
    steps.length ? el("table", { class: "steps" },
      el("caption", {}, "Steps, ms from the cutover's start"),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Step"), el("th", { scope: "col" }, "At"))),
      el("tbody", {}, steps.map((s) => el("tr", {}, el("td", {}, s.step), el("td", {}, (s.at_us / 1000).toFixed(1) + " ms"))))) : null,
    (c.hooks || []).length ? el("p", { class: "note" }, "Hooks: ", c.hooks.map((h) => h.hook + " " + (h.ok ? "ok" : "failed") + " (" + h.elapsed_ms + " ms)").join(", ")) : null,
    el("p", {}, el("a", { href: migPath(m.workload, "/report?format=html"), target: "_blank", rel: "noopener", id: "report-link-" + id },
      "Printable migration report (timeline, bytes moved, who started and cut over)")));
}

function migTestReport(m) {
  const t = m.test;
  if (!t) return null;
  return el("div", { class: "test-report" },
    el("h3", {}, "Test cutover running on " + t.node),
    el("p", {}, badge(t.check_ok ? "check ok" : "check failed"), " started in " + t.start_to_check_ms + " ms",
      t.source_frozen_us !== undefined ? ", source paused " + migUs(t.source_frozen_us) : "",
      " · exports " + ((t.exports || []).join(", ") || "none")),
    el("p", { class: "note" }, "Replication goes on underneath; a cutover is refused until the test ends."));
}

function migCard(m) {
  const id = migId(m.workload);
  const kv = [];
  const row = (k, v, vid) => { kv.push(el("dt", {}, k), el("dd", { id: vid || null }, v)); };
  row("Mode", m.mode + (m.auto_converge ? " · auto-converge" : "") + (m.auto_cutover ? " · auto-cutover" : ""));
  if (m.phase !== "completed" && !m.finalized) {
    // Copy figures: meaningless once the workload has moved.
    row("Rates", el("span", {}, "writes " + migRate(m.write_rate_bytes_per_s) + " vs link " + migRate(m.bandwidth_bytes_per_s)), "rates-" + id);
    row("Rate limit", m.max_rate_bytes_per_s ? migRate(m.max_rate_bytes_per_s) : "unlimited", "limit-" + id);
    row("Lag", m.lag_seconds === null || m.lag_seconds === undefined ? "—" : m.lag_seconds.toFixed(2) + " s");
    row("Backlog", bytes(m.backlog_bytes) + (m.merkle_stale_bytes ? " · " + bytes(m.merkle_stale_bytes) + " to re-hash" : ""));
    if (m.throttle_pct) row("Throttle", "writes held back " + m.throttle_pct + "%");
  }
  if (m.vm) {
    const v = m.vm;
    row("VM moving live", [badge(v.state), " RAM " + bytes(v.ram_transferred_bytes) + " of " + bytes(v.ram_total_bytes) + " sent, " + bytes(v.ram_remaining_bytes) + " left · " +
      v.dirty_pages_rate + " pages/s dirtied · pass " + v.dirty_sync_count +
      (v.expected_downtime_ms !== null && v.expected_downtime_ms !== undefined ? " · expected pause " + v.expected_downtime_ms + " ms" : "") +
      (v.cpu_throttle_percent ? " · vCPUs throttled " + v.cpu_throttle_percent + "%" : "") + " · disks " + bytes(m.bytes_remaining) + " left"], "vm-" + id);
  }
  row("Started", new Date(m.started_unix * 1000).toLocaleString());
  if (m.schedule) {
    const s = m.schedule;
    row("Scheduled cutover", [badge(s.state), " ", [m.scheduled_at ? "at " + m.scheduled_at : null, s.window ? "inside " + s.window : null,
      s.deadline ? "until " + s.deadline : null, s.last_outcome ? "last attempt: " + s.last_outcome : null, s.reason ? "gave up: " + s.reason : null]
      .filter(Boolean).join(", ")]);
  }
  for (const sh of m.shares || []) row("Share " + sh.share, [badge(sh.state), " " + sh.pending_paths + " paths pending", sh.last_error ? " · " + sh.last_error : ""]);
  if (m.reason) row("Reason", m.reason);
  const warn = m.not_converging ? el("div", { class: "alert", role: "alert", id: "converge-" + id },
    el("strong", {}, "Not converging: "), m.advice || "writes outrun the link.") : null;
  const title = m.reverse ? "way back " + m.source + " → " + m.target : m.source + " → " + m.target;
  return el("article", { class: "card migration", id: "migration-" + id, "aria-labelledby": "m-h-" + id },
    el("h2", { id: "m-h-" + id }, m.workload, " ", el("span", { class: "muted route" }, title), " ",
      el("span", { id: "phase-" + id }, badge(m.finalized ? "finalized" : m.phase))),
    m.phase === "completed" || m.finalized ? null : migProgress(m),
    warn,
    el("dl", { class: "kv" }, kv),
    migTestReport(m),
    migCutoverReport(m),
    migActions(m),
    el("p", { class: "result", id: "result-" + id, role: "status" }, MIG.result[m.workload] || ""));
}

function migView() {
  document.title = "Migrate · ferry";
  // Workloads and volume sizes change rarely: read again at most every 30 s.
  if (MIG.workloads === null || Date.now() - MIG.loadedAt > 30000) migLoad();
  const list = S.migrations || [];
  return el("section", { "aria-labelledby": "h", class: "migrate" },
    el("h1", { id: "h" }, "Migrate"),
    may("operator") ? migStartForm() : el("p", { class: "note" }, "Your token's role (" + S.session.role + ") may watch migrations; starting and cutting over need operator."),
    el("h2", { class: "section" }, "Migrations on " + S.node.node_name),
    list.length ? el("div", { class: "migrations" }, list.map(migCard)) : el("p", { class: "muted" }, "No migration on this node."));
}

VIEW_FNS.migrate = migView;
