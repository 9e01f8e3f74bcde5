#!/usr/bin/env python3
"""The console benchmark's browser half (run by bench/console.sh): logs in
to an agent's console in headless Chromium, measures the server time of
the first load and of each view from the answers' `Server-Timing` headers
(Resource Timing), and the time from a switchover made with the CLI to the
Cluster view showing it (Server-Sent Events). Prints a table and one JSON
line ("result: {...}")."""

import argparse
import json
import os
import statistics
import subprocess
import time

from playwright.sync_api import sync_playwright

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--token", required=True)
p.add_argument("--workload", required=True, help="an HA workload served by --here")
p.add_argument("--here", required=True)
p.add_argument("--peer", required=True)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--workloads", type=int, default=0)
args = p.parse_args()

VIEWS = ["overview", "migrate", "cluster", "statistics", "configure", "audit"]
SETTLE_S = 1.5  # a view's requests are made within this after its title shows

# Every resource entry after a mark: name, its server time (Server-Timing
# app;dur) and its duration as the browser saw it.
ENTRIES = """(since) => performance.getEntriesByType('resource').concat(performance.getEntriesByType('navigation'))
  .filter(e => e.startTime >= since)
  .map(e => ({name: e.name, server: (e.serverTiming.find(s => s.name === 'app') || {}).duration,
              wall: e.duration, start: e.startTime}))"""


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def server(entries):
    """(largest single request, sum) of the server times, over requests the
    agent answered (the event stream's answer has its headers at once)."""
    t = [e["server"] for e in entries if e["server"] is not None]
    return (max(t) if t else 0.0, sum(t))


def ferry(*a):
    out = subprocess.run([os.environ["FERRY_BIN"], *a], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"ferry {a} failed: {out.stderr}")
    return out.stdout


results = {"first_load": [], "views": {v: [] for v in VIEWS}, "sse_ms": []}
with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    for r in range(args.rounds):
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        t0 = time.monotonic()
        page.goto(args.base + "/")
        page.wait_for_selector("#login:not([hidden])")
        shown = (time.monotonic() - t0) * 1000
        page.fill("#token", args.token)
        t1 = time.monotonic()
        page.press("#token", "Enter")
        page.wait_for_selector("h1:has-text('Overview')")
        page.wait_for_selector(".card:has(h2:has-text('Workloads')) tbody tr")
        drawn = shown + (time.monotonic() - t1) * 1000
        time.sleep(SETTLE_S)
        e = page.evaluate(ENTRIES, 0)
        mx, total = server(e)
        results["first_load"].append({"max": mx, "sum": total, "requests": len(e), "drawn_ms": drawn,
                                      "login_page_ms": shown})
        for v in VIEWS:
            since = page.evaluate("performance.now()")
            t0 = time.monotonic()
            page.click(f"nav a[data-view={v}]")
            page.wait_for_selector(f"h1:text-is('{v.capitalize()}')")
            drawn = (time.monotonic() - t0) * 1000
            time.sleep(SETTLE_S)
            e = [x for x in page.evaluate(ENTRIES, since) if "/api/v1/events" not in x["name"]]
            mx, total = server(e)
            results["views"][v].append({"max": mx, "sum": total, "requests": len(e), "drawn_ms": drawn})
        ctx.close()

    # SSE to screen: a switchover made with the CLI, shown on the open
    # Cluster view without a reload.
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.goto(args.base + "/")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", args.token)
    page.press("#token", "Enter")
    page.wait_for_selector("h1:has-text('Overview')")
    page.click("nav a[data-view=cluster]")
    sel = f"#serving-{args.workload}"
    page.wait_for_selector(f"{sel}:text-is('{args.here}')")
    navigations = []
    page.on("framenavigated", lambda f: navigations.append(f.url))
    to = args.peer
    for r in range(args.rounds):
        time.sleep(2)  # the replica settles up to date after the last one
        ferry("cluster", "switchover", args.workload)
        done = time.monotonic()
        page.wait_for_selector(f"{sel}:text-is('{to}')", timeout=10000)
        results["sse_ms"].append((time.monotonic() - done) * 1000)
        to = args.here if to == args.peer else args.peer
    assert not navigations, f"the page reloaded: {navigations}"
    ctx.close()
    browser.close()

fl = results["first_load"]
print(f"{args.workloads} workloads; {args.rounds} rounds; medians (server time from Server-Timing, ms)")
print(f"{'':<12} {'largest request':>16} {'all requests':>13} {'requests':>9} {'drawn (wall)':>13}")
print(f"{'first load':<12} {median([x['max'] for x in fl]):>16.1f} {median([x['sum'] for x in fl]):>13.1f} "
      f"{median([x['requests'] for x in fl]):>9.0f} {median([x['drawn_ms'] for x in fl]):>13.0f}"
      f"   (login page shown after {median([x['login_page_ms'] for x in fl]):.0f} ms; drawn = that + login to data)")
summary = {"workloads": args.workloads, "rounds": args.rounds,
           "first_load": {"server_max_ms": median([x["max"] for x in fl]),
                          "server_sum_ms": median([x["sum"] for x in fl]),
                          "drawn_ms": median([x["drawn_ms"] for x in fl]),
                          "login_page_ms": median([x["login_page_ms"] for x in fl])}, "views": {}}
for v in VIEWS:
    xs = results["views"][v]
    print(f"{v:<12} {median([x['max'] for x in xs]):>16.1f} {median([x['sum'] for x in xs]):>13.1f} "
          f"{median([x['requests'] for x in xs]):>9.0f} {median([x['drawn_ms'] for x in xs]):>13.0f}")
    summary["views"][v] = {"server_max_ms": median([x["max"] for x in xs]),
                           "server_sum_ms": median([x["sum"] for x in xs]),
                           "drawn_ms": median([x["drawn_ms"] for x in xs])}
s = results["sse_ms"]
print(f"SSE to screen (switchover by CLI → Cluster view): median {median(s):.0f} ms, max {max(s):.0f} ms "
      f"over {len(s)}: {[round(x) for x in s]}")
summary["sse_to_screen_ms"] = {"median": median(s), "max": max(s)}
print("result: " + json.dumps(summary))
