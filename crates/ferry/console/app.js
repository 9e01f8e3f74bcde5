// ferry console: one checked-in script, no build step. Every datum comes
// from /api/v1 with the session cookie; live updates from the
// Server-Sent Events of /api/v1/events. Text is set with textContent only.
"use strict";

const S = { session: null, node: null, nodes: [], cluster: null, migrations: [], events: [], source: null };
const ROLES = { viewer: 0, operator: 1, admin: 2 };
const VIEWS = ["overview", "migrate", "estimate", "cluster", "statistics", "configure", "audit"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

function may(role) { return S.session && ROLES[S.session.role] >= ROLES[role]; }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (method !== "GET" && S.session) headers["X-Ferry-CSRF"] = S.session.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  // A read that failed in the network (no answer at all: the machine's
  // network changed, a connection reset) is asked again, twice, before the
  // view says it could not read; a change is never repeated on its own.
  let r;
  for (let attempt = 0; ; attempt++) {
    try {
      r = await fetch(path, { method, headers, credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body) });
      break;
    } catch (e) {
      if (method !== "GET" || attempt >= 2) throw e;
      await new Promise((ok) => setTimeout(ok, 300));
    }
  }
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (!r.ok) {
    const err = new Error((data && data.error) || r.status + " " + r.statusText);
    err.status = r.status;
    throw err;
  }
  return data;
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; n = Number(n) || 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function when(ms) { return ms ? new Date(ms).toLocaleTimeString() : "—"; }

function badgeClass(state) {
  const s = String(state || "").toLowerCase();
  if (/(up-to-date|streaming|primary|completed|ready|serving|up|ok|finalized)/.test(s)) return "ok";
  if (/(fail|split|error|down|inconsistent|fenced|rolled|silent)/.test(s)) return "bad";
  if (/(sync|resync|cutting|degraded|standby|held|waiting|behind|outdated|stale|paused)/.test(s)) return "warn";
  return "info";
}
function badge(state) { return el("span", { class: "badge " + badgeClass(state) }, state || "unknown"); }

// ---------- session ----------

function showLogin(message) {
  if (S.source) { S.source.close(); S.source = null; }
  S.session = null;
  S.view = null;
  clearTimeout(S.ratesTimer);
  $("nav").hidden = true; $("who").hidden = true; $("view").replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

async function login(ev) {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    S.session = await api("POST", "/api/v1/session", { token: $("token").value });
    $("token").value = "";
    await start();
  } catch (e) {
    $("login-error").textContent = e.status === 401 ? "That token is not valid on this node." : e.message;
  }
}

async function logout() {
  try { await api("DELETE", "/api/v1/session"); } catch (_) { /* ended anyway */ }
  location.hash = "";
  showLogin("Logged out.");
}

async function start() {
  $("login").hidden = true;
  $("nav").hidden = false; $("who").hidden = false;
  $("who-text").textContent = S.session.name + " (" + S.session.role + ")";
  await refresh();
  listen();
  route();
}

// The node's replication link rate and write rate: the history's latest
// 10-s points, asked every 10 s (the sampler's own interval) while the
// Overview is shown, and not at all otherwise.
async function nodeRates() {
  clearTimeout(S.ratesTimer);
  if (!S.session || S.view !== "overview") return;
  const name = S.node && S.node.node_name;
  const last = async (metric) => {
    try {
      const r = await api("GET", "/api/v1/stats?series=" + encodeURIComponent("node/" + name + "/" + metric) + "&since=60");
      return r.points.length ? r.points[r.points.length - 1].mean : null;
    } catch (_) { return null; }
  };
  const [link, write] = await Promise.all([last("link_bytes_per_s"), last("write_bytes_per_s")]);
  S.rates = { link, write };
  if (S.view !== "overview") return;
  render();
  clearTimeout(S.ratesTimer);
  S.ratesTimer = setTimeout(nodeRates, 10000);
}

