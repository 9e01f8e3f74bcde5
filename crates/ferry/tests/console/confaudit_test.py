#!/usr/bin/env python3
"""The console's Configure and Audit views in real headless Chromium (run
by tests/console.rs: two agents under HA with a witness). As an admin:
create a token (its secret shown once, and it works), revoke one with the
confirmation, change a workload's start hook and time limit; then the
Audit view shows each of those with the token's name, and the login; the
filters narrow the list; the verification says the chain verifies. A
viewer sees no state-changing control on Configure and its direct POSTs
get 403. With --tampered (after the test changed a byte of the log on
disk): the Audit view's "Verify now" shows the failed verification.
Exits non-zero on the first failed check; prints each screenshot's path."""

import argparse
import os
import sys
import time

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ferry_console import (axe, check, context, http, launch, login, setup, shot,  # noqa: E402
                           visible_buttons)

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--admin", required=True, help="an admin token named --admin-name")
p.add_argument("--admin-name", required=True)
p.add_argument("--viewer", required=True)
p.add_argument("--doomed-name", required=True, help="a token this script revokes")
p.add_argument("--doomed", required=True, help="its secret")
p.add_argument("--workload", required=True)
p.add_argument("--peer", required=True, help="the paired node's name")
p.add_argument("--shots", required=True)
p.add_argument("--axe", required=True)
p.add_argument("--tampered", action="store_true")
p.add_argument("--rewritten", action="store_true", help="log in, open the Audit view, create --ready, wait "
               "for --go (the test rewrites the chain consistently meanwhile), then verify from the page")
p.add_argument("--ready")
p.add_argument("--go")
args = p.parse_args()
setup(args.base, args.shots, args.axe)

NEW_TOKEN = "carol"
HOOK = "/bin/true set-from-console"


def goto(page, view, heading):
    page.click(f"nav a[data-view='{view}']")
    page.wait_for_selector(f"h1:text-is('{heading}')")


def tampered(browser):
    ctx = context(browser)
    page = ctx.new_page()
    login(page, args.admin)
    goto(page, "audit", "Audit")
    page.wait_for_selector("#audit-verdict", timeout=30000)
    page.focus("#verify-now")
    page.keyboard.press("Enter")
    page.wait_for_selector("#audit-verdict.bad", timeout=30000)
    text = page.inner_text("#audit-verdict")
    check("failed" in text and "First bad record" in text, f"the Audit view shows the failed verification: {text}")
    marked = page.inner_text("#audit-table tr.audit-bad-record")
    check("first bad record" in marked, f"the list marks the changed record: {marked}")
    shot(page, "audit-tampered")
    axe(page, "audit-tampered")
    ctx.close()


def rewritten(browser):
    ctx = context(browser)
    page = ctx.new_page()
    login(page, args.admin)
    goto(page, "audit", "Audit")
    page.wait_for_selector("#audit-verdict", timeout=30000)
    open(args.ready, "w").close()
    for _ in range(600):
        if os.path.exists(args.go):
            break
        time.sleep(0.1)
    check(os.path.exists(args.go), "the test rewrote the chain")
    page.focus("#verify-now")
    page.keyboard.press("Enter")
    page.wait_for_selector("#audit-verdict.bad", timeout=30000)
    text = page.inner_text("#audit-verdict")
    check("rewritten" in text, f"the Audit view says the chain was rewritten: {text}")
    page.wait_for_selector(".audit-holders :text('differs from record')", timeout=10000)
    holders = page.inner_text(".audit-holders")
    check(holders.count("differs from record") == 2, f"the heads the peer and the witness hold differ: {holders}")
    shot(page, "audit-rewritten")
    axe(page, "audit-rewritten")
    ctx.close()


