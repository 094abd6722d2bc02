"""The book builds cleanly and its pages work in a real browser.

Once per test session (module-scoped fixture) the book is built into a temporary folder with the same
command as the README (``jupyter-book build --all -W -n --keep-going``), at the fast size
(``GRADREG_FULL=0``). Any failing cell, broken cross-reference or missing citation makes that build fail.

Then every page that a reader opens first (the intro, the notation page, each chapter, the API reference
and the bibliography) is loaded in headless Chromium, from a local HTTP server, with every host other than
127.0.0.1 made unresolvable so that the check is the same offline and in CI. On each page:

* MathJax (served from the book itself) typeset every formula, and no raw TeX is left in the text;
* every image served by the book loaded;
* no JavaScript exception, console error, or failed same-origin request;
* what a reader sees at the page's width (1280-px window): no raw TeX ($, \\frac, \\sum, ...) in text outside math;
  no table or display formula wider than the text column, and no printed output wider than its box unless it
  scrolls with the visible scrollbar of book/_static/gradreg.css; no figure text smaller than MIN_FIGURE_TEXT_PX
  on the page (gradreg.plotting.figure_png records each figure's smallest font and dpi in its PNG).

The browser is driven through the Chrome DevTools Protocol with ``websocket-client``. Debian's
``chromium`` package is needed: without it the browser tests are skipped locally and fail in CI (CI=true).
Set ``GRADREG_BOOK_SCREENSHOTS=<folder>`` to keep a screenshot of every page checked.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_book_meta import toc_files

from gradreg.plotting import PNG_KEYS

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
BUILD_TIMEOUT_S = 3600  # the build executes every chapter; the per-cell limit is in _config.yml
PAGE_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------------- helpers


TOC_FILES = toc_files()
CHAPTERS = [f for f in TOC_FILES if f.startswith("chapters/")]
# Pages opened in the browser, and whether they must contain math.
BROWSER_PAGES = {
    "book/intro": True,
    "book/notation": True,
    **{chapter: True for chapter in CHAPTERS},
    "book/api": False,
    "book/references": False,
}


def _missing(what: str) -> None:
    """Skip locally, fail in CI: the CI must run every check."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: the browser checks must run in CI; .ci/run installs it)")
    pytest.skip(what)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    _missing("headless Chromium is not installed (apt-get install -y chromium)")
    raise AssertionError  # unreachable


def _jupyter_book() -> list[str]:
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    assert found, "jupyter-book is not installed (pip install -r requirements.txt)"
    return [found]


def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


