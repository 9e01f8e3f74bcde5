#!/usr/bin/env python3
"""The console's Migrate view in real headless Chromium (run by
tests/console.rs, `a_migration_is_started_watched_and_cut_over_from_the_console`,
while a writer keeps writing to the workload's volume): an operator starts
the migration from the form (rate-limited), watches the progress bar move
over SSE without a reload, lifts the limit live, sees `ready`, cuts over
from the page (confirmation dialog), reads the downtime in the cutover
report, and opens the printable report (downtime, who started and who cut
over). A viewer sees no state-changing control. Exits non-zero on the first
failed check; prints each screenshot's path."""

import argparse
import os
import re
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ferry_console import (CSP, NO_VERIFY, axe, check, context, http, launch, login,  # noqa: E402
                           setup, shot, visible_buttons)

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--operator", required=True)
p.add_argument("--viewer", required=True)
p.add_argument("--workload", required=True)
p.add_argument("--target", required=True)
p.add_argument("--rate-mib", required=True, help="the copy rate limit the form starts with (MiB/s)")
p.add_argument("--shots", required=True)
p.add_argument("--axe", required=True)
args = p.parse_args()
setup(args.base, args.shots, args.axe)
W = args.workload
OPERATOR = args.operator.rsplit(".", 1)[0]


def progress(page):
    return page.eval_on_selector(f"#progress-{W}", "e => Number(e.value)")


def get(path, token=None, cookie=None):
    """GET with its headers: (status, headers, body)."""
    req = urllib.request.Request(args.base + path)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if cookie:
        req.add_header("Cookie", "ferry_session=" + cookie)
    try:
        with urllib.request.urlopen(req, context=NO_VERIFY, timeout=30) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def viewer_sees_no_control(browser, state):
    ctx = context(browser)
    page = ctx.new_page()
    login(page, args.viewer)
    page.goto(args.base + "/#migrate")
    page.wait_for_selector(f"#migration-{W}")
    b = [x for x in visible_buttons(page) if x != "Log out"]
    check(b == [], f"a viewer's Migrate view ({state}) has no state-changing button: {b}")
    inputs = page.query_selector_all("#view input, #view select, #view form")
    check(inputs == [], f"a viewer's Migrate view ({state}) has no form: {len(inputs)} fields")
    check(page.query_selector("#start-form") is None, "no start form for a viewer")
    res = page.evaluate("""async (w) => {
        const s = await (await fetch('/api/v1/session')).json();
        const h = {'Content-Type': 'application/json', 'X-Ferry-CSRF': s.csrf};
        const a = await fetch('/api/v1/migrations/' + w + '/cutover', {method: 'POST', headers: h, body: '{}'});
        const b = await fetch('/api/v1/migrations/' + w, {method: 'PATCH', headers: h, body: '{"max_rate_bytes_per_s": 1}'});
        return [a.status, b.status];
    }""", W)
    check(res == [403, 403], f"a viewer's cutover and rate change get 403: {res}")
    shot(page, f"migrate-viewer-{state}")
    axe(page, f"migrate-viewer-{state}")
    ctx.close()