def admin(browser):
    ctx = context(browser)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    login(page, args.admin)
    goto(page, "configure", "Configure")
    page.wait_for_selector("#cfg-tokens")
    page.wait_for_selector(f"#cfg-w-{args.workload}")
    text = page.inner_text("main")
    check(args.peer in page.inner_text("#cfg-peers"), "the paired node is listed")
    fps = page.query_selector_all("code.fingerprint")
    check(len(fps) >= 2 and all(len(f.inner_text()) > 20 for f in fps), "this node's and the peer's fingerprints are shown")
    check(args.doomed_name in page.inner_text("#cfg-tokens"), "the tokens are listed")
    check("restart the agent" in text, "the agent's limits say where they are changed")
    # The effective config (GetConfig): [audit] head_interval_ms as this test set it.
    page.click("#cfg-t-audit summary")
    row = page.inner_text("#cfg-t-audit tr:has-text('audit.head_interval_ms')")
    check("1000" in row, f"the effective config shows [audit] head_interval_ms = 1000: {row}")
    check(http("GET", "/api/v1/config", args.viewer)[0] == 200, "a viewer may read the effective config")
    shot(page, "configure")
    axe(page, "configure")

    # Create a token, by keyboard: its secret shown once, and it works.
    page.focus("#cfg-tok-name")
    # The view is rebuilt whenever the event stream brings news (as it did
    # mid-word in a CI run): the caret must stay where the typing left it.
    page.keyboard.type(NEW_TOKEN[:2])
    page.evaluate("window.dispatchEvent(new HashChangeEvent('hashchange'))")  # reloads and rebuilds the view
    page.wait_for_timeout(700)
    page.keyboard.type(NEW_TOKEN[2:])
    typed = page.input_value("#cfg-tok-name")
    check(typed == NEW_TOKEN, f"typing across a refresh keeps the caret: {typed!r}")
    page.select_option("#cfg-tok-role", "operator")
    page.focus("#cfg-tok-create")
    page.keyboard.press("Enter")
    page.wait_for_selector("#cfg-secret-value", timeout=15000)
    secret = page.inner_text("#cfg-secret-value").strip()
    check(len(secret) > 20 and "shown this once" in page.inner_text("#cfg-secret"), "the new token's secret is shown, once")
    code, _ = http("GET", "/api/v1/node", secret)
    check(code == 200, f"the token created on the page works ({code})")
    page.wait_for_selector(f"#cfg-tokens td:text-is('{NEW_TOKEN}')")
    shot(page, "configure-token-created")
    axe(page, "configure-token-created")
    page.click("#cfg-copied")
    check(page.query_selector("#cfg-secret-value") is None, "the secret is gone once saved")

    # Revoke a token: the confirmation first (cancel keeps it), then revoke.
    page.click(f"#cfg-revoke-{args.doomed_name}")
    page.wait_for_selector("#confirm[open]")
    check("refused from now on" in page.inner_text("#confirm"), "the revocation asks first and says what it does")
    page.click("#confirm-cancel")
    check(http("GET", "/api/v1/node", args.doomed)[0] == 200, "cancelled: the token still works")
    page.click(f"#cfg-revoke-{args.doomed_name}")
    page.wait_for_selector("#confirm[open]")
    page.click("#confirm-ok")
    page.wait_for_selector(f"#result-tokens:has-text('Revoked {args.doomed_name}')", timeout=15000)
    check(http("GET", "/api/v1/node", args.doomed)[0] == 401, "the revoked token is refused")
    check(page.query_selector(f"#cfg-revoke-{args.doomed_name}") is None, "and no longer listed")

    # Change the workload's start hook and hook time limit.
    w = args.workload
    # A click whose press and release straddle a rebuild of the view (the
    # peers' probe changed, as the event stream brings every second) still
    # counts: the rebuild waits for the release.
    page.locator(f"#cfg-edit-{w}").scroll_into_view_if_needed()
    box = page.locator(f"#cfg-edit-{w}").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.evaluate("S.nodes = (S.nodes || []).map((n) => Object.assign({}, n, { since_unix_ms: (n.since_unix_ms || 0) + 1 })); render()")
    page.wait_for_timeout(200)
    page.mouse.up()
    page.wait_for_selector(f"#cfg-e-start-{w}", timeout=5000)
    check(True, "a click across a rebuild of the view opens the form")
    page.fill(f"#cfg-e-start-{w}", HOOK)
    page.fill(f"#cfg-e-hook_timeout_ms-{w}", "45000")
    page.click(f"#cfg-save-{w}")
    page.wait_for_selector("#confirm[open]")
    check("as root" in page.inner_text("#confirm"), "the confirmation says hooks run as root")
    page.click("#confirm-ok")
    page.wait_for_selector(f"#result-w-{w}:has-text('Saved on')", timeout=20000)
    saved = page.inner_text(f"#result-w-{w}")
    check(args.peer in saved, f"saved on both nodes: {saved}")
    check(HOOK in page.inner_text(f"#cfg-start-{w}"), "the page shows the new hook")

    # A refused action (an existing token's name again) is recorded too.
    page.fill("#cfg-tok-name", NEW_TOKEN)
    page.click("#cfg-tok-create")
    page.wait_for_selector("#result-tokens:has-text('Refused')", timeout=15000)

    # The Audit view: each action with the token's name, and the login.
    goto(page, "audit", "Audit")
    page.wait_for_selector("#audit-table", timeout=20000)
    page.wait_for_selector("#audit-verdict", timeout=30000)
    rows = page.query_selector_all("#audit-table tbody tr")
    texts = [r.inner_text() for r in rows]
    me = f"{args.admin_name} (admin)"

    def has(action, *words):
        return any(action in t and me in t and all(x in t for x in words) for t in texts)
    check(has("CreateSession", "console login", "ok"), "the console login is shown with the token's name")
    check(has("CreateToken", "ok"), "the token creation is shown with the token's name")
    check(has("CreateToken", "refused"), "the refused creation is shown, refused, with its reason")
    check(has("RevokeToken", args.doomed_name, "ok"), "the revocation is shown")
    check(has("PutWorkload", w, "ok"), "the workload change is shown")
    check(texts[0].split("\t")[0] >= texts[-1].split("\t")[0], "newest first")
    verdict = page.inner_text("#audit-verdict")
    check("The chain verifies" in verdict, f"the verification says the chain verifies: {verdict}")
    holders = page.inner_text(".audit-holders")
    check("peer " + args.peer in holders and "witness" in holders and holders.count("matches record") == 2,
          f"the heads the peer and the witness hold are shown, compared with this node's records: {holders}")
    shot(page, "audit")
    axe(page, "audit")

    # Filters: text narrows to the revocation; result to the refused one.
    page.focus("#audit-text")
    page.keyboard.type("RevokeToken")
    page.wait_for_function("document.querySelectorAll('#audit-table tbody tr').length < %d" % len(rows))
    narrowed = [r.inner_text() for r in page.query_selector_all("#audit-table tbody tr")]
    check(narrowed and all("RevokeToken" in t for t in narrowed), f"the text filter narrows the list: {len(narrowed)} of {len(rows)}")
    check(page.evaluate("document.activeElement.id") == "audit-text", "typing keeps the focus in the filter")
    shot(page, "audit-filtered")
    axe(page, "audit-filtered")
    page.fill("#audit-text", "")
    page.select_option("#audit-result", "refused")
    refused = [r.inner_text() for r in page.query_selector_all("#audit-table tbody tr")]
    check(refused and all("refused" in t for t in refused), f"the result filter shows only refusals: {refused}")
    page.select_option("#audit-result", "all")
    page.select_option("#audit-since", "15m")
    page.wait_for_selector("#audit-table")
    check("Showing" in page.inner_text("#audit-count"), "the time range reloads the list")
    check(not errors, f"no script errors: {errors}")
    ctx.close()


