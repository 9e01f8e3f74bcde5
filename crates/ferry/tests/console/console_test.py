#!/usr/bin/env python3
"""Drives ferry's web console in real headless Chromium (Debian's package,
through Playwright's Python client: no browser download). Run by
tests/console.rs with two agents under HA; exits non-zero on the first
failed check. Prints each screenshot's path ("screenshot: PATH")."""

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ferry_console import (CSP, NO_VERIFY, axe, check, http, login, setup, shot,  # noqa: E402
                           visible_buttons)

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--admin", required=True)
p.add_argument("--viewer", required=True)
p.add_argument("--doomed", required=True, help="an operator token this script revokes")
p.add_argument("--nodes", required=True, help="comma-separated node names the overview shows")
p.add_argument("--workload", required=True)
p.add_argument("--switch-to", required=True)
p.add_argument("--shots", required=True)
p.add_argument("--axe", required=True, help="axe.min.js from npm's axe-core")
p.add_argument("--kill-pid", type=int, help="only the failover check: this agent (serving the "
               "workload) is killed and the open Cluster view must show the failover without a reload")
p.add_argument("--failover-to", help="the node that takes over")
args = p.parse_args()

setup(args.base, args.shots, args.axe)


def failover(browser):
    """Kills the serving node's agent with the Cluster view open: the page
    shows the failover (SSE), without a reload."""
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    login(page, args.admin)
    page.goto(args.base + "/#cluster")
    page.wait_for_selector(f"#serving-{args.workload}:text-is('{args.switch_to}')")
    navigations = []
    page.on("framenavigated", lambda f: navigations.append(f.url))
    os.kill(args.kill_pid, signal.SIGKILL)
    t0 = time.time()
    page.wait_for_selector(f"#serving-{args.workload}:text-is('{args.failover_to}')", timeout=30000)
    page.wait_for_selector("dd:has-text('detected after')", timeout=10000)
    print(f"the page showed the failover {time.time() - t0:.1f} s after the kill")
    check(navigations == [], f"without a reload: {navigations}")
    text = page.inner_text("article")
    check("failover" in text and " ms" in text, f"detection and failover times shown: {text}")
    b = page.query_selector(f"#switchover-{args.workload}")
    check(b is not None and b.is_disabled() and "down" in text,
          "no switchover is offered onto a node that is down, and the page says why")
    shot(page, "cluster-after-failover")
    axe(page, "cluster-after-failover")
    ctx.close()