async function refresh() {
  const [node, nodes, cluster, migrations] = await Promise.all([
    api("GET", "/api/v1/node"), api("GET", "/api/v1/nodes"),
    api("GET", "/api/v1/cluster"), api("GET", "/api/v1/migrations")]);
  Object.assign(S, { node, nodes, cluster, migrations });
  collectEvents(cluster);
}

function eventKey(e) { return [e.at_unix_ms, e.event, e.workload, e.node].join("|"); }

function collectEvents(cluster) {
  const seen = new Set(S.events.map(eventKey));
  for (const w of (cluster && cluster.workloads) || []) {
    for (const e of w.events || []) {
      if (!seen.has(eventKey(e))) { S.events.push(e); seen.add(eventKey(e)); }
    }
  }
  S.events.sort((a, b) => a.at_unix_ms - b.at_unix_ms);
  S.events = S.events.slice(-50);
}

function listen() {
  if (S.source) S.source.close();
  const src = new EventSource("/api/v1/events");
  S.source = src;
  const on = (name, f) => src.addEventListener(name, (m) => { f(JSON.parse(m.data)); $("live").textContent = "live " + new Date().toLocaleTimeString(); render(); });
  on("migrations", (d) => { S.migrations = d; });
  on("cluster", (d) => { S.cluster = d; collectEvents(d); });
  on("nodes", (d) => { S.nodes = d; });
  on("event", (d) => { collectEvents({ workloads: [{ events: [d] }] }); });
  src.addEventListener("end", () => { src.close(); showLogin("Your session ended (logged out elsewhere, expired, or its token was revoked)."); });
  src.onerror = () => { $("live").textContent = "reconnecting…"; };
}

// ---------- views ----------

function route() {
  if (!S.session) return;
  let v = location.hash.replace("#", "");
  if (!VIEWS.includes(v)) v = "overview";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === v) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const was = S.view;
  S.view = v;
  render();
  if (v === "overview" && was !== "overview") nodeRates();
}

// Each view's script (console/VIEW.js) registers its function here:
// VIEW_FNS.name = () => Node, rendered on every state change.
const VIEW_FNS = {};

// A click is a press and a release on the same element: a rebuild between
// the two (the event stream pushes one every second) would swallow it, the
// press landing on the old button and the release on its replacement. So
// while a pointer button is held the view is not rebuilt; the rebuild that
// was due runs right after the release's click (or after
// POINTER_HOLD_MAX_MS, should the release never come).
const POINTER_HOLD_MAX_MS = 3000;
const HOLD = { since: 0, due: false };
document.addEventListener("pointerdown", () => { HOLD.since = Date.now(); }, true);
function releasePointer() {
  if (!HOLD.since) return;
  HOLD.since = 0;
  if (HOLD.due) { HOLD.due = false; setTimeout(render, 0); }
}
document.addEventListener("pointerup", releasePointer, true);
document.addEventListener("pointercancel", releasePointer, true);

function render() {
  if (!S.session) return;
  if (HOLD.since && Date.now() - HOLD.since < POINTER_HOLD_MAX_MS) { HOLD.due = true; return; }
  const f = VIEW_FNS[S.view] || notBuilt;
  // The view is rebuilt on every state change (the event stream pushes one
  // every second): keep the focused field's caret where the person left it,
  // or typing during a refresh would insert at the start of the field.
  const a = document.activeElement;
  const active = a && a.id;
  let sel = null;
  try { if (a && typeof a.selectionStart === "number") sel = [a.selectionStart, a.selectionEnd, a.selectionDirection]; } catch (_) { sel = null; }
  $("view").replaceChildren(f());
  const b = active && $(active);
  if (b) {
    b.focus();
    if (sel) { try { b.setSelectionRange(sel[0], sel[1], sel[2] || "none"); } catch (_) { /* not a text field */ } }
  }
}

function notBuilt() {
  const name = S.view.charAt(0).toUpperCase() + S.view.slice(1);
  document.title = name + " · ferry";
  return el("section", { "aria-labelledby": "h" },
    el("h1", { id: "h" }, name),
    el("p", { class: "placeholder" }, "The " + name + " view is not built yet. Use the CLI meanwhile (ferry --help)."));
}

