#!/usr/bin/env python3
"""The console's Estimate view in real headless Chromium (run by
tests/console.rs, `the_estimate_view_…`): the estimate a writer wrote
listed with its method, state, progress and allocated bytes as the API
says; its W(T) chart drawn with a point per measured window and its data
table opened by keyboard; a second estimate started from the form by
keyboard, and the API's refusal shown next to the form; the forecast over
an entered bandwidth, its initial sync equal to the API's (allocated ÷
bandwidth) with its why opened by keyboard; the list refreshed while the
view is open and not once it is left; a delete after its confirmation; a
viewer without the start form. Exits non-zero on the first failed check;
prints each screenshot's path ("screenshot: PATH")."""

import argparse
import json
import re
import math
import os
import sys
import time

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ferry_console import axe, check, context, http, launch, login, setup, shot, visible_buttons  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--operator", required=True)
p.add_argument("--viewer", required=True)
p.add_argument("--estimate", required=True, help="an estimate observing --volume, which a writer wrote")
p.add_argument("--volume", required=True)
p.add_argument("--volume2", required=True, help="a volume no estimate observes")
p.add_argument("--peer", required=True, help="a node paired with this one")
p.add_argument("--shots", required=True)
p.add_argument("--axe", required=True)
p.add_argument("--console-dir", help="serve the console's files (and index.html) from this directory "
               "instead of the agent's (to try a change to them without rebuilding ferry)")
args = p.parse_args()
setup(args.base, args.shots, args.axe)
E = args.estimate