with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])

    def context():
        return browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})

    if args.kill_pid:
        failover(browser)
        browser.close()
        print("console: failover checks passed")
        sys.exit(0)

    # --- the admin: headers, login, overview, cluster, switchover, logout ---
    ctx = context()
    page = ctx.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    r = page.goto(args.base + "/")
    h = r.headers
    check(h.get("content-security-policy") == CSP, "the page carries the CSP")
    check(h.get("x-frame-options") == "DENY", "X-Frame-Options: DENY")
    check(h.get("x-content-type-options") == "nosniff", "X-Content-Type-Options: nosniff")
    check(h.get("referrer-policy") == "no-referrer", "Referrer-Policy: no-referrer")
    js = http("GET", "/console/app.js")
    check(js[0] == 200 and "EventSource" in js[1], "the script is served without a token")
    page.wait_for_selector("#login:not([hidden])")
    check(page.evaluate("document.activeElement.id") == "token", "the login page focuses the token field")
    shot(page, "login")
    axe(page, "login")
    req = urllib.request.Request(args.base + "/api/v1/session", method="POST",
                                 data=('{"token":"' + args.admin + '"}').encode())
    req.add_header("Content-Type", "text/plain")  # what a cross-site form can send
    try:
        urllib.request.urlopen(req, context=NO_VERIFY, timeout=30)
        st = 200
    except urllib.error.HTTPError as e:
        st = e.code
    check(st == 415, f"a login that is not JSON (a cross-site form) is refused: {st}")
    page.fill("#token", "nobody.0000")
    page.press("#token", "Enter")
    page.wait_for_selector("#login-error:has-text('not valid')")
    login(page, args.admin)
    cookies = {c["name"]: c for c in ctx.cookies()}
    c = cookies.get("ferry_session")
    check(c is not None, "the login set ferry_session")
    check(c["httpOnly"] and c["secure"] and c["sameSite"] == "Strict",
          f"the cookie is HttpOnly, Secure, SameSite=Strict: {c}")
    check(c["expires"] > time.time() + 60, "the cookie has an expiry")
    check(page.evaluate("document.cookie").find("ferry_session") < 0, "no script can read the cookie")
    for n in args.nodes.split(","):
        page.wait_for_selector(f".card:has(h2:has-text('Nodes')) td:text-is('{n}'), "
                               f".card:has(h2:has-text('Nodes')) td:has-text('{n} (this node)')")
    page.wait_for_selector(f".card:has(h2:has-text('Workloads')) td:text-is('{args.workload}')")
    # The peer's version (from this node's probe) and the witness's state.
    version = json.loads(http("GET", "/api/v1/node", token=args.admin)[1])["version"]
    for n in args.nodes.split(",")[1:]:
        page.wait_for_selector(f".card:has(h2:has-text('Nodes')) tr:has(td:text-is('{n}')) "
                               f"td:text-is('{version}')", timeout=20000)
    page.wait_for_selector(".card:has(h2:has-text('Nodes')) tr:has(td:has-text('witness')) .badge:text-is('up')",
                           timeout=20000)
    page.wait_for_selector("#live:has-text('live')")  # an SSE snapshot arrived
    check("Overview" in page.title(), "the overview is titled")
    lines = page.eval_on_selector_all(".events li", "els => els.map(e => e.textContent)")
    check(len(lines) == len(set(lines)), f"each event is listed once: {lines}")
    check(page.query_selector(".card:has(h2:has-text('Workloads')) .badge:has-text('up-to-date')") is not None,
          "the workload's replica shows its state badge")
    shot(page, "overview")
    axe(page, "overview")
    # The keyboard: Tab from the top reaches the skip link, then the views.
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("Tab")
    check(page.evaluate("document.activeElement.className") == "skip", "Tab reaches the skip link first")
    page.keyboard.press("Tab")
    check(page.evaluate("document.activeElement.dataset.view") == "overview", "then the Overview link")
    for _ in range(3):
        page.keyboard.press("Tab")
    check(page.evaluate("document.activeElement.dataset.view") == "cluster", "then Migrate, Estimate, Cluster")
    page.keyboard.press("Enter")
    page.wait_for_selector("h1:has-text('Cluster')")
    btn = page.wait_for_selector(f"button:has-text('Switch over to {args.switch_to}')")
    check(page.query_selector("button:has-text('Put')") is not None, "an operator sees standby")
    shot(page, "cluster")
    axe(page, "cluster")
    # (Focused through its selector: an event-stream update may have drawn
    # the view again since.)
    page.focus(f"#switchover-{args.workload}")
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog[open]")
    check(page.evaluate("document.activeElement.id") == "confirm-cancel", "the confirmation focuses Cancel")
    shot(page, "cluster-confirm")
    page.click("#confirm-ok")
    page.wait_for_selector(f".result:has-text('Switched over to {args.switch_to}')", timeout=60000)
    page.wait_for_selector(f"#serving-{args.workload}:text-is('{args.switch_to}')", timeout=20000)
    shot(page, "cluster-after-switchover")
    # Now the peer serves: this node's console still offers the switchover
    # (back to this node), asked of the serving node; then once more away.
    here = args.nodes.split(",")[0]
    for to in (here, args.switch_to):
        btn = page.wait_for_selector(f"#switchover-{args.workload}:has-text('Switch over to {to}'):not([disabled])",
                                     timeout=30000)
        btn.click()
        page.wait_for_selector("dialog[open]")
        if to == here:
            check(f"asked of {args.switch_to}" in page.inner_text("#confirm-text"),
                  "the confirmation says the serving peer is asked")
        page.click("#confirm-ok")
        page.wait_for_selector(f".result:has-text('Switched over to {to}')", timeout=60000)
        page.wait_for_selector(f"#serving-{args.workload}:text-is('{to}')", timeout=20000)
        if to == here:
            shot(page, "cluster-after-forwarded-switchover")
    # Logout ends the session: its cookie no longer works.
    sid = c["value"]
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    st, _ = http("GET", "/api/v1/session", headers={"Cookie": "ferry_session=" + sid})
    check(st == 401, f"after logout the old cookie gets 401 (got {st})")
    check(not [e for e in errors if "Content Security Policy" in e], f"no CSP violation on the page: {errors}")
    ctx.close()

    # --- a viewer: no state-changing button, and its POSTs get 403 ---
    ctx = context()
    page = ctx.new_page()
    login(page, args.viewer)
    check(visible_buttons(page) == ["Log out"] or visible_buttons(page) == [],
          f"a viewer's overview has no state-changing button: {visible_buttons(page)}")
    page.goto(args.base + "/#cluster")
    page.wait_for_selector("h1:has-text('Cluster')")
    page.wait_for_selector(f"h2:has-text('{args.workload}')")
    b = [x for x in visible_buttons(page) if x != "Log out"]
    check(b == [], f"a viewer's cluster view has no state-changing button: {b}")
    shot(page, "cluster-viewer")
    axe(page, "cluster-viewer")
    res = page.evaluate("""async (w) => {
        const s = await (await fetch('/api/v1/session')).json();
        const h = {'Content-Type': 'application/json', 'X-Ferry-CSRF': s.csrf};
        const a = await fetch('/api/v1/cluster/workloads/' + w + '/switchover', {method: 'POST', headers: h, body: '{}'});
        const b = await fetch('/api/v1/cluster/standby', {method: 'POST', headers: h, body: JSON.stringify({node: 'a', standby: true})});
        const c = await fetch('/api/v1/volumes', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{"name":"x","size_bytes":4096}'});
        return [a.status, b.status, c.status];
    }""", args.workload)
    check(res == [403, 403, 403], f"a viewer's direct POSTs get 403 (with and without CSRF): {res}")
    ctx.close()

    # --- revoking a token ends its session and its event streams at once ---
    ctx = context()
    page = ctx.new_page()
    login(page, args.doomed)
    page.wait_for_selector("#live:has-text('live')")
    sid = {c["name"]: c for c in ctx.cookies()}["ferry_session"]["value"]
    # A CSRF-less POST with the cookie is refused, whatever the role.
    st, body = http("POST", "/api/v1/cluster/standby", body={"node": "a", "standby": True},
                    headers={"Cookie": "ferry_session=" + sid})
    check(st == 403 and "X-Ferry-CSRF" in body, f"a cookie POST without the CSRF header gets 403: {st} {body}")
    # A Bearer stream of the same token, as `ferry events --follow` opens it.
    got = []
    name = args.doomed.rsplit(".", 1)[0]

    def follow():
        req = urllib.request.Request(args.base + "/api/v1/events")
        req.add_header("Authorization", "Bearer " + args.doomed)
        with urllib.request.urlopen(req, context=NO_VERIFY, timeout=30) as r:
            for line in r:
                got.append(line.decode().strip())
        got.append("<closed>")

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    deadline = time.time() + 10
    while not any(l == "event: cluster" for l in got) and time.time() < deadline:
        time.sleep(0.05)
    check(any(l == "event: cluster" for l in got), "the Bearer stream sends a cluster snapshot")
    t0 = time.time()
    st, body = http("DELETE", "/api/v1/tokens/" + name, token=args.admin)
    check(st == 200, f"token {name} revoked: {st} {body}")
    page.wait_for_selector("#login-error:has-text('session ended')", timeout=5000)
    t.join(5)
    ended = time.time() - t0
    check("event: end" in got and got[-1] == "<closed>", f"the Bearer stream ended: {got[-4:]}")
    check(ended < 3, f"both ended at once ({ended:.2f} s)")
    st, _ = http("GET", "/api/v1/session", headers={"Cookie": "ferry_session=" + sid})
    check(st == 401, f"the revoked token's session cookie gets 401 (got {st})")
    shot(page, "session-ended")
    ctx.close()

    browser.close()
print("console: all checks passed")
