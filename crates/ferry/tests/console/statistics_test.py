#!/usr/bin/env python3
"""The console's Statistics view in real headless Chromium (run by
tests/console.rs, `the_statistics_view_…`): the scopes listed, the
volume's write-rate chart drawn with its points, its summary and its CSV
download equal to what `ferry stats` says, the range choice changing the
query, keyboard operation, a viewer's view, the page refreshing while
open (never faster than once a second) and not at all once left, and the
empty state of a node with history off. Exits non-zero on the first
failed check; prints each screenshot's path ("screenshot: PATH")."""

import argparse
import json
import math
import os
import subprocess
import sys
import time

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ferry_console import axe, check, context, launch, login, setup, shot, visible_buttons  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--base", required=True, help="the agent with history")
p.add_argument("--base-off", required=True, help="an agent with history.enabled = false")
p.add_argument("--admin", required=True)
p.add_argument("--viewer", required=True)
p.add_argument("--admin-off", required=True, help="an admin token of the --base-off agent")
p.add_argument("--node", required=True)
p.add_argument("--volume", required=True, help="a volume a writer wrote")
p.add_argument("--workload", required=True, help="a workload holding --volume")
p.add_argument("--ferry", required=True, help="the ferry binary (for `ferry stats`)")
p.add_argument("--api", required=True, help="FERRY_API of the --base agent")
p.add_argument("--data-dir", required=True, help="FERRY_DATA_DIR of the --base agent")
p.add_argument("--shots", required=True)
p.add_argument("--axe", required=True)
p.add_argument("--console-dir", help="serve the console's files from this directory instead of "
               "the agent's (to try a change to them without rebuilding ferry)")
args = p.parse_args()
setup(args.base, args.shots, args.axe)

SERIES = f"volume/{args.volume}/write_bytes_per_s"
CHART = f'svg[data-series="{SERIES}"]'


def ferry_stats(*extra):
    env = dict(os.environ, FERRY_API=args.api, FERRY_DATA_DIR=args.data_dir, FERRY_LOG="warn")
    out = subprocess.run([args.ferry, *extra], env=env, capture_output=True, text=True, timeout=60)
    check(out.returncode == 0, f"ferry {' '.join(extra)}: {out.stderr.strip()}")
    return out.stdout