def js_bytes(n):
    """app.js bytes()."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    n = float(n)
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return (f"{n:.1f}" if i else f"{int(n)}") + " " + units[i]


def api(path, token=None):
    status, body = http("GET", path, token or args.operator)
    check(status == 200, f"GET {path}: {status} {body[:200]}")
    return json.loads(body)


def new_page(ctx, errors):
    page = ctx.new_page()
    page.on("console", lambda m: m.type == "error" and not m.location.get("url", "").endswith(
        "/api/v1/session") and not m.text.startswith("Failed to load resource") and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    if args.console_dir:
        def local(route):
            url = route.request.url.split("#")[0]
            name = url.split("/console/")[1].split("?")[0] if "/console/" in url else "index.html"
            resp = route.fetch()
            route.fulfill(response=resp, body=open(os.path.join(args.console_dir, name), "rb").read())
        page.route("**/console/*", local)
        page.route(args.base + "/", local)
    return page


with sync_playwright() as pw:
    browser = launch(pw)

    # --- an operator ---
    ctx = context(browser)
    errors = []
    page = new_page(ctx, errors)
    requests = []
    page.on("request", lambda r: requests.append((time.time(), r.url)))
    login(page, args.operator)
    nav = page.eval_on_selector_all("nav a", "as => as.map(a => a.textContent.trim())")
    check(nav[:3] == ["Overview", "Migrate", "Estimate"], f"Estimate is the tab after Migrate: {nav}")
    page.click("nav a[data-view=estimate]")
    row = f'#est-list tr[data-name="{E}"]'
    page.wait_for_selector(row)
    st = api(f"/api/v1/estimates/{E}")
    text = page.inner_text(row)
    check(f"volume {args.volume}" in text.replace("\n", " ").replace("\t", " ") or
          ("volume" in text and args.volume in text), f"the row names its source: {text}")
    check("filter" in text and "observing" in text, f"method and state: {text}")
    check(js_bytes(st["allocated_bytes"]) in text, f"allocated {js_bytes(st['allocated_bytes'])}: {text}")
    check("left" in text and "write IOPS" in text, f"time left and IOPS: {text}")
    prog = page.get_attribute(row + " progress", "value")
    check(prog is not None and abs(float(prog) - round(st["progress"] * 100)) <= 1,
          f"the progress bar {prog} % is the API's {st['progress']}")
    check(page.get_attribute(f"#est-select-{E}", "aria-pressed") == "true", "the only estimate is the one shown")

    # W(T): a point per measured window, the mean line, the data table.
    page.wait_for_selector("#wt-chart circle.dot")
    st = api(f"/api/v1/estimates/{E}")
    n = int(page.get_attribute("#wt-chart", "data-points"))
    dots = page.eval_on_selector_all("#wt-chart circle.dot", "cs => cs.length")
    check(n >= 3 and dots == n and abs(n - len(st["working_set"])) <= 1,
          f"the chart has a point per window length ({dots}/{n}, API {len(st['working_set'])})")
    check(page.query_selector("#wt-chart path.wt-mean") is not None, "and the mean")
    label = page.get_attribute("#wt-chart", "aria-label")
    check(page.get_attribute("#wt-chart", "role") == "img" and "window" in label, f"its name: {label}")
    ticks = page.eval_on_selector_all("#wt-chart text.xlabel", "ts => ts.map(t => t.textContent)")
    check("1 s" in ticks and "1 h" in ticks and "1 d" in ticks, f"log-scale x from 1 s to 24 h: {ticks}")
    page.focus(f"#wt-table-{E} summary")
    page.keyboard.press("Enter")
    page.wait_for_selector("#wt-table tbody tr")
    rows = page.eval_on_selector_all("#wt-table tbody tr", "rs => rs.map(r => r.cells[0].textContent)")
    check(len(rows) >= n - 1 and rows[0] == "1 s", f"the data table has the windows: {rows}")
    # Still open after the refresh rebuilt the view.
    page.wait_for_timeout(2500)
    check(page.query_selector("#wt-table tbody tr") is not None, "the table stays open across refreshes")

    # The start form, by keyboard: a refusal from the API first.
    page.focus("#est-name")
    page.keyboard.type("e2")
    page.keyboard.press("Tab")   # the kind: volume
    check(page.evaluate("document.activeElement.id") == "est-kind", "Tab reaches the source kind")
    page.keyboard.press("Tab")
    page.keyboard.type("nope")
    page.keyboard.press("Tab")
    page.keyboard.press("Control+a")
    page.keyboard.type("1h")
    page.keyboard.press("Enter")
    page.wait_for_selector("#est-form-error:has-text('Refused')")
    err = page.inner_text("#est-form-error")
    check("not served here" in err, f"the API's refusal next to the form: {err}")
    page.focus("#est-source")
    page.keyboard.press("Control+a")
    page.keyboard.type(args.volume2)
    page.keyboard.press("Enter")
    page.wait_for_selector('#est-list tr[data-name="e2"]')
    s2 = api("/api/v1/estimates/e2")
    check(s2["source"] == {"kind": "volume", "name": args.volume2, "members": [args.volume2]} and s2["duration_s"] == 3600,
          f"e2 observes {args.volume2} for 1 h: {s2['source']} {s2['duration_s']}")
    check(page.inner_text("#est-form-error") == "", "the error is gone")
    check("Observing volume " + args.volume2 in page.inner_text("#est-form-result"), "the form says what started")
    page.click(f"#est-select-{E}")
    page.wait_for_selector(f"#est-select-{E}[aria-pressed=true]")
    shot(page, "estimate")
    axe(page, "estimate")

    # The forecast over a bandwidth entered.
    page.select_option("#fc-link", "bandwidth")
    page.fill("#fc-bandwidth", "4MiB/s")
    page.fill("#fc-ship-days", "1")
    page.focus("#fc-bandwidth")
    page.keyboard.press("Enter")
    page.wait_for_selector("#fc-report #fc-initial-sync")
    rep = api(f"/api/v1/estimates/{E}/report?bandwidth_bytes_per_s={4 << 20}&ship_days=1")
    want = rep["forecast"]["initial_sync"]["seconds"]
    why_in = {i["name"]: i["value"] for i in rep["forecast"]["initial_sync"]["why"]["inputs"]}
    copy = why_in["copy_rate"]
    check(math.isclose(copy, (4 << 20) - why_in["write_rate"], rel_tol=1e-9),
          f"the copy gets the bandwidth less the streamed writes: {why_in}")
    check(math.isclose(want, rep["allocated_bytes"] / copy, rel_tol=1e-9),
          f"the API's initial sync {want} s is allocated / copy rate")
    got = float(page.get_attribute("#fc-initial-sync", "data-seconds"))
    # The page's report is a moment later: the observed write rate (bytes
    # over the time observed) has moved a little since.
    check(math.isclose(got, want, rel_tol=0.02), f"the page's initial sync {got} s is the API's {want} s")
    fig = page.inner_text("#fc-initial-sync")
    check(js_bytes(rep["allocated_bytes"]) in fig and "4.0 MiB/s" in fig, f"with allocated and bandwidth: {fig}")
    for fid in ["ready-sync", "ready-async", "throttle-sync", "throttle-async", "lag", "cutover", "best-hours", "seeding"]:
        check(page.query_selector(f"#fc-{fid}") is not None, f"the {fid} figure is shown")
    v = rep["forecast"]["ready_async"]["verdict"]["verdict"]
    check(page.get_attribute("#fc-ready-async", "data-verdict") == v, f"async verdict {v}")
    words = page.inner_text("#fc-ready-async")
    check(("ready in" in words) if v == "converges" else ("does not converge" in words), f"in words: {words}")
    cut = page.inner_text("#fc-cutover")
    check("drain" in cut and "re-hash" in cut and "commit" in cut and "start hook" in cut, f"the cutover's parts: {cut}")
    # The page asked for its own report a moment later than the API call
    # above: the seconds observed may differ, the warnings' words may not.
    digits = lambda t: re.sub(r"[0-9]+", "N", t)
    for w in rep["warnings"]:
        check(digits(w) in digits(page.inner_text("#fc-warnings")), f"warning shown: {w}")
    # Its why, opened by keyboard: formula, explanation, inputs with units.
    page.focus("#why-initial-sync summary")
    page.keyboard.press("Enter")
    page.wait_for_selector("#why-initial-sync[open] table.inputs tbody tr")
    inputs = page.eval_on_selector_all("#why-initial-sync table.inputs tbody tr",
                                       "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    check(["allocated_bytes", js_bytes(rep["allocated_bytes"]), "B"] in inputs and
          ["bandwidth", "4.0 MiB/s", "B/s"] in inputs, f"the why's inputs with units: {inputs}")
    why = page.inner_text("#why-initial-sync")
    check("holes are not sent" in why, f"and its explanation: {why}")
    page.focus("#why-cutover summary")
    page.keyboard.press("Enter")
    page.wait_for_selector("#why-cutover[open] table.inputs")
    page.wait_for_timeout(2500)
    check(page.query_selector("#why-initial-sync[open]") is not None, "the why stays open across refreshes")
    shot(page, "estimate-forecast")
    axe(page, "estimate-forecast")
    # A bandwidth the page cannot read: said, no request.
    page.fill("#fc-bandwidth", "fast")
    page.click("#fc-go")
    check("Bandwidth" in page.inner_text("#fc-error"), "an unreadable bandwidth is said")

    # The paired node as the link: no probe yet, said; then the probe,
    # whose result (or the API's refusal, e.g. 409 while it is not built)
    # the form shows.
    opts = page.eval_on_selector_all("#fc-link option", "os => os.map(o => o.value)")
    check(f"to:{args.peer}" in opts, f"the paired node is a link choice: {opts}")
    page.select_option("#fc-link", f"to:{args.peer}")
    page.wait_for_selector("#fc-bandwidth", state="detached")
    page.click("#fc-go")
    page.wait_for_selector("#fc-error:has-text('No forecast')")
    check("probe" in page.inner_text("#fc-error"), f"no probe yet: {page.inner_text('#fc-error')}")
    page.focus("#fc-probe")
    check(page.inner_text("#fc-probe") == f"Probe link to {args.peer}", "the probe button names the node")
    page.keyboard.press("Enter")
    page.wait_for_function("() => /Probe refused|link .* → /.test(document.querySelector('#fc-error').textContent + "
                           "document.querySelector('#fc-probe-result').textContent)", timeout=60000)
    status, body = http("GET", "/api/v1/probes", args.operator)
    probes = json.loads(body) if status == 200 else []
    if probes:
        check(f"→ {args.peer}" in page.inner_text("#fc-probe-result"), "the probe's throughput and round trips shown")
    else:
        check("Probe refused: " in page.inner_text("#fc-error"), f"the refusal shown: {page.inner_text('#fc-error')}")
    check(page.evaluate("document.activeElement.id") == "fc-probe", "the focus stays on the probe button")
    page.select_option("#fc-link", "bandwidth")

    # Refreshed while open (every 2 s: never faster than once a second)…
    mark = len(requests)
    page.wait_for_timeout(6500)
    lists = [t for t, u in requests[mark:] if u.endswith("/api/v1/estimates")]
    gaps = [b - a for a, b in zip(lists, lists[1:])]
    check(2 <= len(lists) <= 4 and all(g >= 1 for g in gaps), f"the list refreshed every 2 s: {len(lists)}, gaps {gaps}")

    # Delete e2, after its confirmation.
    page.click("#est-select-e2")
    page.wait_for_selector("#est-select-e2[aria-pressed=true]")
    page.click("#est-delete")
    page.wait_for_selector("#confirm[open]")
    check("Delete estimate e2" in page.inner_text("#confirm-title"), "a confirmation first")
    page.click("#confirm-ok")
    page.wait_for_selector('#est-list tr[data-name="e2"]', state="detached")
    status, _ = http("GET", "/api/v1/estimates/e2", args.operator)
    check(status == 404, f"e2 is gone: {status}")

    # …and not at all once the view is left.
    page.click("nav a[data-view=cluster]")
    page.wait_for_selector("h1:has-text('Cluster')")
    mark = len(requests)
    page.wait_for_timeout(4500)
    after = [u for _, u in requests[mark:] if "/api/v1/estimates" in u]
    check(after == [], f"no estimate request once the view is left: {after}")
    check(errors == [], f"no script or CSP error in the console: {errors}")
    ctx.close()

    # --- a viewer: the list, the chart and the forecast; nothing to change ---
    ctx = context(browser)
    errors = []
    page = new_page(ctx, errors)
    login(page, args.viewer)
    page.goto(args.base + "/#estimate")
    page.wait_for_selector(row)
    page.wait_for_selector("#wt-chart")
    check(page.query_selector("#est-form") is None, "a viewer gets no start form")
    buttons = set(visible_buttons(page))
    check(buttons <= {"Log out", "Show", "Shown", "Forecast"}, f"a viewer sees no state-changing button: {buttons}")
    status, _ = http("POST", "/api/v1/estimates", args.viewer, {"name": "x", "volume": args.volume2, "duration_s": 60})
    check(status == 403, f"and the API refuses a viewer's start: {status}")
    check(errors == [], f"no script error for the viewer: {errors}")
    ctx.close()
    browser.close()

print("estimate: all checks passed")
