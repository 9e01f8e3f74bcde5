// ferry console: the Audit view (registered in VIEW_FNS; uses app.js's
// S, el, api, badge). The audit log from ListAudit (GET /api/v1/audit),
// newest first, one row per operation (an action's request and result
// records share its op id), filterable by text, result and time range;
// the chain's verification (GET /api/v1/audit/verify) on top, with the
// heads the peer and the witness hold compared with this node's records.
"use strict";

(() => {
  const SHOWN_MAX = 300;
  const RANGES = [["15m", "last 15 minutes"], ["1h", "last hour"], ["24h", "last 24 hours"],
    ["7d", "last 7 days"], ["30d", "last 30 days"], ["", "everything kept"]];
  const A = {
    who: null, list: null, listError: "", verify: null, verifyError: "", verifying: false,
    loading: false, filter: { text: "", result: "all", since: "24h" }, shown: SHOWN_MAX,
    root: null, dirty: true,
  };

  function stamp(ms) {
    if (!ms) return "—";
    const d = new Date(ms);
    const p = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
      p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function short(hash) { return hash ? String(hash).slice(0, 12) + "…" : "—"; }

  // What a request was about: its path after /api/v1/, and the name its
  // body gives when the path has none.
  function target(req) {
    if (!req) return "";
    let t = String(req.path || "").replace(/^\/api\/v1\/?/, "");
    const b = req.body || {};
    const named = b.workload || b.name || b.node || b.volume || b.share;
    if (typeof named === "string" && !t.split("/").includes(named)) t += (t ? " · " : "") + named;
    return t;
  }

  // The outcome of a result ({ok, error: {status, message}}):
  // [ok|refused|failed, reason].
  function outcome(res) {
    if (!res) return ["no result", "no result record (still running, or the agent stopped)"];
    if (res.ok) return ["ok", ""];
    const e = res.error || {};
    const status = Number(e.status) || 0;
    return [status >= 400 && status < 500 ? "refused" : "failed", e.message || (status ? "status " + status : "")];
  }

  // One row per operation: an action's request and result records merged,
  // every other record on its own.
  function rows(records) {
    const out = [];
    const byOp = new Map();
    for (const r of records) {
      const v = r.record || {};
      if (v.kind === "action") {
        const key = v.op + "|" + v.action;
        let row = byOp.get(key);
        if (!row || (v.phase === "request" && row.request)) {
          row = { seqs: [], kind: "action", op: v.op, action: v.action, who: v.who, token: v.token,
            role: v.role, peer: v.peer, from: v.from, time: v.time_ms, request: null, result: undefined };
          byOp.set(key, row);
          out.push(row);
        }
        row.seqs.push(r.seq);
        if (v.request) row.request = v.request;
        if (v.phase === "result" || v.result) { row.result = v.result; row.time = v.time_ms || row.time; }
        continue;
      }
      if (v.kind === "decision") {
        const d = v.detail || {};
        const failed = d.ok === false;
        out.push({ seqs: [r.seq], kind: "decision", op: v.op, action: v.decision, who: "automatic decision",
          from: v.node ? "node " + v.node : "", time: v.time_ms, target: v.workload,
          state: failed ? "failed" : "ok", reason: failed ? (d.error || d.reason || "") : "" });
        continue;
      }
      const what = v.kind || "record";
      let reason = "";
      if (what === "checkpoint") reason = "the log was pruned up to here: the chain goes on from this head";
      else if (what === "torn-tail") reason = (v.bytes || 0) + " bytes of a torn append cut at start";
      else if (what === "pruned") reason = "older records pruned (checkpoint seq " + v.checkpoint_seq + ")";
      else if (what === "dropped") reason = (v.decisions || 0) + " automatic decisions dropped (queue full)";
      else if (what === "write-failed") reason = v.why || "";
      else if (what === "unreadable") reason = (v.bytes || 0) + " bytes that are not a readable record";
      out.push({ seqs: [r.seq], kind: what, action: what, who: "the log itself", from: v.node ? "node " + v.node : "", time: v.time_ms,
        target: "", state: what === "unreadable" || what === "write-failed" ? "failed" : "ok", reason });
    }
    for (const row of out) {
      if (row.kind !== "action") continue;
      const [state, reason] = outcome(row.result);
      row.state = state; row.reason = reason;
      row.target = target(row.request);
      if (row.result && row.result.unrecorded_failed_logins_before) {
        row.reason += " (" + row.result.unrecorded_failed_logins_before + " failed logins before this one not recorded: over audit.failed_logins_per_minute_max)";
      }
      if (row.action === "DeleteSession") row.target = "logout";
      if (row.action === "CreateSession") row.target = "console login";
    }
    out.sort((a, b) => (b.seqs[b.seqs.length - 1] || 0) - (a.seqs[a.seqs.length - 1] || 0));
    return out;
  }

  function whoText(row) {
    if (row.kind !== "action") return row.who || "";
    if (row.token) return row.token + " (" + row.role + ")";
    if (row.peer) return "node " + row.peer;
    return row.who || "unknown";
  }

  function matches(row) {
    const f = A.filter;
    if (f.result !== "all" && row.state !== f.result) return false;
    const t = f.text.trim().toLowerCase();
    if (!t) return true;
    return [whoText(row), row.who, row.action, row.target, row.from, row.op].join(" ").toLowerCase().includes(t);
  }

  async function loadList() {
    A.loading = true; A.listError = "";
    A.dirty = true; render();
    try {
      const q = A.filter.since ? "?since=" + encodeURIComponent(A.filter.since) : "";
      A.list = await api("GET", "/api/v1/audit" + q);
    } catch (e) {
      A.listError = "Could not read the audit log: " + e.message;
    }
    A.loading = false;
    A.dirty = true; render();
  }

  async function runVerify() {
    A.verifying = true; A.verifyError = "";
    A.dirty = true; render();
    try {
      A.verify = await api("GET", "/api/v1/audit/verify");
    } catch (e) {
      A.verifyError = "Could not verify: " + e.message;
    }
    A.verifying = false;
    A.dirty = true; render();
    fillList();
    const b = $("verify-now");
    if (b && document.activeElement === document.body) b.focus();
  }

  // A holder's newest head compared with this node's record of that seq.
  function compare(newest) {
    if (!newest) return ["no head held yet", "info"];
    const [seq, hash] = String(newest).split(":");
    const rec = ((A.list && A.list.records) || []).find((r) => String(r.seq) === seq);
    if (!rec) return ["not among the records loaded", "info"];
    return rec.hash === hash ? ["matches record " + seq, "ok"] : ["differs from record " + seq, "bad"];
  }

  function verifyCard() {
    const v = A.verify;
    const button = el("button", { type: "button", id: "verify-now", class: "secondary", disabled: A.verifying },
      A.verifying ? "Verifying…" : "Verify now");
    // The records are read again too: the heads are compared with them.
    button.addEventListener("click", () => { loadList(); runVerify(); });
    const status = el("p", { class: "result", role: "status", id: "verify-status" },
      A.verifying ? "Checking the chain and asking the peer and the witness for the heads they hold…" : A.verifyError);
    let body = [];
    if (v) {
      const verdict = v.ok
        ? el("p", { class: "audit-verdict ok", id: "audit-verdict" }, "✔ The chain verifies: ", el("strong", {}, String(v.records)),
          " records (seq " + v.first_seq + "–" + v.head_seq + ")" + (v.heads_matched
            ? ", and it matches all " + v.heads_matched + " heads the peer and the witness hold."
            : "; no head of it is held elsewhere yet (sent every audit.head_interval_ms)."))
        : el("p", { class: "audit-verdict bad", id: "audit-verdict" }, "✘ Verification failed: ", el("strong", {}, v.problem || "the chain does not verify"),
          v.first_bad_seq !== null && v.first_bad_seq !== undefined ? ". First bad record: seq " + v.first_bad_seq + " (marked in the list below)." : ".");
      const holders = v.holders.map((h) => {
        const [cmp, cls] = compare(h.newest);
        return el("tr", {}, el("td", {}, h.holder),
          el("td", {}, h.heads === null || h.heads === undefined ? "—" : String(h.heads)),
          el("td", { class: "mono" }, h.newest ? h.newest.split(":")[0] + ":" + short(h.newest.split(":")[1]) : "—"),
          el("td", {}, el("span", { class: "badge " + cls }, cmp)),
          el("td", { class: "muted" }, h.note));
      });
      body = [verdict,
        el("dl", { class: "kv" },
          el("dt", {}, "Node"), el("dd", {}, v.node),
          el("dt", {}, "Head"), el("dd", { class: "mono" }, v.head_seq + ":" + short(v.head_hash)),
          el("dt", {}, "Checkpoint"), el("dd", {}, v.checkpoint ? v.checkpoint.split(":")[0] + " (log pruned before it)" : "none (never pruned)"),
          el("dt", {}, "Heads held elsewhere"), el("dd", {}, !v.ok
            ? v.heads_matched + " matched before the first problem (the newest ones are compared below)"
            : v.heads_matched + " matched" + (v.heads_pruned ? ", " + v.heads_pruned + " older than the checkpoint" : ""))),
        holders.length
          ? el("table", { class: "audit-holders" },
            el("caption", {}, "The heads the peer and the witness hold of this node's chain"),
            el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Holder"), el("th", { scope: "col" }, "Heads held"),
              el("th", { scope: "col" }, "Newest"), el("th", { scope: "col" }, "Compared"), el("th", { scope: "col" }, "Note"))),
            el("tbody", {}, holders))
          : el("p", { class: "note" }, "No peer or witness holds heads of this chain: only the chain itself is checked (pair a node and add a [cluster] witness for tamper evidence against root on this node).")];
    } else if (!A.verifying && !A.verifyError) {
      body = [el("p", { class: "muted" }, "Not verified yet.")];
    }
    return el("div", { class: "card audit-verify" + (v ? (v.ok ? " ok" : " bad") : "") },
      el("div", { class: "audit-verify-head" }, el("h2", {}, "Verification"), button), status, body);
  }

  function listBody() {
    if (A.listError) return [el("p", { class: "error", role: "alert" }, A.listError)];
    if (!A.list) return [el("p", { class: "muted" }, "Loading…")];
    const all = rows(A.list.records);
    const hit = all.filter(matches);
    const shown = hit.slice(0, A.shown);
    const bad = A.verify && !A.verify.ok ? A.verify.first_bad_seq : null;
    const trs = shown.map((r) => el("tr", { class: "audit-" + r.state.replace(/ /g, "-") + (bad !== null && r.seqs.includes(bad) ? " audit-bad-record" : "") },
      el("td", { class: "nowrap" }, stamp(r.time)),
      el("td", { class: "mono nowrap" }, r.seqs.length > 1 ? r.seqs[0] + "–" + r.seqs[r.seqs.length - 1] : String(r.seqs[0])),
      el("td", {}, whoText(r)),
      el("td", { class: "mono" }, r.from || "—"),
      el("td", {}, r.action || "—"),
      el("td", { class: "audit-target" }, r.target || "—"),
      el("td", {}, el("span", { class: "badge " + ({ ok: "ok", refused: "warn", failed: "bad" }[r.state] || "info") }, r.state),
        bad !== null && r.seqs.includes(bad) ? el("strong", { class: "audit-reason" }, " the first bad record: see the verification above") : null,
        r.reason ? el("span", { class: "audit-reason" }, " " + r.reason) : null),
      el("td", { class: "mono muted" }, r.op || "—")));
    const summary = "Showing " + shown.length + " of " + hit.length + " matching" +
      (hit.length !== all.length ? " (" + all.length + " in the range)" : "") +
      (A.list.omitted ? "; " + A.list.omitted + " older records left out: choose a shorter range" : "") + ".";
    const out = [el("p", { class: "note", id: "audit-count", role: "status" }, summary)];
    if (!shown.length) {
      out.push(el("p", { class: "muted" }, all.length ? "No record matches the filter." : "No records in this range."));
      return out;
    }
    out.push(el("div", { class: "audit-scroll", tabindex: "0", role: "region", "aria-label": "Audit records" }, el("table", { class: "audit-table", id: "audit-table" },
      el("caption", { class: "sr-only" }, "Audit records, newest first"),
      el("thead", {}, el("tr", {}, ["Time", "Seq", "Who", "From", "Action", "Target", "Result", "Op id"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, trs))));
    if (hit.length > shown.length) {
      const more = el("button", { type: "button", class: "secondary", id: "audit-more" }, "Show " + Math.min(SHOWN_MAX, hit.length - shown.length) + " more");
      more.addEventListener("click", () => { A.shown += SHOWN_MAX; fillList(); const m = $("audit-more"); if (m) m.focus(); });
      out.push(more);
    }
    return out;
  }

  function fillList() {
    const box = $("audit-list");
    if (box) box.replaceChildren(...listBody());
  }

  function filters() {
    const text = el("input", { id: "audit-text", type: "search", value: A.filter.text, placeholder: "token, node, action, target…", autocomplete: "off" });
    text.addEventListener("input", () => { A.filter.text = text.value; A.shown = SHOWN_MAX; fillList(); });
    const result = el("select", { id: "audit-result" },
      [["all", "any result"], ["ok", "ok"], ["refused", "refused"], ["failed", "failed"], ["no result", "no result"]].map(([v, l]) =>
        el("option", { value: v, selected: A.filter.result === v }, l)));
    result.addEventListener("change", () => { A.filter.result = result.value; A.shown = SHOWN_MAX; fillList(); });
    const since = el("select", { id: "audit-since" },
      RANGES.map(([v, l]) => el("option", { value: v, selected: A.filter.since === v }, l)));
    since.addEventListener("change", () => { A.filter.since = since.value; A.shown = SHOWN_MAX; loadList(); });
    const reload = el("button", { type: "button", class: "secondary", id: "audit-reload", disabled: A.loading }, A.loading ? "Loading…" : "Reload");
    reload.addEventListener("click", loadList);
    return el("form", { class: "audit-filters", role: "search", "aria-label": "Filter the audit records", onsubmit: (e) => e.preventDefault() },
      el("label", { for: "audit-text" }, "Who, action or target"), text,
      el("label", { for: "audit-result" }, "Result"), result,
      el("label", { for: "audit-since" }, "Time range"), since,
      reload);
  }

  function build() {
    return el("section", { "aria-labelledby": "h" },
      el("h1", { id: "h" }, "Audit"),
      el("p", { class: "note" }, "Every action that changes something (who, from where, the request, the result), every console login, and every automatic decision, as one hash-chained record each. This node's log" +
        (A.list ? " (" + A.list.node + ", head seq " + A.list.head_seq + ")" : "") + "; each node keeps its own."),
      verifyCard(),
      el("div", { class: "card" }, el("h2", {}, "Records"), filters(), el("div", { id: "audit-list" }, listBody())));
  }

  function auditView() {
    document.title = "Audit · ferry";
    const who = S.session.name + "|" + S.session.role;
    if (A.who !== who) {
      A.who = who; A.list = null; A.verify = null; A.dirty = true; A.loading = true; A.verifying = true;
      setTimeout(() => { loadList(); runVerify(); }, 0);
    }
    // Rebuilt only when its own data changed: the other views' SSE
    // updates keep this one as it is (focus, caret, scroll).
    if (A.dirty || !A.root) {
      const active = document.activeElement;
      const keep = active && active.id && active.id.startsWith("audit-") && active.tagName === "INPUT"
        ? [active.id, active.selectionStart, active.selectionEnd] : null;
      A.root = build(); A.dirty = false;
      if (keep) {
        setTimeout(() => { const i = $(keep[0]); if (i && i.setSelectionRange) i.setSelectionRange(keep[1], keep[2]); }, 0);
      }
    }
    return A.root;
  }

  // Coming back to the view reads the log again.
  window.addEventListener("hashchange", () => {
    if (location.hash === "#audit" && A.who) { loadList(); }
  });

  VIEW_FNS.audit = auditView;
})();
