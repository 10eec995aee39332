"""The book: built offline from the notebooks' stored outputs, then read in headless Chromium.

The build (``book/build.sh``: Jupyter Book 1, warnings as errors, nitpicky) is reused when
its stamp is newer than every input, otherwise rebuilt. The site is served over
http://127.0.0.1 and every page reachable from the landing page is loaded in Debian's
Chromium through Playwright (no browser download): no console errors, no failed request,
no request leaving 127.0.0.1, maths typeset by MathJax, every image loaded with a
non-zero size. Screenshots go to ``book/_build/screenshots/``.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
HTML = BOOK / "_build" / "html"
STAMP = HTML / ".build-ok"
SCREENSHOTS = BOOK / "_build" / "screenshots"
PACKAGES = ("reference", "fused")
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# The flags that work for root in a container with no GPU; Playwright itself adds
# --headless, --no-sandbox and a fresh temporary profile (--user-data-dir).
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BUILD_TIMEOUT_S = 600
PAGE_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1280, "height": 900}
SCREENSHOT_MAX_PX = 10_000
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")
HIDDEN_OUTPUT_TAGS = {"remove-output", "remove-cell"}


def _notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def _modules() -> list[str]:
    """Dotted names of every public module of the packages, from the files on disk."""
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if not any(p.startswith("_") for p in parts):
                names.append(".".join(parts))
    return names


def _build_inputs() -> list[Path]:
    """Every file and folder the build reads; a folder's time changes when a file is removed."""
    trees = [BOOK, ROOT / "notebooks", *(ROOT / package for package in PACKAGES)]
    skip = {"_build", "__pycache__", ".ipynb_checkpoints"}
    inputs = []
    for tree in trees:
        inputs.append(tree)
        inputs += [p for p in tree.rglob("*") if not skip & set(p.relative_to(tree).parts)]
    return inputs


def _build_is_fresh() -> bool:
    if not STAMP.is_file():
        return False
    return STAMP.stat().st_mtime >= max(p.stat().st_mtime for p in _build_inputs())