function peerAlive(name) {
  for (const w of (S.cluster && S.cluster.workloads) || []) if (w.peer === name) return w.peer_alive;
  return null;
}

function overview() {
  document.title = "Overview · ferry";
  const c = S.cluster || { workloads: [] };
  const ms = S.migrations || [];
  const migrating = ms.filter((m) => !["completed", "failed", "rolled-back"].includes(m.phase) && !m.finalized).length;
  const protectedN = c.workloads.filter((w) => w.replicas.some((r) => r.state === "up-to-date")).length;
  const failedOver = c.workloads.filter((w) => w.primary && w.primary !== w.preferred).length;
  const rates = S.rates || {};
  const fg = rates.write !== null && rates.write !== undefined ? rates.write : ms.reduce((a, m) => a + (m.write_rate_bytes_per_s || 0), 0);
  const bg = ms.reduce((a, m) => a + (m.bandwidth_bytes_per_s || 0), 0);
  const link = rates.link !== null && rates.link !== undefined ? bytes(rates.link) + "/s" : "—";
  const total = (n, l) => el("div", { class: "total" }, el("span", { class: "n" }, n), el("span", { class: "l" }, l));

  const nodeRows = [el("tr", {}, el("td", {}, S.node.node_name, " ", el("span", { class: "muted" }, "(this node)")),
    el("td", {}, badge("up")), el("td", {}, c.configured ? (c.standby ? "standby" : "cluster member") : "standalone"),
    el("td", {}, S.node.version))];
  for (const p of S.nodes || []) {
    // Up: the heartbeat's verdict where a workload is under HA with it,
    // else this node's last probe of its API.
    const alive = peerAlive(p.name);
    const up = alive !== null ? alive : p.up;
    const state = up === null || up === undefined ? "not probed yet" : up ? "up" : "down";
    const since = p.since_unix_ms ? " since " + when(p.since_unix_ms) : "";
    nodeRows.push(el("tr", {}, el("td", {}, p.name), el("td", { title: (p.probe_error || state) + since }, badge(state)),
      el("td", {}, "peer"), el("td", {}, p.version || el("span", { class: "muted" }, "unknown"))));
  }
  if (c.configured) {
    const w = c.witness;
    const state = !w ? "none configured" : w.up ? "up" : w.answered_unix_ms ? "silent since " + when(w.answered_unix_ms) : "no answer yet";
    nodeRows.push(el("tr", {}, el("td", {}, "witness", w ? el("span", { class: "muted" }, " " + w.address) : null),
      el("td", {}, badge(state)), el("td", {}, "witness"), el("td", { class: "muted" }, "—")));
  }
  const wl = [];
  for (const w of c.workloads) {
    wl.push(el("tr", {}, el("td", {}, w.workload), el("td", {}, "HA"),
      el("td", {}, badge(w.split_brain ? "split-brain" : w.primary ? "serving on " + w.primary : "not served")),
      el("td", {}, w.replicas.map((r) => [r.node + " ", badge(r.state), " "]))));
  }
  for (const m of ms) {
    wl.push(el("tr", {}, el("td", {}, m.workload), el("td", {}, "migration " + m.source + " → " + m.target),
      el("td", {}, badge(m.phase)), el("td", {}, bytes(m.bytes_remaining) + " left")));
  }
  const evs = S.events.slice(-10).reverse().map((e) =>
    el("li", {}, when(e.at_unix_ms), " · ", el("strong", {}, e.event), " · ", e.workload, " on ", e.node));
  return el("section", { "aria-labelledby": "h" },
    el("h1", { id: "h" }, "Overview"),
    el("div", { class: "totals" }, total(migrating, "migrating"), total(protectedN, "protected"),
      total(failedOver, "failed over"), total(bytes(fg) + "/s", "foreground (writes)"), total(bytes(bg) + "/s", "background (copy)"),
      total(link, "replication link")),
    el("div", { class: "grid" },
      el("div", { class: "card" }, el("h2", {}, "Nodes"),
        el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Node"), el("th", {}, "Up"), el("th", {}, "Role"), el("th", {}, "Version"))),
          el("tbody", {}, nodeRows)),
        el("p", { class: "note" }, "Peers are asked every few seconds (api.peer_probe_interval_ms); the witness is up while it answers within a lease.")),
      el("div", { class: "card" }, el("h2", {}, "Workloads"),
        wl.length ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Workload"), el("th", {}, "Kind"), el("th", {}, "State"), el("th", {}, "Replicas"))),
          el("tbody", {}, wl)) : el("p", { class: "muted" }, "No workloads under HA or migrating.")),
      el("div", { class: "card" }, el("h2", {}, "Last events"),
        evs.length ? el("ul", { class: "events" }, evs) : el("p", { class: "muted" }, "No cluster events yet."))));
}

