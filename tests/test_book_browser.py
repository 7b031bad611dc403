"""The built book (`_build/html`) in a real browser: headless Chromium, driven by Playwright.

Every page is opened twice, from a local HTTP server (as a published book) and as a file
(as a student opens ``_build/html``), with the network blocked: the pages must
carry their own JavaScript (the widget manager, RequireJS, MathJax). A request to a CDN is
answered from ``node_modules`` when the same package is installed there, so that a page
which still loads a CDN shows its other faults too, and is reported as a failure.

On each page:

* no uncaught error, no console error, no failed request;
* the math is typeset by MathJax, and no raw TeX is left in the text;
* each widget that works without a kernel renders, and each of its sliders, toggles and
  Play buttons changes the image it shows;
* each widget that needs a kernel says so, with its picture;
* each widget whose models run in the browser (``worldmodels.webwidgets``) starts, served
  over HTTP: every slider of the latent explorer changes the decoded frame, and a drive of
  100 steps in M's dream runs without error (the times per decode and per dream step are
  printed and written to ``_build/web_widget_times.json``); opened as a file, it shows its
  picture and says why it does not run;
* with JavaScript off, each widget's place shows its static picture.

The browser is Debian's ``chromium`` (or ``WM_CHROMIUM``). Without it the tests are
skipped, unless ``WM_REQUIRE_BROWSER=1`` (set by ``make test-book``) makes that a failure.
"""

from __future__ import annotations

import functools
import http.server
import json
import mimetypes
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from test_book_html import HTML, ROOT, toc_files

sys.path.insert(0, str(ROOT / "book" / "_ext"))
import wm_widgets  # noqa: E402

sys.path.pop(0)

