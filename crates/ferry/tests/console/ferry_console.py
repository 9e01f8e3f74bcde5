"""Shared helpers for the console's browser scripts (console_test.py and
each view's *_test.py): checks that exit on the first failure, HTTP with a
token or a cookie, screenshots, axe-core, login. Call `setup(base, shots,
axe)` first."""

import json
import ssl
import sys
import time
import urllib.request

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page

# Chromium aborts a navigation with ERR_NETWORK_CHANGED when a network
# interface comes or goes in its namespace, which other tests running
# beside these do (they make and remove network namespaces and veths). That
# says nothing about the page: navigate again, a few times.
_goto = Page.goto


def _goto_again_on_network_change(self, url, **kw):
    for attempt in range(5):
        try:
            return _goto(self, url, **kw)
        except PlaywrightError as e:
            if "ERR_NETWORK_CHANGED" not in str(e) or attempt == 4:
                raise
            print(f"(navigation to {url} hit ERR_NETWORK_CHANGED; again)", file=sys.stderr)
            time.sleep(0.2)


Page.goto = _goto_again_on_network_change

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

NO_VERIFY = ssl.create_default_context()
NO_VERIFY.check_hostname = False
NO_VERIFY.verify_mode = ssl.CERT_NONE

CFG = {"base": None, "shots": None, "axe": None}


def setup(base, shots, axe_path):
    CFG["base"] = base
    CFG["shots"] = shots
    CFG["axe"] = open(axe_path, encoding="utf-8").read()


def check(cond, what):
    if not cond:
        print("FAILED: " + what, file=sys.stderr)
        dump_pages(what)
        sys.exit(1)
    print("ok: " + what)


def http(method, path, token=None, body=None, headers=None):
    req = urllib.request.Request(CFG["base"] + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=NO_VERIFY, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def shot(page, name):
    """Checks the page shows no raw script value, then saves a full-page
    screenshot and prints its path."""
    text = page.inner_text("body")
    check("[object" not in text and "undefined" not in text and "NaN" not in text,
          f"{name} shows no raw script value")
    path = f"{CFG['shots']}/{name}.png"
    page.screenshot(path=path, full_page=True)
    print("screenshot: " + path)


def axe(page, name):
    """axe-core on the page as it is: no serious or critical violation.
    Evaluated through the DevTools protocol, which the page's CSP does not
    govern: axe-core is vendored into the test run, never served."""
    page.evaluate(CFG["axe"])
    result = page.evaluate("() => axe.run(document).then(r => r.violations.map(v => "
                           "({id: v.id, impact: v.impact, nodes: v.nodes.length, help: v.help})))")
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    for v in result:
        print(f"axe {name}: {v['impact']} {v['id']} ({v['nodes']}): {v['help']}")
    check(not bad, f"axe-core finds no serious or critical violation on {name}: {bad}")


def login(page, token):
    page.goto(CFG["base"] + "/")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("h1:has-text('Overview')")


def visible_buttons(page):
    return [b.inner_text().strip() for b in page.query_selector_all("main button") if b.is_visible()]


# Every page the scripts open, and its last console messages: on a failure
# (a failed check or an exception) each is dumped — URL, the view's text,
# the console, a screenshot — so a CI failure can be read afterwards.
PAGES = []


def _watch(page):
    page._ferry_console = []

    def keep(msg):
        page._ferry_console.append(f"{msg.type}: {msg.text}")
        del page._ferry_console[:-20]
    page.on("console", keep)
    page.on("pageerror", lambda e: keep(type("M", (), {"type": "pageerror", "text": str(e)})))
    PAGES.append(page)


def dump_pages(why):
    for i, page in enumerate(PAGES):
        try:
            if page.is_closed():
                continue
            print(f"--- page {i} at failure ({why}): {page.url}", file=sys.stderr)
            print(page.inner_text("#view")[:3000] if page.query_selector("#view") else page.inner_text("body")[:3000],
                  file=sys.stderr)
            for m in getattr(page, "_ferry_console", []):
                print("console " + m, file=sys.stderr)
            if CFG["shots"]:
                path = f"{CFG['shots']}/FAILED-{i}.png"
                page.screenshot(path=path, full_page=True)
                print("screenshot: " + path, file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - a dump must never hide the failure
            print(f"(page {i} could not be dumped: {e})", file=sys.stderr)


_excepthook = sys.excepthook


def _dump_then_raise(kind, value, tb):
    dump_pages(f"{kind.__name__}: {value}")
    _excepthook(kind, value, tb)


sys.excepthook = _dump_then_raise


def context(browser):
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    ctx.on("page", _watch)
    return ctx


def launch(pw):
    return pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