with sync_playwright() as pw:
    browser = launch(pw)
    ctx = context(browser)
    page = ctx.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    login(page, args.operator)
    page.goto(args.base + "/#migrate")
    page.wait_for_selector("h1:has-text('Migrate')")
    page.wait_for_selector(f"#mig-workload option[value='{W}']", state="attached")
    check(page.query_selector(f"#mig-to option[value='{args.target}']") is not None, "the target node is offered")
    modes = page.eval_on_selector_all("#mig-mode option", "os => os.map(o => o.value)")
    check(modes == ["sync", "async"], f"both modes are offered: {modes}")
    check(page.query_selector(f"#migration-{W}") is None, "no migration yet")
    shot(page, "migrate-start-form")
    axe(page, "migrate-start-form")

    # --- start it, from the keyboard ---
    page.select_option("#mig-workload", W)
    page.select_option("#mig-to", args.target)
    page.select_option("#mig-mode", "sync")
    page.fill("#mig-rate", args.rate_mib)
    navigations = []
    page.on("framenavigated", lambda f: navigations.append(f.url))
    page.focus("#start-migration")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#result-start:has-text('Started: {W}')", timeout=30000)
    page.wait_for_selector(f"#migration-{W}")
    phase = page.inner_text(f"#phase-{W}")
    check(phase in ("seeding", "syncing"), f"the migration starts seeding or syncing: {phase}")
    limit = page.inner_text(f"#limit-{W}")
    check(limit.startswith(args.rate_mib), f"the rate limit of the form is applied: {limit}")
    v0 = progress(page)
    check(0 <= v0 < 100, f"the progress bar starts below 100: {v0}")
    check(page.get_attribute(f"#progress-{W}", "aria-label") is not None, "the progress bar is labelled")
    text = page.inner_text(f"#progress-text-{W}")
    check(" left" in text and ("ETA" in text or "no ETA" in text), f"bytes left and ETA are shown: {text}")
    # It moves over SSE, without a reload.
    page.wait_for_function(f"v => Number(document.getElementById('progress-{W}').value) > v", arg=v0, timeout=30000)
    v1 = progress(page)
    check(v1 < 100, f"still copying at the limit: {v1}%")
    rates = page.inner_text(f"#rates-{W}")
    check(re.search(r"writes .*/s vs link .*/s", rates) is not None, f"write vs link rate shown: {rates}")
    shot(page, "migrate-syncing")
    axe(page, "migrate-syncing")

    # --- the rate limit lifted live (SetMigration) ---
    page.fill(f"#rate-{W}", "0")
    page.press(f"#rate-{W}", "Enter")
    page.wait_for_selector(f"#result-{W}:has-text('unlimited')", timeout=30000)
    page.wait_for_selector(f"#phase-{W}:has-text('ready')", timeout=120000)
    check(progress(page) == 100, "the bar is full once ready")
    check(navigations == [], f"progress and ready came without a reload: {navigations}")
    page.wait_for_selector(f"#cutover-{W}")
    shot(page, "migrate-ready")
    axe(page, "migrate-ready")
    viewer_sees_no_control(browser, "ready")

    # --- a test cutover: started and ended from the page ---
    page.click(f"#test-start-{W}")
    page.wait_for_selector(f"#result-{W}:has-text('Test instance on {args.target}: its check passed')", timeout=60000)
    page.wait_for_selector(f"#migration-{W} .test-report")
    check(page.query_selector(f"#cutover-{W}") is None, "no cutover is offered while a test runs")
    shot(page, "migrate-test")
    axe(page, "migrate-test")
    page.click(f"#test-end-{W}")
    page.wait_for_selector(f"#result-{W}:has-text('Test ended on {args.target}')", timeout=60000)
    page.wait_for_selector(f"#migration-{W} .test-report", state="detached")

    # --- a scheduled cutover (tomorrow), then cancelled ---
    page.click(f"#schedule-summary-{W}")
    tomorrow = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    page.fill(f"#at-{W}", tomorrow)
    page.press(f"#at-{W}", "Enter")
    page.wait_for_selector(f"#result-{W}:has-text('Cutover scheduled')", timeout=30000)
    page.wait_for_selector(f"#schedule-cancel-{W}")
    check(tomorrow in page.inner_text(f"#migration-{W} dl"), f"the schedule shows its time ({tomorrow})")
    shot(page, "migrate-scheduled")
    axe(page, "migrate-scheduled")
    page.click(f"#schedule-cancel-{W}")
    page.wait_for_selector(f"#result-{W}:has-text('Scheduled cutover cancelled')", timeout=30000)
    page.wait_for_selector(f"#schedule-cancel-{W}", state="detached")
    page.wait_for_selector(f"#phase-{W}:has-text('ready')", timeout=120000)
    page.wait_for_selector(f"#cutover-{W}")

    # --- the cutover from the page, confirmed in a dialog ---
    page.focus(f"#cutover-{W}")
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog[open]")
    check(page.evaluate("document.activeElement.id") == "confirm-cancel", "the confirmation focuses Cancel")
    check(args.target in page.inner_text("#confirm-text"), "the dialog says where it goes")
    shot(page, "migrate-confirm")
    page.click("#confirm-ok")
    page.wait_for_selector(f"#cutover-report-{W}", timeout=120000)
    page.wait_for_selector(f"#phase-{W}:has-text('completed')", timeout=30000)
    downtime = page.inner_text(f"#downtime-{W}")
    m = re.fullmatch(r"(\d+\.\d) ms", downtime)
    check(m is not None and float(m.group(1)) > 0, f"the downtime is shown: {downtime}")
    print(f"downtime on the page: {downtime}")
    # The event stream may show the report before the cutover's own reply
    # reaches the page: wait for the reply's line.
    page.wait_for_selector(f"#result-{W}:has-text('Cut over to')", timeout=30000)
    check(page.inner_text(f"#result-{W}").startswith("Cut over to " + args.target), "the result says where it went")
    steps = page.eval_on_selector_all(f"#cutover-report-{W} table.steps td:first-child", "t => t.map(e => e.textContent)")
    check("frozen" in " ".join(steps) or len(steps) >= 3, f"the cutover's steps are listed: {steps}")
    check(page.query_selector(f"#cutover-{W}") is None, "no second cutover is offered")
    check(page.query_selector(f"#finalize-{W}") is not None and page.query_selector(f"#rollback-{W}") is not None,
          "rollback and finalize are offered after the cutover")
    shot(page, "migrate-cutover-report")
    axe(page, "migrate-cutover-report")

    # --- the printable report, at its URL (the session cookie) ---
    with ctx.expect_page() as new:
        page.click(f"#report-link-{W}")
    rp = new.value
    rp.wait_for_load_state()
    check(rp.url.endswith(f"/api/v1/migrations/{W}/report?format=html"), f"the report's URL: {rp.url}")
    body = rp.inner_text("body")
    m = re.search(r"Downtime\s+(\d+(\.\d+)?) ms", body)
    check(m is not None and float(m.group(1)) > 0, f"the report shows the downtime: {body[:400]}")
    who = f"token {OPERATOR} (operator)"
    check(re.search(r"Started by\s+" + re.escape(who), body) is not None, f"the report says who started it ({who})")
    check(re.search(r"Cut over by\s+" + re.escape(who), body) is not None, f"the report says who cut over ({who})")
    check(rp.eval_on_selector("link[rel=stylesheet]", "l => l.sheet !== null && l.sheet.cssRules.length > 0"),
          "print.css loads under the CSP")
    shot(rp, "report-html")
    axe(rp, "report-html")
    sid = {c["name"]: c for c in ctx.cookies()}["ferry_session"]["value"]
    st, h, html = get(f"/api/v1/migrations/{W}/report?format=html", cookie=sid)
    check(st == 200 and h.get("content-type", "").startswith("text/html"), f"text/html with the cookie: {st}")
    check(h.get("content-security-policy") == CSP and h.get("x-frame-options") == "DENY",
          "the report carries the console's CSP")
    st, h, _ = get(f"/api/v1/migrations/{W}/report?format=html", token=args.viewer)
    check(st == 200, f"a viewer's token reads it: {st}")
    st, _, _ = get(f"/api/v1/migrations/{W}/report?format=html")
    check(st == 401, f"without a token or a session: {st}")
    st, _, body = get(f"/api/v1/migrations/{W}/report?format=pdf", token=args.viewer)
    check(st == 400 and "format" in body, f"an unknown format is refused: {st} {body}")
    st, h, body = get(f"/api/v1/migrations/{W}/report", token=args.viewer)
    check(st == 200 and h.get("content-type", "").startswith("application/json") and '"downtime_ms"' in body,
          "without format: the JSON report")
    check(not [e for e in errors if "Content Security Policy" in e], f"no CSP violation: {errors}")
    viewer_sees_no_control(browser, "completed")
    ctx.close()
    browser.close()
print("migrate console: all checks passed")