def bytes_per_s(v):
    """The page's formatting of a bytes/s value (statistics.js statsValue)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    i = 0
    while abs(v) / 1024 ** i >= 1024 and i < len(units) - 1:
        i += 1
    x = v / 1024 ** i
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    s = f"{x:.{digits}f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return f"{s} {units[i]}/s"


def new_page(ctx, errors):
    page = ctx.new_page()
    # (The first GET /api/v1/session, before login, is a 401 by design.)
    page.on("console", lambda m: m.type == "error" and not m.location.get("url", "").endswith(
        "/api/v1/session") and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    if args.console_dir:
        def local(route):
            name = route.request.url.split("/console/")[1].split("?")[0]
            path = os.path.join(args.console_dir, name)
            resp = route.fetch()
            route.fulfill(response=resp, body=open(path, "rb").read())
        page.route("**/console/*", local)
    return page


def stats_requests(log):
    return [u for u in log if "/api/v1/stats" in u]


with sync_playwright() as pw:
    browser = launch(pw)

    # --- the admin: scopes, the node's charts, the volume's ---
    ctx = context(browser)
    errors = []
    page = new_page(ctx, errors)
    requests = []
    page.on("request", lambda r: requests.append((time.time(), r.url)))
    login(page, args.admin)
    page.click("nav a[data-view=statistics]")
    page.wait_for_selector("#stats-scope")
    page.wait_for_selector("#charts[aria-busy=false] svg.chart")
    scopes = page.eval_on_selector_all("#stats-scope option", "os => os.map(o => o.value)")
    for want in [f"node/{args.node}", f"workload/{args.workload}", f"volume/{args.volume}"]:
        check(want in scopes, f"the scope list offers {want}: {scopes}")
    check(page.input_value("#stats-scope") == f"node/{args.node}", "the node is the first scope shown")
    titles = page.eval_on_selector_all(".chartcard h2", "hs => hs.map(h => h.firstChild.textContent.trim())")
    check(titles == ["Write rate", "Link rate", "Backlog", "Write IOPS"], f"the node's charts: {titles}")
    shot(page, "statistics-node")
    axe(page, "statistics-node")

    # The scope chosen with the keyboard: the select focused, arrow keys.
    page.focus("#stats-scope")
    for _ in range(len(scopes)):
        if page.input_value("#stats-scope") == f"volume/{args.volume}":
            break
        page.keyboard.press("ArrowDown")
    check(page.input_value("#stats-scope") == f"volume/{args.volume}", "the volume chosen with the arrow keys")
    page.wait_for_selector(CHART)
    page.wait_for_selector("#charts[aria-busy=false]")
    titles = page.eval_on_selector_all(".chartcard h2", "hs => hs.map(h => h.firstChild.textContent.trim())")
    for want in ["Write rate", "Link rate", "Backlog", "Write IOPS", "Write latency p99", "Resync progress"]:
        check(want in titles, f"the volume has a {want} chart: {titles}")
    d = page.get_attribute(CHART + " path.mean", "d") or ""
    n_pts = d.count(",")
    check(n_pts >= 3, f"the write rate's mean line has points ({n_pts}): {d[:120]}")
    check(page.query_selector(CHART + " path.band") is not None, "and a min–max band")
    label = page.get_attribute(CHART, "aria-label")
    check(page.get_attribute(CHART, "role") == "img" and "latest" in label and "max" in label,
          f"the chart has an accessible name with latest/min/max: {label}")

    # The summary equals `ferry stats --json` over the same range.
    cli = json.loads(ferry_stats("--json", "stats", SERIES, "--since", "1h", "--step", "10"))
    cli_max = max(p["max"] for p in cli["points"])
    page_max = float(page.get_attribute(CHART, "data-max"))
    check(cli_max > 0 and math.isclose(page_max, cli_max, rel_tol=1e-12),
          f"the chart's max {page_max} is `ferry stats`'s {cli_max}")
    summary = page.inner_text(f"#d-{SERIES.replace('/', '_')}")
    check(f"max {bytes_per_s(cli_max)}" in summary and f"max {bytes_per_s(cli_max)}" in label,
          f"the summary and the chart's name say max {bytes_per_s(cli_max)}: {summary}")
    iops = page.get_attribute(f'svg[data-series="volume/{args.volume}/write_iops"]', "data-max")
    check(iops is not None and float(iops) > 0, f"the volume's IOPS chart has writes: max {iops}")

    # The CSV download is `ferry stats --csv` of the same range and step:
    # every closed point (its 10 s over) equal, byte for byte.
    # (Asked from the keyboard: the button focused, Enter.)
    page.focus(f"#csv-{SERIES.replace('/', '_')}")
    with page.expect_download() as dl:
        page.keyboard.press("Enter")
    at = time.time()
    csv = open(dl.value.path(), encoding="utf-8").read()
    cli_csv = ferry_stats("stats", SERIES, "--since", "1h", "--step", "10", "--csv")
    check(dl.value.suggested_filename.endswith(".csv"), f"a .csv file: {dl.value.suggested_filename}")
    lines, cli_lines = csv.splitlines(), cli_csv.splitlines()
    check(lines[0] == cli_lines[0] == "t,mean,min,max,count", f"the CLI's columns: {lines[0]}")

    def closed(ls):
        return [ln for ln in ls[1:] if int(ln.split(",")[0]) + 10 < at - 1]
    check(closed(lines) == closed(cli_lines) and len(closed(lines)) >= 3,
          f"the download's {len(closed(lines))} closed rows equal `ferry stats --csv`'s "
          f"({len(closed(cli_lines))})\n{csv}\n---\n{cli_csv}")
    check(sum(1 for ln in closed(lines) if float(ln.split(",")[3]) > 0) >= 3,
          "at least 3 of them with writes")

    # The text alternative: the data table opened from the keyboard.
    summ = f"#table-{SERIES.replace('/', '_')} summary"
    page.focus(summ)
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#table-{SERIES.replace('/', '_')} table tbody tr")
    rows = page.eval_on_selector_all(f"#table-{SERIES.replace('/', '_')} tbody tr", "rs => rs.length")
    check(rows == int(page.get_attribute(CHART, "data-points")), f"the data table has a row per point ({rows})")
    page.focus(summ)
    page.keyboard.press("Enter")

    # The range from the keyboard: from the checked radio, arrows move it;
    # each choice asks the store for its own range and step.
    page.focus("#range-1h")
    before = len(requests)
    page.keyboard.press("ArrowLeft")
    page.wait_for_selector("#range-15m:checked")
    page.wait_for_function("() => document.querySelector('#charts').getAttribute('aria-busy') === 'false'")
    asked = stats_requests([u for _, u in requests[before:]])
    check(any("since=900&step=10" in u for u in asked), f"15 min asks since=900&step=10: {asked}")
    check(page.evaluate("document.activeElement.id") == "range-15m", "the focus stays on the range")
    page.wait_for_selector(CHART + " path.mean")
    # The pointer over the highest point: the readout names its values.
    d = page.get_attribute(CHART + " path.band", "d")
    peak = min((tuple(map(float, xy.split(","))) for xy in
                d.replace("M", " ").replace("L", " ").replace("Z", " ").split()), key=lambda q: q[1])
    box = page.query_selector(CHART).bounding_box()
    page.mouse.move(box["x"] + peak[0] * box["width"] / 600, box["y"] + peak[1] * box["height"] / 230)
    page.wait_for_selector(CHART + " text.readout[visibility=visible]")
    readout = page.text_content(CHART + " text.readout")
    check(f"– {bytes_per_s(cli_max)}" in readout, f"the pointer's readout shows the peak {bytes_per_s(cli_max)}: {readout}")
    shot(page, "statistics-volume")
    axe(page, "statistics-volume")
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_selector("#range-24h:checked")
    page.wait_for_function("() => document.querySelector('#charts').getAttribute('aria-busy') === 'false'")
    asked = stats_requests([u for _, u in requests[before:]])
    check(any("since=86400&step=300" in u for u in asked), f"24 h asks since=86400&step=300: {asked}")
    page.wait_for_selector(CHART)
    check(page.inner_text("#stats-cli").find("--since 24h --step 300") >= 0,
          "the CLI line names the same range and step")
    shot(page, "statistics-range-24h")
    axe(page, "statistics-range-24h")

    # Refreshed while open (every 10 s, never faster than once a second) …
    page.wait_for_timeout(500)
    t0 = time.time()
    mark = len(requests)
    page.wait_for_timeout(21000)
    lists = [t for t, u in requests[mark:] if u.endswith("/api/v1/stats/series")]
    check(len(lists) in (2, 3), f"refreshed every 10 s: {len(lists)} in 21 s, at {[round(t - t0, 1) for t in lists]}")
    gaps = [b - a for a, b in zip(lists, lists[1:])]
    check(all(g >= 9 for g in gaps), f"never faster than once a second (every 10 s): {gaps}")
    # … and not at all once the view is left (for the Cluster view: the
    # Overview asks for the node's latest rates itself).
    page.click("nav a[data-view=cluster]")
    page.wait_for_selector("h1:has-text('Cluster')")
    mark = len(requests)
    page.wait_for_timeout(11000)
    after = stats_requests([u for _, u in requests[mark:]])
    check(after == [], f"no statistics request once the view is left: {after}")
    check(errors == [], f"no script or CSP error in the console: {errors}")
    ctx.close()

    # --- a viewer sees the statistics, and no state-changing control ---
    ctx = context(browser)
    errors = []
    page = new_page(ctx, errors)
    login(page, args.viewer)
    page.goto(args.base + "/#statistics")
    page.wait_for_selector("#stats-scope")
    page.select_option("#stats-scope", f"workload/{args.workload}")
    page.wait_for_selector(f'svg[data-series="workload/{args.workload}/write_bytes_per_s"]')
    titles = page.eval_on_selector_all(".chartcard h2", "hs => hs.map(h => h.firstChild.textContent.trim())")
    check(titles[:3] == ["Write rate", "Link rate", "Backlog"] and "Write IOPS" in titles,
          f"the workload's charts: {titles}")
    shot(page, "statistics-workload")
    axe(page, "statistics-workload")
    page.select_option("#stats-scope", f"volume/{args.volume}")
    page.wait_for_selector(CHART + " path.mean")
    buttons = set(visible_buttons(page))
    check(buttons <= {"Log out", "Download CSV"}, f"a viewer sees no state-changing button: {buttons}")
    check(errors == [], f"no script error for the viewer: {errors}")
    ctx.close()

    # --- a node with history off: the empty state says why ---
    setup(args.base_off, args.shots, args.axe)
    ctx = context(browser)
    errors = []
    page = new_page(ctx, errors)
    login(page, args.admin_off)
    page.goto(args.base_off + "/#statistics")
    page.wait_for_selector("#stats-empty")
    text = page.inner_text("#stats-empty")
    check("history.enabled = false" in text, f"the empty state says why: {text}")
    shot(page, "statistics-empty")
    axe(page, "statistics-empty")
    ctx.close()
    browser.close()

print("statistics: all checks passed")