@pytest.fixture(scope="module")
def site() -> Path:
    """The built HTML, rebuilt unless the last clean build is newer than every input."""
    if not _notebooks():
        pytest.fail("notebooks/ holds no notebook: the book has nothing to publish")
    if not _build_is_fresh():
        result = subprocess.run(
            [str(BOOK / "build.sh")],
            cwd=ROOT,
            env={**os.environ, "VENV": sys.prefix, "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if result.returncode != 0:
            log = (result.stdout + result.stderr)[-6000:]
            pytest.fail(f"book/build.sh failed (exit {result.returncode}):\n{log}")
    return HTML


def _page_name(notebook: Path) -> str:
    return f"notebooks/{notebook.stem}.html"


def test_build_finished_without_warnings(site):
    # build.sh runs with --warningiserror and writes the stamp only after a clean build.
    assert STAMP.is_file()
    assert (site / "intro.html").is_file()


def test_every_notebook_has_a_page(site):
    missing = [nb.name for nb in _notebooks() if not (site / _page_name(nb)).is_file()]
    assert not missing, f"notebooks with no page in the book: {missing}"


def _visible_outputs(notebook: Path) -> tuple[int, int]:
    """(code cells with a shown output, image outputs among them) as stored in the file."""
    cells = json.loads(notebook.read_text())["cells"]
    cells_with_output, images = 0, 0
    for cell in cells:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or not cell.get("outputs") or tags & HIDDEN_OUTPUT_TAGS:
            continue
        cells_with_output += 1
        images += sum(
            any(m in out.get("data", {}) for m in IMAGE_MIMES) for out in cell["outputs"]
        )
    return cells_with_output, images


@pytest.mark.parametrize("notebook", _notebooks(), ids=lambda p: p.stem)
def test_notebook_page_shows_the_stored_outputs(site, notebook):
    # The book never executes a notebook, so every stored output must be on the page.
    page = (site / _page_name(notebook)).read_text()
    cells_with_output, images = _visible_outputs(notebook)
    assert page.count('class="cell_output') == cells_with_output
    assert page.count("<img ") >= images


def test_nbval_markers_are_tags_not_comments():
    # The book shows a cell's source as written: nbval's comment marker would show to readers,
    # its tag (nbval-ignore-output) does not.
    marked = [
        f"{notebook.name} cell {i}"
        for notebook in _notebooks()
        for i, cell in enumerate(json.loads(notebook.read_text())["cells"])
        if cell["cell_type"] == "code" and re.match(r"\s*# ?NBVAL_", "".join(cell["source"]))
    ]
    assert not marked, f"nbval comment markers (use the cell tag instead): {marked}"


def test_api_page_documents_every_module(site):
    page = (site / "api.html").read_text()
    missing = [m for m in _modules() if f'id="module-{m}"' not in page]
    assert not missing, f"modules missing from the API page: {missing}"


def test_bibliography_lists_every_source(site):
    # sphinxcontrib-bibtex lists only the entries cited somewhere, so an entry that no page
    # cites is missing here too.
    entries = re.findall(r"^@\w+\{", (BOOK / "references.bib").read_text(), flags=re.M)
    page = (site / "bibliography.html").read_text()
    assert len(entries) > 0
    assert page.count('role="doc-biblioentry"') == len(entries)



class _ProseOutsideMaths(html.parser.HTMLParser):
    """The text a reader sees as prose: outside maths, code, scripts and styles.

    Sphinx writes maths as ``<span class="math ...">`` or ``<div class="math ...">`` holding
    the TeX for MathJax; anything TeX-like outside those elements stays raw on the page.
    """

    SKIP_TAGS = {"script", "style", "pre", "code", "head", "textarea"}
    VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, bool]] = []
        self.prose: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.VOID_TAGS:
            return
        classes = (dict(attrs).get("class") or "").split()
        skipped = bool(self.stack) and self.stack[-1][1]
        self.stack.append((tag, skipped or tag in self.SKIP_TAGS or "math" in classes))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if not (self.stack and self.stack[-1][1]):
            self.prose.append(data)


# A TeX command (\varepsilon, \frac ...) or a maths delimiter left in the prose.
RAW_TEX = re.compile(r"\\[A-Za-z]+|\\[()\[\]]|\$\$")


def _raw_tex(page: Path) -> list[str]:
    parser = _ProseOutsideMaths()
    parser.feed(page.read_text())
    text = " ".join(parser.prose)
    return [text[max(0, m.start() - 40) : m.end() + 40] for m in RAW_TEX.finditer(text)]


def test_no_raw_tex_outside_maths(site):
    # A wrapped line of a formula that starts with "- " or "+ " becomes a list item and its
    # TeX is printed as text; MathJax never sees it, so only the HTML shows it.
    pages = [site / "intro.html", *(site / _page_name(nb) for nb in _notebooks())]
    found = {page.name: hits for page in pages if (hits := _raw_tex(page))}
    assert not found, f"raw TeX outside maths: {found}"


def test_raw_tex_check_sees_a_broken_formula(tmp_path):
    # The check itself: notebook 05's summary once rendered like this (a wrapped line of
    # inline maths starting "- \\varepsilon/V" became a bullet), while typeset maths and
    # code pass.
    page = tmp_path / "page.html"
    page.write_text(
        '<p>applies <span class="math notranslate nohighlight">\\(g\\,(p - 1)\\)</span></p>'
        "<pre>print(r'\\n')</pre><ul><li><p>\\varepsilon/V) + h\\,p</p></li></ul>"
    )
    assert len(_raw_tex(page)) == 1 and "varepsilon" in _raw_tex(page)[0]
    page.write_text('<div class="math notranslate nohighlight">\\[\\frac{1}{N}\\]</div><code>\\x</code>')
    assert _raw_tex(page) == []