function lastFailover(w) {
  const f = [...w.events].reverse().find((e) => /failover|promot|took-over|takeover/.test(e.event));
  if (!f) return "none";
  const parts = [f.event + " at " + when(f.at_unix_ms)];
  const detect = f.detection_ms !== undefined ? f.detection_ms : f.silent_ms;
  if (detect !== undefined) parts.push("detected after " + detect + " ms");
  if (f.failover_ms !== undefined) parts.push("failover " + f.failover_ms + " ms");
  return parts.join(", ");
}

async function act(button, result, method, path, body, done) {
  button.disabled = true;
  result.textContent = "working…";
  try {
    const r = await api(method, path, body);
    result.textContent = done(r);
    await refresh();
  } catch (e) {
    result.textContent = "Refused: " + e.message;
  } finally {
    button.disabled = false;
    render();
    const again = $(button.id);
    if (again) again.focus();
  }
}

let lastResult = {};

function confirmThen(title, text, okLabel, then) {
  const d = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  d.returnValue = "";
  d.onclose = () => { if (d.returnValue === "ok") then(); };
  d.showModal();
  $("confirm-cancel").focus();
}

function clusterView() {
  document.title = "Cluster · ferry";
  const c = S.cluster || { workloads: [] };
  const here = S.node.node_name;
  const cards = c.workloads.map((w) => {
    const id = w.workload.replace(/[^A-Za-z0-9_-]/g, "_");
    const result = el("p", { class: "result", id: "result-" + id, role: "status" }, lastResult[w.workload] || "");
    const actions = [];
    // A switchover is offered on either node's console: the serving
    // node's does it, the other one's forwards it to the serving node.
    if (may("operator") && w.primary && !w.split_brain) {
      const from = w.primary;
      const to = from === here ? w.peer : here;
      const copy = w.replicas.find((r) => r.node === to);
      const ready = w.peer_alive && copy && copy.state === "up-to-date";
      const b = el("button", { type: "button", id: "switchover-" + id, disabled: !ready,
        "aria-describedby": ready ? null : "why-" + id });
      b.textContent = "Switch over to " + to;
      const via = from === here ? "" : " (asked of " + from + ", which serves it)";
      b.addEventListener("click", () => confirmThen("Switch " + w.workload + " over?",
        "The workload stops on " + from + ", both copies are compared, and " + to + " starts serving it" + via + ". Clients see a short pause.",
        "Switch over", () => act(b, result, "POST", "/api/v1/cluster/workloads/" + encodeURIComponent(w.workload) + "/switchover", {},
          (r) => (lastResult[w.workload] = "Switched over to " + r.to + ": verified in " + r.verified_ms + " ms, downtime " + r.downtime_ms + " ms."))));
      actions.push(b);
      if (!ready) {
        actions.push(el("p", { class: "note", id: "why-" + id },
          !w.peer_alive ? w.peer + " is down: no switchover until it is back and up to date."
            : "No switchover until " + to + "'s copy is up to date."));
      }
    }
    if (may("admin") && w.split_brain) {
      for (const keep of [here, w.peer]) {
        const other = keep === here ? w.peer : here;
        const b = el("button", { type: "button", class: "danger", id: "keep-" + keep + "-" + id }, "Keep " + keep + "'s data");
        b.addEventListener("click", () => confirmThen("Resolve the split brain of " + w.workload + "?",
          "Both nodes served " + w.workload + " and their copies differ. Keeping " + keep + "'s data makes " + keep +
          " the primary; " + other + "'s diverged copy is set aside (not deleted: drop it later with drop-copy) and it resyncs from " + keep + ".",
          "Keep " + keep, () => act(b, result, "POST", "/api/v1/cluster/workloads/" + encodeURIComponent(w.workload) + "/resolve-split-brain", { keep },
            (r) => (lastResult[w.workload] = "Kept " + r.kept + "; " + r.discarded + "'s copies: " + (r.copies.join(", ") || "none")))));
        actions.push(b);
      }
    }
    return el("article", { class: "card", "aria-labelledby": "w-" + id },
      el("h2", { id: "w-" + id }, w.workload, " ", badge(w.split_brain ? "split-brain" : w.primary ? "serving" : "not served")),
      el("dl", { class: "kv" },
        el("dt", {}, "Serving node"), el("dd", { id: "serving-" + id }, w.primary || "none"),
        el("dt", {}, "Preferred"), el("dd", {}, w.preferred),
        el("dt", {}, "This node"), el("dd", {}, here + " · " + w.role),
        el("dt", {}, "Peer"), el("dd", {}, w.peer + " · ", badge(w.peer_alive ? "up" : "down")),
        el("dt", {}, "Lease"), el("dd", {}, "epoch " + w.epoch + (w.writes_held ? " · writes held" : "") + (w.candidate ? " · candidate" : "")),
        el("dt", {}, "Replicas"), el("dd", {}, w.replicas.length ? w.replicas.map((r) => [r.node + " ", badge(r.state), " "]) : "none"),
        el("dt", {}, "Last failover"), el("dd", {}, lastFailover(w))),
      actions.length ? el("div", { class: "actions" }, actions) : null, result);
  });
  const nodeActions = [];
  const standbyResult = el("p", { class: "result", id: "result-standby", role: "status" }, lastResult[""] || "");
  if (may("operator") && c.configured) {
    const b = el("button", { type: "button", class: "secondary", id: "standby" }, c.standby ? "Leave standby (unstandby " + here + ")" : "Put " + here + " in standby");
    const to = !c.standby;
    b.addEventListener("click", () => confirmThen(to ? "Put " + here + " in standby?" : "Take " + here + " out of standby?",
      to ? "Every workload this node serves is switched over to its peer, and this node takes none over until unstandby." : "This node may serve and take over workloads again.",
      to ? "Standby" : "Unstandby", () => act(b, standbyResult, "POST", "/api/v1/cluster/standby", { node: here, standby: to },
        (r) => (lastResult[""] = r.standby ? "Standby: moved " + r.moved.length + " workload(s)." : "Out of standby."))));
    nodeActions.push(b);
  }
  return el("section", { "aria-labelledby": "h" },
    el("h1", { id: "h" }, "Cluster"),
    el("div", { class: "card" }, el("h2", {}, "Node " + here),
      el("p", {}, c.configured ? (c.standby ? "In standby: serves nothing it can move off." : "Cluster member, state " + c.state + ".") : "Standalone: no [cluster] table in its config."),
      nodeActions.length ? el("div", { class: "actions" }, nodeActions) : null, standbyResult),
    el("h2", { class: "section" }, "Workloads under HA"),
    c.workloads.length ? el("div", { class: "grid" }, cards) : el("p", { class: "muted" }, "No workload is under HA on this node."));
}

VIEW_FNS.overview = overview;
VIEW_FNS.cluster = clusterView;

// ---------- start ----------

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  try {
    S.session = await api("GET", "/api/v1/session");
    await start();
  } catch (_) {
    showLogin("");
  }
});