def viewer(browser):
    ctx = context(browser)
    page = ctx.new_page()
    login(page, args.viewer)
    goto(page, "configure", "Configure")
    page.wait_for_selector(f"#cfg-w-{args.workload}")
    check(visible_buttons(page) == [], f"a viewer sees no button on Configure: {visible_buttons(page)}")
    check(page.query_selector("#view input, #view select, #view form") is None, "and no form")
    check("needs an admin token" in page.inner_text("#cfg-tokens-note"), "the tokens card says why")
    shot(page, "configure-viewer")
    axe(page, "configure-viewer")
    # Its direct requests, with its session (as the page would send them) and its token.
    csrf = page.evaluate("S.session.csrf")
    for method, path, body in [("POST", "/api/v1/tokens", {"name": "mallory", "role": "admin"}),
                               ("DELETE", f"/api/v1/tokens/{args.admin_name}", None),
                               ("PUT", f"/api/v1/workloads/{args.workload}", {"name": args.workload, "volumes": ["vol"]}),
                               ("POST", "/api/v1/nodes", {"name": "x", "api": "198.18.0.9:7360", "token": "t", "fingerprint": "f"})]:
        status = page.evaluate("""async ([m, p, b, c]) => (await fetch(p, {method: m, credentials: 'same-origin',
            headers: {'Content-Type': 'application/json', 'X-Ferry-CSRF': c},
            body: b === null ? undefined : JSON.stringify(b)})).status""", [method, path, body, csrf])
        check(status == 403, f"the viewer's session: {method} {path} is 403 ({status})")
        code, _ = http(method, path, args.viewer, body)
        check(code == 403, f"the viewer's token: {method} {path} is 403 ({code})")
    goto(page, "audit", "Audit")
    page.wait_for_selector("#audit-verdict", timeout=30000)
    check("The chain verifies" in page.inner_text("#audit-verdict"), "a viewer may verify")
    ctx.close()


with sync_playwright() as pw:
    browser = launch(pw)
    if args.tampered:
        tampered(browser)
    elif args.rewritten:
        rewritten(browser)
    else:
        admin(browser)
        viewer(browser)
    browser.close()
print("confaudit: all checks passed")