CHROMIUM = os.environ.get("WM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NODE_MODULES = Path(os.environ.get("WM_NODE_MODULES", ROOT / "node_modules"))
VIEW_SELECTOR = f'script[type="{wm_widgets.WIDGET_VIEW}"]'
CHANGE_TIMEOUT_S = 5.0

if not (HTML / "index.html").exists():
    pytest.skip(f"the book is not built ({HTML})", allow_module_level=True)
if not Path(CHROMIUM).exists() or not (ROOT / "node_modules").is_dir():
    missing = "chromium (apt-get install chromium)" if not Path(CHROMIUM).exists() else "node_modules (npm ci)"
    if os.environ.get("WM_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"the browser test needs {missing}")
    pytest.skip(f"the browser test needs {missing}", allow_module_level=True)


# --- which widgets each page shows, from its notebook --------------------------------------------


PRECOMPUTED, LIVE, WEB = "kernel-free", "needs a kernel", "runs in the browser"
DREAM_STEPS = 100
TIMES = HTML.parent / "web_widget_times.json"


def widget_views(page: str) -> list[tuple[str, str]]:
    """(model id, PRECOMPUTED, LIVE or WEB) of each widget a chapter's outputs display, in order."""
    path = ROOT / f"{page}.ipynb"
    if not path.exists():
        return []
    nb = json.loads(path.read_text(encoding="utf-8"))
    state = wm_widgets.widget_state(path)
    views = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(wm_widgets.WIDGET_VIEW)
            if view:
                m = view["model_id"]
                kind = WEB if wm_widgets.is_web_widget(state, m) else LIVE if wm_widgets.needs_kernel(state, m) else PRECOMPUTED
                views.append((m, kind))
    return views


# --- the server and the browser ------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


def cdn_file(url: str) -> Path | None:
    """The file in node_modules that a CDN URL names (jsdelivr/unpkg npm URLs, cdnjs RequireJS)."""
    u = urlparse(url)
    path = u.path
    if u.netloc == "cdnjs.cloudflare.com" and "/require.js/" in path:
        return NODE_MODULES / "requirejs" / "require.js"
    if u.netloc in ("cdn.jsdelivr.net", "unpkg.com"):
        path = path.removeprefix("/npm/")
        m = re.match(r"/?((?:@[^/]+/)?[^/@]+)(?:@[^/]+)?/(.*)", path)
        if m:
            return NODE_MODULES / m.group(1) / m.group(2)
    return None


@pytest.fixture
def browser_context(playwright, tmp_path):
    """A fresh Chromium profile whose requests stay on this machine; returns (context, log)."""

    def launch(javascript: bool = True):
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{javascript}"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            java_script_enabled=javascript,
            viewport={"width": 1280, "height": 900},
        )
        log: list[str] = []

        def route(r):
            url = r.request.url
            host = urlparse(url).hostname
            if host == "127.0.0.1" and r.request.resource_type == "document":
                # a CDN's minified file is not the npm package's: its integrity hash cannot hold
                response = r.fetch()
                body = re.sub(r'\sintegrity="[^"]*"', "", response.text())
                return r.fulfill(response=response, body=body)
            if host == "127.0.0.1" or url.startswith(("file:", "data:", "blob:")):
                return r.continue_()
            local = cdn_file(url)
            if local is not None and local.is_file():
                log.append(f"request to a CDN (answered from {local.relative_to(NODE_MODULES)}): {url}")
                kind = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
                return r.fulfill(status=200, body=local.read_bytes(), content_type=kind)
            log.append(f"request outside the book (blocked): {url}")
            return r.abort()

        context.route("**/*", route)
        contexts.append(context)
        return context, log

    contexts: list = []
    yield launch
    for c in contexts:
        c.close()


def open_page(context, log: list[str], url: str):
    page = context.new_page()
    page.on("pageerror", lambda e: log.append(f"uncaught error: {e}"))
    page.on("console", lambda m: log.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("response", lambda r: log.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.on("requestfailed", lambda r: log.append(f"request failed ({r.failure}): {r.url}"))
    page.goto(url, wait_until="load")
    return page


# --- in the page --------------------------------------------------------------------------------

_SHOWN = """async root => {
  const shown = [...root.querySelectorAll('img')].filter(i => i.checkVisibility() && i.naturalWidth > 0);
  const bytes = await Promise.all(shown.map(async i => new Uint8Array(await (await fetch(i.src)).arrayBuffer())));
  return bytes.map(b => b.length + ':' + b.reduce((h, x) => (h * 31 + x) >>> 0, 7).toString(16)).join(' ');
}"""
"""The length and a hash of the bytes of each image a widget shows ('' for none)."""

_MATH = """() => {
  const math = [...document.querySelectorAll('main .math')];
  const untypeset = math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80));
  const walker = document.createTreeWalker(document.querySelector('main'), NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.closest('pre, code, script, style, .highlight, mjx-container, .math, .cell_output')) continue;
    const t = n.textContent;
    if (/\\\\\\(|\\\\\\[|\\$\\$|\\$[^$\\s][^$]*[\\\\^_{}][^$]*\\$/.test(t)) raw.push(t.trim().slice(0, 80));
  }
  return {count: math.length, untypeset, raw};
}"""


def wait_for_change(place, before: str) -> str:
    """The image the widget shows once it differs from `before` (or `before` after the timeout)."""
    deadline = time.monotonic() + CHANGE_TIMEOUT_S
    while True:
        now = place.evaluate(_SHOWN)
        if now != before or time.monotonic() > deadline:
            return now
        place.page.wait_for_timeout(100)


def exercise(place) -> list[str]:
    """Move each control of a rendered widget; the failures, one line each."""
    faults = []
    shown = place.evaluate(_SHOWN)
    if not shown:
        return ["shows no image"]

    def check(what: str):
        nonlocal shown
        now = wait_for_change(place, shown)
        if now == shown:
            faults.append(f"{what}: the image stays the same")
        shown = now

    handles = place.locator(".noUi-handle")
    for k in range(handles.count()):
        handles.nth(k).focus()
        handles.nth(k).press("End")
        check(f"slider {k} to its end")
    # the toggles at the sliders' ends, where the frames differ (a dream's first frame is the
    # same at every temperature)
    groups = place.locator(".widget-toggle-buttons")
    for g in range(groups.count()):
        buttons = groups.nth(g).locator("button")
        for b in range(buttons.count()):
            if "mod-active" in (buttons.nth(b).get_attribute("class") or ""):
                continue
            buttons.nth(b).click()
            check(f"toggle {g}, button {buttons.nth(b).inner_text()!r}")
    for k in range(handles.count()):
        handles.nth(k).focus()
        handles.nth(k).press("Home")
        check(f"slider {k} to its start")
    plays = place.locator(".widget-play")
    for p in range(plays.count()):
        play = plays.nth(p).locator("button").first
        play.click()
        check(f"Play {p}")
        play.click()  # pause
    if handles.count() + groups.count() + plays.count() == 0:
        faults.append("has no control to move")
    return faults


_CANVAS = "e => { const c = e.querySelector('canvas'); return c ? c.toDataURL() : ''; }"


def _wait_for_canvas_change(place, before: str) -> str:
    deadline = time.monotonic() + CHANGE_TIMEOUT_S
    while True:
        now = place.evaluate(_CANVAS)
        if now != before or time.monotonic() > deadline:
            return now
        place.page.wait_for_timeout(50)


def exercise_web(place, scheme: str) -> list[str]:
    """Start a web widget and move each of its controls; the failures, one line each."""
    if not place.count():
        return ["its place is missing from the page"]
    fallback = place.locator(".wm-widget-fallback")
    if scheme == "file":
        if not fallback.is_visible() or "HTTP" not in fallback.inner_text():
            return ["opened as a file, it should show its picture and say that it runs over HTTP"]
        return []
    try:
        place.locator(".wm-web-view[data-wm-ready]").wait_for(timeout=60_000)
    except Exception:
        return [f"did not start: {place.inner_text()[:200]!r}"]
    faults = []
    if fallback.is_visible():
        faults.append("its static picture should be hidden once it runs")
    view = place.locator(".wm-web-view")
    shown = _wait_for_canvas_change(view, "")
    if not shown:
        return faults + ["shows no frame"]
    sliders = view.locator("input[data-dim]")
    for k in range(sliders.count()):
        sliders.nth(k).focus()
        sliders.nth(k).press("End" if k % 2 == 0 else "Home")
        now = _wait_for_canvas_change(view, shown)
        if now == shown:
            faults.append(f"slider z[{sliders.nth(k).get_attribute('data-dim')}]: the frame stays the same")
        shown = now
    buttons = view.locator("button[data-action]")
    if buttons.count():
        names = [buttons.nth(b).get_attribute("data-action") for b in range(buttons.count())]
        view.locator('input[aria-label="temperature"]').evaluate(
            "e => { e.value = '1.5'; e.dispatchEvent(new Event('input')); }"
        )
        view.click()
        keys = ["ArrowUp", "ArrowLeft", "ArrowRight", "ArrowDown", " "]
        for t in range(DREAM_STEPS):
            if t % 2:
                buttons.nth(t % len(names)).click()
            else:
                view.press(keys[t % len(keys)])
        try:
            place.page.wait_for_function(
                "([e, n]) => Number(e.dataset.wmSteps) >= n", arg=[view.element_handle(), DREAM_STEPS], timeout=60_000
            )
        except Exception:
            faults.append(f"a drive of {DREAM_STEPS} steps did not finish: {view.locator('.wm-web-status').inner_text()!r}")
        status = view.locator(".wm-web-status").inner_text()
        if "error" in status or "reward" not in status:
            faults.append(f"after the drive the status reads {status!r}")
        if _wait_for_canvas_change(view, shown) == shown:
            faults.append("the dream's frame stays the same")
    if not sliders.count() and not buttons.count():
        faults.append("has no control to move")
    return faults


def _record_times(page, name: str) -> None:
    times = page.evaluate("() => globalThis.wmWebTimes || null")
    if not times:
        return
    import statistics

    summary = {
        k: {"n": len(v), "first_ms": round(v[0], 2), "median_ms": round(statistics.median(v[1:] or v), 2),
            "p90_ms": round(statistics.quantiles(v[1:], n=10)[-1], 2) if len(v) > 2 else None, "max_ms": round(max(v), 2)}
        for k, v in times.items() if v
    }
    print(f"{name}: {summary}")
    recorded = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    recorded[name] = summary
    TIMES.write_text(json.dumps(recorded, indent=2) + "\n")


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "file"])
@pytest.mark.parametrize("page", toc_files())
def test_page_in_browser(page, scheme, server, browser_context):
    context, log = browser_context()
    root = server if scheme == "http" else HTML.resolve().as_uri()
    p = open_page(context, log, f"{root}/{page}.html")
    views = widget_views(page)
    faults: list[str] = []
    kernel_free = [m for m, kind in views if kind == PRECOMPUTED]
    if views:
        try:
            p.wait_for_function(
                "n => document.querySelectorAll('.widget-subarea > *').length >= n", arg=len(kernel_free), timeout=30_000
            )
        except Exception:
            faults.append(f"{len(kernel_free)} widgets should render; "
                          f"{p.evaluate('document.querySelectorAll(`.widget-subarea > *`).length')} did")
    has_mathjax = p.evaluate("() => !!(window.MathJax && window.MathJax.startup)")
    if has_mathjax:
        p.wait_for_function("() => window.MathJax.startup.promise.then(() => true)", timeout=30_000)
    math = p.evaluate(_MATH)
    if math["count"] and not has_mathjax:
        faults.append(f"{math['count']} formulas but MathJax did not load")
    if math["untypeset"]:
        faults.append(f"{len(math['untypeset'])} formulas not typeset, first: {math['untypeset'][0]!r}")
    if math["raw"]:
        faults.append(f"raw TeX in the text: {math['raw'][:3]}")

    rendered = p.evaluate(f"() => [...document.querySelectorAll('{VIEW_SELECTOR}')].map(s => JSON.parse(s.textContent).model_id)")
    for k, (model_id, kind) in enumerate(views):
        name = f"widget {k + 1} of {len(views)} ({model_id[:8]}, {kind})"
        script = p.locator(VIEW_SELECTOR).nth(rendered.index(model_id)) if model_id in rendered else None
        if kind == WEB:
            faults += [f"{name}: {f}" for f in exercise_web(p.locator(f'[data-wm-model-id="{model_id}"]'), scheme)]
            continue
        if kind == LIVE:
            place = p.locator(f'[data-wm-model-id="{model_id}"]')
            if not place.count() or "kernel" not in place.inner_text():
                faults.append(f"{name}: does not say that it needs a kernel")
            elif not place.evaluate(_SHOWN):
                faults.append(f"{name}: shows no picture")
            continue
        if script is None:
            faults.append(f"{name}: its view is missing from the page")
            continue
        place = script.locator("xpath=preceding-sibling::div[contains(@class, 'widget-subarea')][1]")
        if not place.count() or not place.evaluate("e => e.children.length"):
            faults.append(f"{name}: did not render")
            continue
        fallback = p.locator(f'[data-wm-model-id="{model_id}"] > .wm-widget-fallback')
        if fallback.count() != 1 or fallback.is_visible():
            faults.append(f"{name}: its static picture should be there, hidden by the widget")
        faults += [f"{name}: {f}" for f in exercise(place)]
    if scheme == "http":
        _record_times(p, page)
    faults += log
    assert not faults, f"{page}:\n  " + "\n  ".join(dict.fromkeys(faults))


@pytest.mark.parametrize("page", [p for p in toc_files() if widget_views(p)])
def test_widgets_without_javascript_show_their_picture(page, server, browser_context):
    context, log = browser_context(javascript=False)
    p = open_page(context, log, f"{server}/{page}.html")
    faults = []
    for k, (model_id, _) in enumerate(widget_views(page)):
        place = p.locator(f'[data-wm-model-id="{model_id}"]')
        if not place.count():
            faults.append(f"widget {k + 1} ({model_id[:8]}): no static picture in its place")
            continue
        box = place.locator("img.wm-widget-picture").bounding_box()
        if box is None or box["height"] < 32:
            faults.append(f"widget {k + 1} ({model_id[:8]}): its picture is not visible ({box})")
    assert not faults, f"{page}:\n  " + "\n  ".join(faults)