# --------------------------------------------------------------------------------------------- the build


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _readers_environment() -> dict[str, str]:
    """The environment of a reader who runs the README's build: no thread settings (the test command's
    OMP_NUM_THREADS=1 is removed), the fast size, and no figure checks (those run under nbval)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES and k != "GRADREG_CHECK_FIGURES"}
    return dict(env, GRADREG_FULL="0", PYTHONHASHSEED="0")


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> dict:
    """Build the book once into a temporary folder, as the README's first command does (threads unset: every
    chapter runs with the thread count ``gr.setup()`` picks on this machine); return paths, return code, log."""
    out = tmp_path_factory.mktemp("book")
    env = _readers_environment()
    cmd = [*_jupyter_book(), "build", "--all", "-W", "-n", "--keep-going", "--path-output", str(out), "."]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (out / "build.log").write_text(log)
    return {"rc": proc.returncode, "log": log, "html": out / "_build" / "html", "seconds": seconds, "out": out}


def _warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"WARNING|ERROR|Exception|Traceback", line)]


def test_book_builds_without_warnings(book):
    warnings = "\n".join(_warnings(book["log"])[:40])
    tail = book["log"][-3000:]
    assert book["rc"] == 0, f"jupyter-book build -W -n failed (rc={book['rc']}):\n{warnings}\n...\n{tail}"
    assert "build succeeded" in book["log"], book["log"][-3000:]


def test_every_toc_page_was_built(book):
    html = book["html"]
    for name in TOC_FILES:
        assert (html / f"{name}.html").is_file(), f"{name}.html missing from the built book"
    assert (html / "index.html").is_file(), "no index.html: the site root would be empty"
    assert (html / "genindex.html").is_file()


def test_mathjax_is_served_by_the_book(book):
    html = book["html"]
    assert (html / "_static" / "mathjax" / "tex-chtml-full.js").is_file()
    fonts = list((html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert len(fonts) >= 20, "the MathJax fonts were not copied into the built book"
    page = (html / "book" / "notation.html").read_text()
    assert "_static/mathjax/tex-chtml-full.js" in page
    assert "cdn.jsdelivr.net" not in page, "the page still loads MathJax from a CDN"


def test_chapters_ran_as_a_reader_runs_them(book):
    """The build did not inherit the test command's OMP_NUM_THREADS=1: every chapter's setup cell reports the
    thread count gr.setup() chooses by itself at the fast size."""
    for chapter in CHAPTERS:
        executed = book["out"] / "_build" / "jupyter_execute" / f"{chapter}.ipynb"
        outputs = json.dumps(json.loads(executed.read_text())["cells"])
        found = set(re.findall(r"threads=\d+ \(([^)]*)\)", outputs))
        assert found == {"fast size"}, f"{chapter}: setup chose threads because of {found}, expected 'fast size'"


@pytest.mark.slow
def test_the_chaotic_chapter_holds_at_two_threads(tmp_path):
    """Chapter 4 (full-batch GD at the edge of stability: chaotic, so its summation order matters) executed with
    OMP_NUM_THREADS=2, as a Colab CPU runtime or a reader who sets it would: every assert in it must hold."""
    import nbformat
    from nbclient import NotebookClient

    chapter = ROOT / "chapters" / "04_ascent_descent.ipynb"
    # A correctness check at 2 threads (the same work split and summation order as a reader's 2 threads);
    # passive waiting keeps OpenMP's idle threads from spinning when the machine is oversubscribed.
    env = dict(_readers_environment(), OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    nb = nbformat.read(chapter, as_version=4)
    nb.cells = [c for c in nb.cells if "nbval-skip" not in c.get("metadata", {}).get("tags", [])]
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # a cell whose assert fails raises CellExecutionError here
    setup_output = json.dumps([c.get("outputs") for c in nb.cells])
    assert "threads=2 (OMP_NUM_THREADS)" in setup_output


def test_api_reference_is_generated_from_docstrings(book):
    page = (book["html"] / "book" / "api.html").read_text()
    # A function and a constant of each listed module, as autodoc renders them (id="module.name").
    for anchor in ("gradreg.runtime.setup", "gradreg.runtime.full_size", "gradreg.methods.LABELS"):
        assert f'id="{anchor}"' in page, f"{anchor} is not documented on the API page"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_colab_button_points_at_the_notebook_in_the_repository(book, chapter):
    cfg = _config()
    repo = cfg["repository"]
    owner_repo = repo["url"].removeprefix("https://github.com/").strip("/")
    prefix = repo.get("path_to_book", "").strip("/")
    path = f"{prefix}/{chapter}.ipynb" if prefix else f"{chapter}.ipynb"
    expected = f"https://colab.research.google.com/github/{owner_repo}/blob/{repo['branch']}/{path}"
    page = (book["html"] / f"{chapter}.html").read_text()
    links = set(re.findall(r'href="(https://colab\.research\.google\.com/[^"]+)"', page))
    assert links == {expected}, f"Colab links on {chapter}.html: {links}, expected {expected}"
    assert "gradreg.git@" not in page, f"the bootstrap cell of {chapter} is shown (tag it remove-cell)"


# --------------------------------------------------------------------------------------------- the browser


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def _serve(directory: Path):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _CDP:
    """A minimal synchronous Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=PAGE_TIMEOUT_S, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = PAGE_TIMEOUT_S, **params) -> dict:
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
            if time.monotonic() > deadline:
                raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float = PAGE_TIMEOUT_S) -> dict:
        seen = len(self.events)
        for event in self.events[:seen]:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str, timeout: float = PAGE_TIMEOUT_S):
        result = self.call(
            "Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        with contextlib.suppress(Exception):
            self.ws.close()


class _Browser:
    """Headless Chromium with the DevTools endpoint on a free loopback port; no host but 127.0.0.1."""

    def __init__(self, executable: str, workdir: Path):
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        self.log = open(workdir / "chromium.log", "wb")
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
            "--disable-dev-shm-usage",  # Docker's 64 MB /dev/shm is too small for Chromium's renderer
            "--window-size=1280,900", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            # Every name but 127.0.0.1 fails to resolve: the same page behaviour offline and in CI,
            # and an external script, style sheet or font the book would need shows up as a failure.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--user-data-dir={self.profile}", "about:blank",
        ]
        self.proc = subprocess.Popen([executable, *flags], stdout=self.log, stderr=subprocess.STDOUT)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not start; see {workdir / 'chromium.log'}")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])

    def new_page(self) -> tuple[_CDP, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            target = json.load(resp)
        return _CDP(target["webSocketDebuggerUrl"]), target["id"]

    def close_page(self, target_id: str) -> None:
        with contextlib.suppress(Exception):
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/close/{target_id}", timeout=5).close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# Runs in the page after load: waits for MathJax, makes every image load, and reports what it found.
_INSPECT_JS = r"""
(async () => {
  const out = {mathjax: false, typesetError: null};
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; out.mathjax = true; }
    catch (e) { out.typesetError = String(e); }
  }
  // CHTML output draws glyphs with MathJax's web fonts: wait for them, and report any that failed.
  await document.fonts.ready;
  const faces = Array.from(document.fonts).filter(f => f.family.replace(/"/g, '').startsWith('MJX'));
  out.mathFontsLoaded = faces.filter(f => f.status === 'loaded').length;
  out.mathFontsFailed = faces.filter(f => f.status === 'error').map(f => f.family);
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(img => {
    img.loading = 'eager';
    if (img.complete) return Promise.resolve();
    return new Promise(resolve => {
      img.addEventListener('load', resolve, {once: true});
      img.addEventListener('error', resolve, {once: true});
      setTimeout(resolve, 10000);
    });
  }));
  out.images = imgs.map(img => ({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0}));
  const math = Array.from(document.querySelectorAll('.math'));
  out.mathElements = math.length;
  out.untypeset = math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80));
  out.mjxContainers = document.querySelectorAll('mjx-container').length;
  out.mathErrors = Array.from(document.querySelectorAll('mjx-merror, [data-mjx-error]'))
      .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120));
  // An undefined macro is drawn as its own name in red; the assistive MathML keeps it as text "\name".
  document.querySelectorAll('mjx-assistive-mml mtext').forEach(e => {
    if (e.textContent.startsWith('\\')) out.mathErrors.push('undefined macro ' + e.textContent);
  });
  const body = document.querySelector('main') || document.body;
  const clone = body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container').forEach(e => e.remove());
  const text = clone.textContent;
  out.rawTex = ['\\(', '\\)', '\\[', '\\]', '$$'].filter(d => text.includes(d));
  out.title = document.title;
  return out;
})()
"""


_LAYOUT_JS = r"""
// Runs in the page after _INSPECT_JS: raw TeX left in the text, boxes whose content is cut off on the right,
// and every figure's rendered size against its natural size.
(() => {
  const out = {rawTex: [], clipped: [], figures: []};
  const main = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const skip = 'pre, code, script, style, mjx-container, mjx-assistive-mml, .MathJax, kbd, samp, .highlight';
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const tex = [/\$/, /\\frac/, /\\sum/, /\\\(/, /\\\)/, /\\\[/, /\\\]/, /\\(mathrm|varepsilon|theta|nabla|lVert)\b/];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(skip)) continue;
    const text = node.textContent;
    const hit = tex.find(re => re.test(text));
    if (hit) {
      const i = text.search(hit);
      out.rawTex.push(text.slice(Math.max(0, i - 40), i + 40).replace(/\s+/g, ' '));
    }
  }
  // Text outputs, tables (Markdown and printed) and display math: content wider than its box is cut off, unless
  // the box scrolls; and nothing may stick out past the right edge of the text column.
  const columnRight = main.getBoundingClientRect().right - parseFloat(getComputedStyle(main).paddingRight);
  const boxes = main.querySelectorAll('.cell_output pre, .output pre, table, mjx-container[display="true"]');
  for (const el of boxes) {
    if (el.closest('.cell_input')) continue;  // code may scroll: it is not a result
    const rect = el.getBoundingClientRect();
    if (rect.width === 0) continue;  // inside a closed dropdown
    const content = Math.max(el.scrollWidth, ...Array.from(el.children, c => c.getBoundingClientRect().width));
    const overflow = content - el.clientWidth;
    const past = rect.left + content - columnRight, boxPast = rect.right - columnRight;
    if (overflow > 1 || past > 1) {
      const where = el.closest('section');
      const style = getComputedStyle(el);
      const marked = style.getPropertyValue('--gradreg-scrolls').trim() === '1';
      const scrolls = el.tagName === 'PRE' && ['auto', 'scroll'].includes(style.overflowX) && marked;
      out.clipped.push({tag: el.tagName.toLowerCase(), content: Math.round(content), box: Math.round(el.clientWidth),
                        scrolls: scrolls && boxPast <= 1,
                        past: Math.round(past), section: where && where.id,
                        text: el.textContent.trim().replace(/\s+/g, ' ').slice(0, 70)});
    }
  }
  out.columnWidth = Math.round(columnRight - main.getBoundingClientRect().left);
  for (const img of main.querySelectorAll('img')) {
    const rect = img.getBoundingClientRect();
    if (!img.naturalWidth || rect.width === 0) continue;
    const where = img.closest('section');
    out.figures.push({src: img.currentSrc || img.src, natural: img.naturalWidth, rendered: rect.width,
                      section: where && where.id});
  }
  return out;
})()
"""


@pytest.fixture(scope="module")
def browser(book):
    if book["rc"] != 0:
        pytest.fail("the book did not build; see test_book_builds_without_warnings")
    executable = _chromium()
    try:
        import websocket  # noqa: F401
    except ImportError:
        _missing("websocket-client is not installed (pip install -r requirements.txt)")
    with _serve(book["html"]) as base_url:
        chromium = _Browser(executable, book["out"])
        try:
            yield {"browser": chromium, "base": base_url, "origin": base_url}
        finally:
            chromium.close()


def _open(browser: dict, page: str, screenshot: Path | None = None) -> dict:
    """Load one page; return the in-page report plus the errors collected from the DevTools events."""
    cdp, target_id = browser["browser"].new_page()
    origin = browser["origin"]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable")
        cdp.call("Page.navigate", url=f"{browser['base']}/{page}.html")
        cdp.wait_event("Page.loadEventFired")
        report = cdp.evaluate(_INSPECT_JS)
        report["layout"] = cdp.evaluate(_LAYOUT_JS)
        if screenshot is not None:
            shot = cdp.call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        cdp.call("Runtime.evaluate", expression="0")  # flush the events queued so far
    finally:
        cdp.close()
        browser["browser"].close_page(target_id)

    errors, external = [], []
    requests = {}
    for event in cdp.events:
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            requests[params["requestId"]] = (params["request"]["url"], params.get("type", ""))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            errors.append(f"JavaScript exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in {"error", "assert"}:
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            url = entry.get("url", "")
            if url.endswith("/favicon.ico"):  # Chromium asks every site for one; the book has none
                continue
            if entry.get("source") == "network" and url and not url.startswith(origin):
                external.append(url)
                continue
            errors.append(f"console ({entry.get('source')}): {entry.get('text')} {url}".strip())
        elif method == "Network.responseReceived":
            url, status = params["response"]["url"], params["response"]["status"]
            if url.startswith(origin) and status >= 400 and not url.endswith("/favicon.ico"):
                errors.append(f"HTTP {status} for {url}")
        elif method == "Network.loadingFailed":
            url, kind = requests.get(params["requestId"], ("?", params.get("type", "")))
            if url.startswith(origin):
                errors.append(f"failed to load {url}: {params.get('errorText')}")
            elif kind in {"Script", "Stylesheet", "Font"}:
                errors.append(f"the page needs an external {kind.lower()} (offline it fails): {url}")
            else:
                external.append(url)
    report["errors"] = errors
    report["external"] = sorted(set(external))
    return report


@pytest.fixture(scope="module")
def reports(browser, book) -> dict[str, dict]:
    """Every page of BROWSER_PAGES opened once, with its report. A screenshot of the intro and notation pages is
    always taken (and must not be blank); with GRADREG_BOOK_SCREENSHOTS=<folder>, every page's is kept there for a
    person to look at."""
    keep = os.environ.get("GRADREG_BOOK_SCREENSHOTS")
    folder = Path(keep) if keep else book["out"] / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for page in BROWSER_PAGES:
        screenshot = folder / f"{page.replace('/', '_')}.png" if keep or page in {"book/intro", "book/notation"} \
            else None
        found[page] = _open(browser, page, screenshot) | {"screenshot": screenshot}
    return found


@pytest.mark.parametrize("page", list(BROWSER_PAGES))
def test_page_renders_in_chromium(browser, reports, page):
    report, screenshot = reports[page], reports[page]["screenshot"]

    assert not report["errors"], f"{page}: browser errors:\n" + "\n".join(report["errors"])
    broken = [img["src"] for img in report["images"] if not img["ok"] and img["src"].startswith(browser["origin"])]
    assert not broken, f"{page}: images that did not load: {broken}"
    if BROWSER_PAGES[page] or report["mathElements"]:  # Sphinx loads MathJax only on pages with math
        assert report["mathjax"], f"{page}: MathJax did not start ({report['typesetError']})"
    assert not report["untypeset"], f"{page}: formulas MathJax did not typeset: {report['untypeset'][:5]}"
    assert not report["mathErrors"], f"{page}: TeX errors: {report['mathErrors'][:5]}"
    assert not report["rawTex"], f"{page}: raw TeX delimiters {report['rawTex']} left in the text"
    assert not report["mathFontsFailed"], f"{page}: MathJax fonts that failed: {report['mathFontsFailed']}"
    if BROWSER_PAGES[page]:
        assert report["mjxContainers"] > 0, f"{page}: expected typeset math, found none"
        assert report["mathFontsLoaded"] > 0, f"{page}: no MathJax font loaded: the math would be invisible"
    if screenshot is not None and page in {"book/intro", "book/notation"}:
        assert screenshot.stat().st_size > 20_000, f"{page}: the screenshot looks empty"


# --------------------------------------------------------------------------------------------- what a reader sees


#: The smallest text a figure may show on the page, in CSS pixels (the font's em size), at the window width of the
#: browser test (1280 px, a text column of about 690 px). At 4–5 px, as three-panel figures scaled into the column
#: were, legends and tick labels cannot be read; 8.5 px is about the size of a footnote at a normal zoom.
MIN_FIGURE_TEXT_PX = 8.5


def _png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG file (where gradreg.plotting.figure_png records a figure's smallest font)."""
    data, pos, found = path.read_bytes(), 8, {}
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            found[key.decode("latin-1")] = value.decode("latin-1")
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return found


@pytest.mark.parametrize("page", list(BROWSER_PAGES))
def test_no_raw_tex_in_the_text(reports, page):
    """No $, \\frac, \\sum (or another TeX command) in a text node outside code and typeset math: a formula that
    Markdown broke (a line that starts with "+" becomes a bullet) or a stray dollar shows as raw TeX."""
    raw = reports[page]["layout"]["rawTex"]
    assert not raw, f"{page}: raw TeX in the text: {raw[:5]}"


@pytest.mark.parametrize("page", list(BROWSER_PAGES))
def test_no_output_table_or_formula_is_cut_off(reports, page):
    """At the page's width, no table (Markdown or printed) and no display formula is wider than its box or the text
    column; a printed output wider than the column scrolls, with the visible scrollbar of book/_static/gradreg.css."""
    cut = [c for c in reports[page]["layout"]["clipped"] if not c["scrolls"]]
    assert not cut, (f"{page}: cut off at the right edge (content px > box px):\n"
                     + "\n".join(f"  <{c['tag']}> in #{c['section']}: {c['content']} > {c['box']} px, "
                                  f"{c['past']} px past the column: {c['text']!r}" for c in cut))


@pytest.mark.parametrize("page", [p for p in BROWSER_PAGES if p.startswith("chapters/")])
def test_figure_text_is_readable_at_the_page_width(reports, book, browser, page):
    """Every figure's smallest text (gradreg.plotting.figure_png writes its size in points and the figure's dpi
    into the PNG), scaled as the page shows the figure (rendered width / natural width), is at least
    MIN_FIGURE_TEXT_PX CSS pixels."""
    figures = reports[page]["layout"]["figures"]
    assert figures, f"{page}: no figure found on the page"
    small, unmarked = [], []
    for f in figures:
        if not f["src"].startswith(browser["origin"]):
            continue
        meta = _png_text(book["html"] / f["src"].removeprefix(browser["origin"] + "/"))
        if PNG_KEYS["smallest"] not in meta:
            unmarked.append(f"#{f['section']}: {f['src'].rsplit('/', 1)[-1]}")
            continue
        scale = f["rendered"] / f["natural"]
        points = float(meta[PNG_KEYS["smallest"]])
        px = points * float(meta[PNG_KEYS["dpi"]]) / 72 * scale
        if px < MIN_FIGURE_TEXT_PX:
            small.append(f"#{f['section']}: {points:g} pt drawn at {f['natural']} px, shown at "
                         f"{f['rendered']:.0f} px: {px:.1f} px ({meta.get(PNG_KEYS['which'], '')!r})")
    assert not unmarked, (f"{page}: figures without the font-size record of gradreg.plotting.figure_png (was "
                          f"gr.setup() / plotting.use_style() called?): {unmarked}")
    assert not small, f"{page}: figure text below {MIN_FIGURE_TEXT_PX} px on the page:\n  " + "\n  ".join(small)
