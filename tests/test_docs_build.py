"""The documentation site, built once per test run (in the background, from the moment the tests are
collected: tests/site_build.py) and checked twice: as files, then in a real browser.

The build is strict: a broken link, a missing anchor or reference, or a docstring mkdocstrings cannot read
fails it. It executes every notebook (scripts/mkdocs_hooks.py), so each notebook page carries its figures;
nbval runs the same notebooks as tests, and a failing cell fails both.

The browser check serves the built site on 127.0.0.1 and opens every notebook page, and the pages with
equations, in headless Chromium (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them when
absent), driven by selenium: each figure is present and loaded (natural width > 0), no code cell scrolls
sideways, the equations rendered, and nothing was fetched from outside the site. A screenshot of each
page is saved under a temporary folder, whose path is written to the terminal, for CI to keep.
"""

from __future__ import annotations

import base64
import functools
import http.server
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from site_build import SITE_BUILD, SITE_SCREENSHOTS, start_site_build

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_STEMS = sorted(path.stem for path in (ROOT / "notebooks").glob("*.ipynb"))
WIDGET_STEMS = {
    path.stem for path in (ROOT / "notebooks").glob("*.py") if 'tags=["widget"]' in path.read_text("utf-8")
}
MATH_PAGES = ("concepts/", "api/reference/", "notebooks/04_lambda_scaling_forward/")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def site(request):
    """The site, built with `mkdocs build --strict` (notebooks executed); the build's output is checked.

    The build started in the background when the tests were collected (tests/site_build.py).
    """
    build = request.config.stash.get(SITE_BUILD, None)
    if build is None:  # collected another way: build now
        build = request.config.stash[SITE_BUILD] = start_site_build()
    returncode, output = build.wait()
    assert returncode == 0, output
    warnings = [line for line in output.splitlines() if "WARNING" in line and "IPKernelApp" not in line]
    assert not warnings, output
    return build.site


def test_docs_build_strict_renders_every_page(site):
    for stem in NOTEBOOK_STEMS:
        assert (site / "notebooks" / stem / "index.html").is_file(), f"{stem}.ipynb was not rendered"
    api = {
        page: (site / "api" / page / "index.html").read_text(encoding="utf-8")
        for page in ("reference", "fast")
    }
    assert "init_projections" in api["reference"] and "vera_forward" in api["reference"]
    assert "get_model" in api["fast"] and "VeraModel" in api["fast"]
    assert (site / "assets" / "mathjax" / "tex-svg.js").stat().st_size > 100_000


@pytest.mark.parametrize("stem", NOTEBOOK_STEMS)
def test_notebook_pages_carry_their_outputs_and_no_widget_views(site, stem):
    html = (site / "notebooks" / stem / "index.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html, f"{stem}: no figure on the page (were the notebooks executed?)"
    assert "application/vnd.jupyter.widget-view+json" not in html
    if stem in WIDGET_STEMS:  # the skipped control's note stands where Jupyter shows the control
        assert "An interactive control is here when the notebook runs in Jupyter" in html, stem
    assert '.ipynb"' not in html.split('class="md-content"', 1)[1], f"{stem}: a link still points at a .ipynb"


def test_no_page_loads_anything_from_outside_the_site(site):
    external = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.IGNORECASE)
    offenders = {
        str(page.relative_to(site)): external.findall(page.read_text(encoding="utf-8"))
        for page in site.rglob("*.html")
    }
    assert {page: found for page, found in offenders.items() if found} == {}


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on 127.0.0.1 (an ephemeral port), for as long as the module's tests run."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "headless Chromium is not installed: `apt-get install -y chromium chromium-driver` "
            "(.ci/run does this when it can)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1600,1000")  # a desktop screen, both sidebars shown
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(request):
    """A folder, kept after the run, for CI to collect: the terminal summary names it (tests/conftest.py)."""
    folder = Path(tempfile.mkdtemp(prefix="veralab-site-screenshots-"))
    request.config.stash[SITE_SCREENSHOTS] = folder
    return folder


PAGE_STATE = """
const images = [...document.querySelectorAll('.jupyter-wrapper img')];
const code = [...document.querySelectorAll('.jupyter-wrapper .jp-InputArea pre')];
return {
  images: images.length,
  unloaded: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src.slice(0, 60)),
  code: code.length,
  scrolling: code.filter(p => p.scrollWidth > p.clientWidth + 1)
                 .map(p => p.textContent.split('\\n').reduce((a, b) => a.length > b.length ? a : b)),
  math: document.querySelectorAll('mjx-container').length,
  mathErrors: document.querySelectorAll('mjx-merror').length,
  outside: performance.getEntriesByType('resource').map(r => r.name)
             .filter(n => !n.startsWith(location.origin) && !n.startsWith('data:')),
};
"""


def open_page(driver, url: str, screenshots: Path, name: str) -> dict:
    """Load `url`, wait for MathJax to finish, save a full-page screenshot; the page's state."""
    driver.get(url)
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const wait = () => window.MathJax && MathJax.startup && MathJax.startup.promise"
        "  ? MathJax.startup.promise.then(() => done(true)) : setTimeout(wait, 50);"
        "document.readyState === 'complete' ? wait() : window.addEventListener('load', wait);"
    )
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    (screenshots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
    return driver.execute_script(PAGE_STATE)


@pytest.mark.parametrize("stem", NOTEBOOK_STEMS)
def test_notebook_page_in_chromium_shows_its_figures_and_fits_its_code(browser, served, screenshots, stem):
    browser.set_script_timeout(60)
    state = open_page(browser, f"{served}notebooks/{stem}/", screenshots, stem)
    assert state["images"] > 0, f"{stem}: no figure on the page"
    assert state["unloaded"] == [], f"{stem}: figures not loaded: {state['unloaded']}"
    assert state["code"] > 0
    assert state["scrolling"] == [], f"{stem}: code cells scroll sideways, e.g. {state['scrolling'][:3]}"
    assert state["mathErrors"] == 0
    assert state["outside"] == [], f"{stem}: fetched from outside the site: {state['outside']}"


@pytest.mark.parametrize("page", MATH_PAGES)
def test_equations_render_as_math_in_chromium(browser, served, screenshots, page):
    browser.set_script_timeout(60)
    state = open_page(browser, served + page, screenshots, page.strip("/").replace("/", "_"))
    assert state["math"] > 0, f"{page}: no rendered equation"
    assert state["mathErrors"] == 0, f"{page}: {state['mathErrors']} equations failed to render"
    assert state["outside"] == [], f"{page}: fetched from outside the site: {state['outside']}"