@dataclass
class PageReport:
    """What one page did in the browser."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    math_elements: int = 0
    math_unrendered: int = 0
    math_errors: int = 0
    bad_images: list[str] = field(default_factory=list)
    images: int = 0
    overflowing_code: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    next_page: str | None = None
    screenshot: Path | None = None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's name)
        pass


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: the book test needs Debian's "
            "chromium package (apt-get install chromium), or CHROMIUM=/path/to/chromium"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# The code and output blocks of notebook cells wider than their box (a line the reader must
# scroll to see), each named by its first 60 characters.
_OVERFLOWING_CODE = """() => Array.from(document.querySelectorAll('div.cell pre'))
    .filter(pre => pre.scrollWidth > pre.clientWidth)
    .map(pre => pre.textContent.trim().slice(0, 60))"""

_READ_PAGE = """() => ({
    math: document.querySelectorAll('.math').length,
    unrendered: Array.from(document.querySelectorAll('.math'))
        .filter(e => !e.querySelector('mjx-container')).length,
    mathErrors: document.querySelectorAll('mjx-merror').length,
    images: Array.from(document.images).map(i => ({
        src: i.currentSrc || i.src, w: i.naturalWidth, h: i.naturalHeight})),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    next: (document.querySelector('a.right-next') || {}).href || null,
})"""


def _visit(context, url: str, origin: str) -> PageReport:
    report = PageReport(url)
    page = context.new_page()

    def on_console(message) -> None:
        if message.type == "error":
            report.console_errors.append(message.text)

    def on_response(response) -> None:
        if response.status >= 400:
            report.failed_requests.append(f"{response.url}: HTTP {response.status}")

    def only_local(route) -> None:
        if route.request.url.startswith(origin):
            route.continue_()
        else:
            report.external_requests.append(route.request.url)
            route.abort()

    page.on("console", on_console)
    page.on("pageerror", lambda error: report.console_errors.append(f"uncaught: {error}"))
    page.on("requestfailed", lambda r: report.failed_requests.append(f"{r.url}: {r.failure}"))
    page.on("response", on_response)
    page.route("**/*", only_local)
    page.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_MS)
    # Every image counts, including any the browser would defer until scrolled to.
    page.evaluate("() => document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    if page.locator(".math").count():
        page.wait_for_function(
            "() => window.MathJax && MathJax.startup && MathJax.startup.promise",
            timeout=PAGE_TIMEOUT_MS,
        )
        page.evaluate("() => MathJax.startup.promise")
    page.wait_for_function(
        "() => Array.from(document.images).every(i => i.complete)", timeout=PAGE_TIMEOUT_MS
    )
    page.wait_for_load_state("networkidle", timeout=PAGE_TIMEOUT_MS)
    seen = page.evaluate(_READ_PAGE)
    report.math_elements = seen["math"]
    report.math_unrendered = seen["unrendered"]
    report.math_errors = seen["mathErrors"]
    report.images = len(seen["images"])
    report.bad_images = [i["src"] for i in seen["images"] if not (i["w"] > 0 and i["h"] > 0)]
    report.overflowing_code = page.evaluate(_OVERFLOWING_CODE)
    report.links = [urldefrag(link).url for link in seen["links"]]
    report.next_page = urldefrag(seen["next"]).url if seen["next"] else None
    name = urlsplit(url).path.strip("/").replace("/", "__") or "index"
    report.screenshot = SCREENSHOTS / f"{Path(name).stem}.png"
    # Full page, cut at a height past which a screenshot costs seconds and shows little.
    height = min(page.evaluate("document.documentElement.scrollHeight"), SCREENSHOT_MAX_PX)
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height}
    page.screenshot(path=str(report.screenshot), full_page=True, clip=clip)
    page.close()
    return report


@pytest.fixture(scope="module")
def crawl(server, browser) -> dict[str, PageReport]:
    """Every HTML page reachable by links from the landing page, loaded in Chromium."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    context = browser.new_context(viewport=VIEWPORT)
    start = urljoin(server, "intro.html")
    reports: dict[str, PageReport] = {}
    queue = deque([start])
    while queue:
        url = queue.popleft()
        if url in reports:
            continue
        reports[url] = report = _visit(context, url, server)
        for link in report.links:
            if link.startswith(server) and urlsplit(link).path.endswith(".html"):
                queue.append(link)
    context.close()
    return reports


