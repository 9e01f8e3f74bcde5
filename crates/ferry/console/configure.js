// ferry console: the Configure view (registered in VIEW_FNS; uses app.js's
// S, el, api, badge, confirmThen). This node and its peers with their
// certificate fingerprints (GetNode, ListNodes; AddNode pairs), named
// tokens (ListTokens, CreateToken — the secret shown once —, RevokeToken),
// and each workload's hooks, VIP and hook time limit (ListWorkloads,
// PutWorkload). Every change goes through those typed Actions; the page
// offers them only to an admin (the routes' least role).
"use strict";

(() => {
  const C = {
    who: null, tokens: null, tokensError: "", workloads: null, workloadsError: "", config: null, configError: "", open: {},
    created: null, results: {}, editing: null, root: null, dirty: true, nodesKey: "",
    // Form values, kept across re-renders.
    f: { tokName: "", tokRole: "viewer", nodeName: "", nodeApi: "", nodeFp: "", nodeToken: "", edit: {} },
  };

  function mark() { C.dirty = true; render(); }

  function fp(s) { return el("code", { class: "fingerprint" }, s || "—"); }

  function input(id, label, value, onInput, attrs) {
    const i = el("input", Object.assign({ id, value: value || "", autocomplete: "off", spellcheck: "false" }, attrs || {}));
    i.addEventListener("input", () => onInput(i.value));
    return [el("label", { for: id }, label), i];
  }

  async function loadTokens() {
    if (!may("admin")) { C.tokens = null; return; }
    try { C.tokens = await api("GET", "/api/v1/tokens"); C.tokensError = ""; } catch (e) { C.tokensError = e.message; }
  }

  async function loadWorkloads() {
    try { C.workloads = await api("GET", "/api/v1/workloads"); C.workloadsError = ""; } catch (e) { C.workloadsError = e.message; }
  }

  async function loadConfig() {
    try { C.config = await api("GET", "/api/v1/config"); C.configError = ""; } catch (e) { C.configError = e.message; }
  }

  async function loadAll() {
    await Promise.all([loadTokens(), loadWorkloads(), loadConfig(), refresh().catch(() => {})]);
    mark();
  }

  // Runs one Action from a button: its result in `key`'s status line; the
  // button gets the focus back.
  async function run(button, key, method, path, body, done) {
    button.disabled = true;
    C.results[key] = "working…"; mark();
    try {
      const r = await api(method, path, body);
      C.results[key] = done(r);
      await loadAll();
    } catch (e) {
      C.results[key] = "Refused: " + e.message;
      mark();
    }
    const again = $(button.id);
    if (again) { again.disabled = false; again.focus(); }
  }

  function status(key) {
    return el("p", { class: "result", role: "status", id: "result-" + key }, C.results[key] || "");
  }

  // ---- this node and its peers ----

  function nodesCard() {
    const n = S.node;
    const peers = (S.nodes || []).map((p) => el("tr", {},
      el("td", {}, p.name), el("td", { class: "mono" }, p.api), el("td", {}, fp(p.fingerprint))));
    const parts = [el("h2", {}, "Nodes and pairing"),
      el("dl", { class: "kv" },
        el("dt", {}, "This node"), el("dd", { id: "cfg-node-name" }, n.node_name),
        el("dt", {}, "Fingerprint"), el("dd", {}, fp(n.fingerprint)),
        el("dt", {}, "API"), el("dd", { class: "mono" }, n.api),
        el("dt", {}, "Replication"), el("dd", { class: "mono" }, n.replication),
        el("dt", {}, "Heartbeat"), el("dd", { class: "mono" }, (n.heartbeat || []).join(", ") || "none (standalone)"),
        el("dt", {}, "Version"), el("dd", {}, n.version)),
      el("h3", {}, "Paired nodes"),
      peers.length
        ? el("table", { id: "cfg-peers" }, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Node"), el("th", { scope: "col" }, "API"), el("th", { scope: "col" }, "Pinned certificate fingerprint"))),
          el("tbody", {}, peers))
        : el("p", { class: "muted" }, "No node is paired with this one.")];
    if (may("admin")) parts.push(addNodeForm());
    else parts.push(el("p", { class: "note" }, "Pairing a node needs an admin token."));
    return el("div", { class: "card" }, parts);
  }

  function addNodeForm() {
    const f = C.f;
    const b = el("button", { type: "submit", id: "cfg-add-node" }, "Add node");
    const form = el("form", { class: "cfg-form", "aria-labelledby": "cfg-add-h" },
      el("h3", { id: "cfg-add-h" }, "Add a node"),
      el("div", { class: "cfg-fields" },
        input("cfg-node-name-in", "Name", f.nodeName, (v) => { f.nodeName = v; }, { required: true }),
        input("cfg-node-api", "API address (host:port)", f.nodeApi, (v) => { f.nodeApi = v; }, { required: true, placeholder: "198.18.0.2:7360" }),
        input("cfg-node-fp", "Its certificate fingerprint", f.nodeFp, (v) => { f.nodeFp = v; }, { required: true, "aria-describedby": "cfg-fp-help" }),
        input("cfg-node-token", "Its admin API token (used once, not kept)", f.nodeToken, (v) => { f.nodeToken = v; }, { required: true, type: "password" })),
      el("p", { class: "note", id: "cfg-fp-help" }, "Read the fingerprint on that node (ferry node id, or its Configure view) and compare it character by character: only that certificate is pinned. This node's is ", fp(S.node.fingerprint), "."),
      el("div", { class: "actions" }, b), status("node"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      confirmThen("Pair with " + f.nodeName + "?",
        "This node pins the certificate with fingerprint " + f.nodeFp.trim() + " for " + f.nodeName + " at " + f.nodeApi.trim() +
        ", and that node pins this one's (" + S.node.fingerprint + "). Paired nodes may replicate to and act on each other. Compare the fingerprint with the one that node shows before you go on.",
        "Pair", () => run(b, "node", "POST", "/api/v1/nodes",
          { name: f.nodeName.trim(), api: f.nodeApi.trim(), token: f.nodeToken, fingerprint: f.nodeFp.trim() },
          (r) => { f.nodeName = f.nodeApi = f.nodeFp = f.nodeToken = ""; return "Paired with " + r.name + " (" + r.api + "), fingerprint " + r.fingerprint + "."; }));
    });
    return form;
  }

  // ---- tokens ----

  function tokensCard() {
    const parts = [el("h2", {}, "API tokens")];
    if (!may("admin")) {
      parts.push(el("p", { class: "note", id: "cfg-tokens-note" }, "Listing and managing tokens needs an admin token; you are logged in as " +
        S.session.name + " (" + S.session.role + ")."));
      return el("div", { class: "card" }, parts);
    }
    if (C.created) {
      const copy = el("button", { type: "button", class: "secondary", id: "cfg-copy" }, "Copy");
      copy.addEventListener("click", async () => {
        try { await navigator.clipboard.writeText(C.created.token); C.results.copy = "Copied."; } catch (_) {
          C.results.copy = "The browser did not allow copying: select the token and press Ctrl+C.";
        }
        mark(); const c = $("cfg-copy"); if (c) c.focus();
      });
      const done = el("button", { type: "button", class: "secondary", id: "cfg-copied" }, "I have saved it");
      done.addEventListener("click", () => { C.created = null; C.results.copy = ""; mark(); const n = $("cfg-tok-name"); if (n) n.focus(); });
      parts.push(el("div", { class: "cfg-secret", id: "cfg-secret", role: "region", "aria-label": "The new token" },
        el("p", {}, el("strong", {}, "Token " + C.created.name + " (" + C.created.role + ") created. "),
          "Copy it now: it is shown this once and never again (ferry keeps only its hash)."),
        el("code", { id: "cfg-secret-value", class: "secret" }, C.created.token),
        el("div", { class: "actions" }, copy, done), status("copy")));
    }
    if (C.tokensError) parts.push(el("p", { class: "error" }, "Could not list the tokens: " + C.tokensError));
    const rows = (C.tokens || []).map((t) => {
      const id = "cfg-revoke-" + t.name.replace(/[^A-Za-z0-9_-]/g, "_");
      let revoke = el("span", { class: "muted" }, "the node's api.token: ferry token rotate");
      if (t.created_unix !== null && t.created_unix !== undefined) {
        revoke = el("button", { type: "button", class: "danger", id }, "Revoke");
        revoke.setAttribute("aria-label", "Revoke token " + t.name);
        revoke.addEventListener("click", () => confirmThen("Revoke token " + t.name + "?",
          "Whoever holds " + t.name + " (" + t.role + ") is refused from now on: its open console sessions and event streams end at once. This cannot be undone (create a new token instead).",
          "Revoke " + t.name, () => run(revoke, "tokens", "DELETE", "/api/v1/tokens/" + encodeURIComponent(t.name), undefined,
            (r) => "Revoked " + r.revoked + " on " + r.node + ".")));
      }
      return el("tr", {}, el("td", {}, t.name), el("td", {}, t.role),
        el("td", {}, t.created_unix ? new Date(t.created_unix * 1000).toLocaleString() : "—"), el("td", {}, t.scope), el("td", {}, revoke));
    });
    parts.push(el("table", { id: "cfg-tokens" },
      el("thead", {}, el("tr", {}, ["Name", "Role", "Created", "Valid on", "Revoke"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)));
    const f = C.f;
    const b = el("button", { type: "submit", id: "cfg-tok-create" }, "Create token");
    const role = el("select", { id: "cfg-tok-role" }, ["viewer", "operator", "admin"].map((r) => el("option", { value: r, selected: f.tokRole === r }, r)));
    role.addEventListener("change", () => { f.tokRole = role.value; });
    const form = el("form", { class: "cfg-form cfg-inline", "aria-labelledby": "cfg-tok-h" },
      el("h3", { id: "cfg-tok-h" }, "Create a token"),
      el("div", { class: "cfg-fields" },
        input("cfg-tok-name", "Name", f.tokName, (v) => { f.tokName = v; }, { required: true, pattern: "[A-Za-z0-9._-]+", title: "letters, digits, dot, dash, underscore" }),
        el("label", { for: "cfg-tok-role" }, "Role"), role),
      el("div", { class: "actions" }, b),
      el("p", { class: "note" }, "viewer: reads everything; operator: also migrates, cuts over, switches over; admin: also tokens, nodes, workloads. Valid on this node only."));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      run(b, "tokens", "POST", "/api/v1/tokens", { name: f.tokName.trim(), role: f.tokRole }, (r) => {
        C.created = r; f.tokName = "";
        return "Created " + r.name + " (" + r.role + ").";
      });
    });
    parts.push(form, status("tokens"));
    return el("div", { class: "card" }, parts);
  }

  // ---- workloads ----

  const EDITABLE = [["start", "Start hook"], ["stop", "Stop hook"], ["check", "Check hook"],
    ["hook_timeout_ms", "Hook time limit (ms)"], ["vip", "VIP (ADDR/PREFIX)"], ["vip_interface", "VIP interface"]];

  function wid(name) { return name.replace(/[^A-Za-z0-9_-]/g, "_"); }

  function workloadCard(w) {
    const id = wid(w.name);
    const show = (v) => (v === null || v === undefined || v === "" ? el("span", { class: "muted" }, "none") : el("code", {}, String(v)));
    const parts = [el("h3", { id: "cfg-w-" + id }, w.name),
      el("dl", { class: "kv" },
        el("dt", {}, "Volumes"), el("dd", {}, (w.volumes || []).join(", ") || "none"),
        el("dt", {}, "Shares"), el("dd", {}, (w.shares || []).join(", ") || "none"),
        EDITABLE.map(([k, l]) => [el("dt", {}, l), el("dd", { id: "cfg-" + k + "-" + id }, show(w[k]))]),
        el("dt", {}, "VM"), el("dd", {}, w.vm ? w.vm.memory_mib + " MiB" : "none"))];
    if (may("admin")) {
      if (C.editing === w.name) parts.push(editForm(w));
      else {
        const b = el("button", { type: "button", class: "secondary", id: "cfg-edit-" + id }, "Edit hooks, VIP and limit");
        b.setAttribute("aria-label", "Edit hooks, VIP and limit of " + w.name);
        b.addEventListener("click", () => {
          C.editing = w.name;
          C.f.edit = {};
          for (const [k] of EDITABLE) C.f.edit[k] = w[k] === null || w[k] === undefined ? "" : String(w[k]);
          mark();
          const first = $("cfg-e-start-" + id); if (first) first.focus();
        });
        parts.push(el("div", { class: "actions" }, b));
      }
    }
    parts.push(status("w-" + id));
    return el("article", { class: "cfg-workload", "aria-labelledby": "cfg-w-" + id }, parts);
  }

  function editForm(w) {
    const id = wid(w.name);
    const e = C.f.edit;
    const save = el("button", { type: "submit", id: "cfg-save-" + id }, "Save");
    const cancel = el("button", { type: "button", class: "secondary", id: "cfg-cancel-" + id }, "Cancel");
    cancel.addEventListener("click", () => { C.editing = null; mark(); const b = $("cfg-edit-" + id); if (b) b.focus(); });
    const form = el("form", { class: "cfg-form", "aria-label": "Edit " + w.name },
      el("div", { class: "cfg-fields" }, EDITABLE.map(([k, l]) =>
        input("cfg-e-" + k + "-" + id, l, e[k], (v) => { e[k] = v; }, k === "hook_timeout_ms" ? { inputmode: "numeric", pattern: "[0-9]+" } : {}))),
      el("p", { class: "note" }, "Hooks are shell commands run as root by the agent on the node that serves the workload; an empty field removes it."),
      el("div", { class: "actions" }, save, cancel));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const spec = Object.assign({}, w);
      for (const [k] of EDITABLE) {
        const v = String(e[k] || "").trim();
        if (k === "hook_timeout_ms") spec[k] = v === "" ? w[k] : Number(v);
        else spec[k] = v === "" ? null : v;
      }
      const hooks = ["start", "stop", "check"].filter((k) => (spec[k] || null) !== (w[k] || null));
      confirmThen("Change " + w.name + "'s definition?",
        (hooks.length ? "The " + hooks.join(", ") + " hook" + (hooks.length > 1 ? "s run" : " runs") + " as root on every node that serves " + w.name + ". " : "") +
        "The new definition is saved on this node and on every paired node that holds " + w.name + ".",
        "Save", () => run(save, "w-" + id, "PUT", "/api/v1/workloads/" + encodeURIComponent(w.name), spec, (r) => {
          C.editing = null;
          return "Saved on " + r.updated_on.join(", ") + ".";
        }));
    });
    return form;
  }

  function workloadsCard() {
    const parts = [el("h2", {}, "Workloads: hooks, VIP and limits")];
    if (C.workloadsError) parts.push(el("p", { class: "error" }, "Could not list the workloads: " + C.workloadsError));
    else if (!C.workloads) parts.push(el("p", { class: "muted" }, "Loading…"));
    else if (!C.workloads.length) parts.push(el("p", { class: "muted" }, "No workload is defined on this node (ferry workload create)."));
    else parts.push(el("div", { class: "cfg-workloads" }, C.workloads.map(workloadCard)));
    if (!may("admin")) parts.push(el("p", { class: "note" }, "Changing a workload needs an admin token."));
    return el("div", { class: "card" }, parts);
  }

  function value(v) {
    if (v === null || v === undefined) return el("span", { class: "muted" }, "not set");
    if (Array.isArray(v)) return v.length ? el("code", {}, v.map(String).join(", ")) : el("span", { class: "muted" }, "none");
    if (typeof v === "object") return el("code", {}, JSON.stringify(v));
    return el("code", {}, String(v));
  }

  // The effective config (GetConfig), read-only: one table per [table] of
  // the file, each key as written there.
  function limitsCard() {
    const parts = [el("h2", {}, "Agent settings and limits (read-only)"),
      el("p", { class: "note" }, "The agent's effective config: its file (ferry agent --config FILE) with every default filled in. It is read at start: change a value in that file, under the table and key shown, and restart the agent.")];
    if (C.configError) parts.push(el("p", { class: "error" }, "Could not read the config: " + C.configError));
    else if (!C.config) parts.push(el("p", { class: "muted" }, "Loading…"));
    else {
      const cfg = C.config.config || {};
      const top = Object.keys(cfg).filter((k) => cfg[k] === null || typeof cfg[k] !== "object" || Array.isArray(cfg[k]));
      const tables = Object.keys(cfg).filter((k) => !top.includes(k));
      const section = (name, keys, obj, prefix, key) => {
        const id = "cfg-t-" + key;
        const d = el("details", { class: "cfg-table", id, open: !!C.open[id] },
          el("summary", {}, name, el("span", { class: "muted" }, " · " + keys.length + " keys")),
          el("table", {}, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Key in the file"), el("th", { scope: "col" }, "Effective value"))),
            el("tbody", {}, keys.map((k) => el("tr", {}, el("td", { class: "mono" }, prefix + k), el("td", {}, value(obj[k])))))));
        d.addEventListener("toggle", () => { C.open[id] = d.open; });
        return d;
      };
      const list = [section("top of the file", top, cfg, "", "top")];
      for (const t of tables) list.push(section("[" + t + "]", Object.keys(cfg[t]), cfg[t], t + ".", t.replace(/[^A-Za-z0-9_-]/g, "_")));
      parts.push(el("div", { class: "cfg-tables", id: "cfg-config" }, list));
    }
    return el("div", { class: "card" }, parts);
  }

  function build() {
    return el("section", { "aria-labelledby": "h" },
      el("h1", { id: "h" }, "Configure"),
      el("div", { class: "grid cfg-grid" }, nodesCard(), tokensCard()),
      workloadsCard(), limitsCard());
  }

  function configureView() {
    document.title = "Configure · ferry";
    const who = S.session.name + "|" + S.session.role;
    if (C.who !== who) {
      Object.assign(C, { who, tokens: null, workloads: null, created: null, results: {}, editing: null, dirty: true });
      setTimeout(loadAll, 0);
    }
    // Rebuilt when its own data or the peers changed, not on every SSE
    // update of the other views (form input, focus and caret stay).
    const key = JSON.stringify(S.nodes || []);
    if (key !== C.nodesKey) { C.nodesKey = key; C.dirty = true; }
    if (C.dirty || !C.root) {
      C.root = build(); C.dirty = false;
    }
    return C.root;
  }

  window.addEventListener("hashchange", () => {
    if (location.hash === "#configure" && C.who) loadAll();
  });

  VIEW_FNS.configure = configureView;
})();