def _problems(crawl: dict[str, PageReport], attribute: str) -> dict[str, list]:
    return {url: getattr(r, attribute) for url, r in crawl.items() if getattr(r, attribute)}


def test_landing_page_redirect(server, browser):
    page = browser.new_page()
    page.goto(urljoin(server, "index.html"))
    page.wait_for_url("**/intro.html", timeout=PAGE_TIMEOUT_MS)
    assert page.title().startswith("The causal language-model loss")
    page.close()


def test_navigation_reaches_every_notebook(server, crawl):
    expected = {urljoin(server, _page_name(nb)) for nb in _notebooks()}
    assert expected <= set(crawl), f"unreachable: {sorted(expected - set(crawl))}"


def test_next_links_walk_through_the_notebooks_in_order(server, crawl):
    chain, url = [], crawl[urljoin(server, "intro.html")].next_page
    while url is not None and "/notebooks/" in url:
        chain.append(url)
        url = crawl[url].next_page
    assert chain == [urljoin(server, _page_name(nb)) for nb in _notebooks()]


def test_pages_have_no_console_errors(crawl):
    assert not _problems(crawl, "console_errors")


def test_every_request_succeeds(crawl):
    assert not _problems(crawl, "failed_requests")


def test_no_request_leaves_the_site(crawl):
    assert not _problems(crawl, "external_requests")


def test_every_local_link_resolves(server, crawl):
    # Pages are checked by the crawl; this covers the rest (notebook downloads, sources).
    targets = {
        link
        for report in crawl.values()
        for link in report.links
        if link.startswith(server) and not urlsplit(link).path.endswith(".html")
    }
    broken = []
    for link in sorted(targets):
        try:
            with urllib.request.urlopen(link, timeout=10) as response:
                response.read(1)
        except urllib.error.HTTPError as error:
            broken.append(f"{link}: HTTP {error.code}")
    assert not broken


def test_maths_is_rendered(server, crawl):
    with_math = {url: r for url, r in crawl.items() if r.math_elements}
    assert urljoin(server, "intro.html") in with_math
    assert not {u: r.math_unrendered for u, r in with_math.items() if r.math_unrendered}
    assert not {u: r.math_errors for u, r in with_math.items() if r.math_errors}


def test_every_image_loads(crawl):
    assert not _problems(crawl, "bad_images")


def test_notebook_figures_are_on_their_pages(server, crawl):
    for notebook in _notebooks():
        _, images = _visible_outputs(notebook)
        assert crawl[urljoin(server, _page_name(notebook))].images >= images, notebook.name


def test_every_page_has_a_screenshot(crawl):
    for report in crawl.values():
        assert report.screenshot.is_file() and report.screenshot.stat().st_size > 0


def test_notebook_code_fits_the_column(server, crawl):
    # Printed library source and a few f-strings run past the ~105 characters the column
    # shows at 1280 px; book/_static/code_width.css wraps them instead of scrolling.
    pages = [urljoin(server, _page_name(nb)) for nb in _notebooks()]
    overflowing = {url: crawl[url].overflowing_code for url in pages if crawl[url].overflowing_code}
    assert not overflowing, f"code or output blocks that scroll sideways: {overflowing}"


def test_overflow_check_sees_a_wide_line(browser):
    # The check itself, on a cell as myst-nb writes it: a 200-character line scrolls in a
    # 600 px column without the book's stylesheet and wraps with it.
    line = "x = " + " + ".join(["value"] * 40)
    cell = (
        '<div style="width: 600px"><div class="cell"><div class="cell_output">'
        f'<div class="output highlight-python"><div class="highlight"><pre>{line}</pre></div></div>'
        "</div></div></div>"
    )
    page = browser.new_page()
    page.set_content(cell)
    assert page.evaluate(_OVERFLOWING_CODE) == [line[:60]]
    css = (BOOK / "_static" / "code_width.css").read_text()
    page.set_content(f"<style>{css}</style>{cell}")
    assert page.evaluate(_OVERFLOWING_CODE) == []
    page.close()
