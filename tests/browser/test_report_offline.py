"""``microcnn report`` in a real browser with no network: every page opens, shows its figures and
draws its formulas, with nothing fetched and no console error.

Runs only with MICROCNN_BROWSER=1 (see conftest.py); ``bash tests/browser/run.sh`` sets it up.
The report is rendered from the notebooks' stored outputs (``--no-execute``) plus one small notebook
made here whose formulas cover what the quantization notebooks write (fractions, sub/superscripts,
floor brackets, an aligned block).
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tests.test_report import _markdown_headings

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--allow-file-access-from-files"]

FORMULAS_MD = r"""# Formulas

Affine quantization maps a real $x$ to an integer $q = \left\lfloor \frac{x}{s} \right\rceil + z$ with

$$s = \frac{x_{\max} - x_{\min}}{2^b - 1}, \qquad z = -\left\lfloor \frac{x_{\min}}{s} \right\rceil$$

and requantization uses $M = \frac{s_w s_x}{s_y} = M_0 \cdot 2^{-n}$.

## Requantization with $M_0$ and $n$

$$\begin{aligned} \hat{x} &= s\,(q - z) \\ \epsilon &= x - \hat{x} \end{aligned}$$
"""


def _figure_png() -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot().plot([0, 1, 2], [0, 1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _headings(path) -> list[str]:
    """Markdown heading texts of a notebook (outside code fences)."""
    return [text for _, text in _markdown_headings(path)]


def _formula_count(path) -> int:
    """``$...$`` and ``$$...$$`` formulas in a notebook's Markdown, code spans and fences left out."""
    n = 0
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            text = re.sub(r"```.*?```|`[^`\n]*`", " ", cell.source, flags=re.S)
            display = re.findall(r"\$\$.+?\$\$", text, flags=re.S)
            text = re.sub(r"\$\$.+?\$\$", " ", text, flags=re.S)
            n += len(display) + len(re.findall(r"(?<!\\)\$[^$\n]+?(?<!\\)\$", text))
    return n


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from microcnn.cli import main

    tmp = tmp_path_factory.mktemp("report")
    extra = tmp / "nb" / "zz_formulas.ipynb"
    extra.parent.mkdir()
    nb = new_notebook(cells=[
        new_markdown_cell(FORMULAS_MD),
        new_code_cell("plot()", outputs=[new_output("display_data", data={"image/png": _figure_png(),
                                                                          "text/plain": "<Figure>"})])])
    nbformat.write(nb, extra)
    out = tmp / "site"
    assert main(["report", "--no-execute", *map(str, NOTEBOOKS), str(extra), "--out", str(out)]) == 0
    return out, {p.stem: p for p in [*NOTEBOOKS, extra]}


def test_report_opens_offline_and_every_page_renders(report):
    from playwright.sync_api import sync_playwright

    site, sources = report
    requested, blocked, problems = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})

            def block(route):
                blocked.append(route.request.url)
                route.abort()

            context.route(re.compile(r"^(?!file:|data:)"), block)  # anything that is not a local file
            context.on("request", lambda r: requested.append(r.url))
            page = context.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))

            page.goto((site / "index.html").as_uri())
            assert page.title() == "microcnn notebooks"
            links = page.eval_on_selector_all(".report-toc a", "els => els.map(a => a.href)")
            pages = list(dict.fromkeys(urldefrag(link).url for link in links))
            assert [Path(urlparse(u).path).stem for u in pages] == list(sources)  # every notebook, in order
            page.screenshot(path=str(site / "browser_index.png"))

            for url in pages:
                stem = Path(urlparse(url).path).stem
                page.goto(url)
                page.wait_for_load_state("load")
                headings = _headings(sources[stem])
                assert page.title() == headings[0], stem

                # Figures: every image decoded (a blocked or broken one has naturalWidth 0), at least one.
                images = page.eval_on_selector_all("main img",
                                                   "els => els.map(i => [i.complete, i.naturalWidth])")
                assert images and all(done and width > 0 for done, width in images), (stem, images)

                # Formulas: one <math> per formula in the source, each laid out with a size, none left as
                # source; a fraction is drawn as a fraction (numerator above denominator).
                count = _formula_count(sources[stem])
                boxes = page.eval_on_selector_all(
                    "main math", "els => els.map(m => {const r = m.getBoundingClientRect(); "
                                 "return [r.width, r.height];})")
                assert len(boxes) == count, (stem, len(boxes), count)
                assert all(w > 0 and h > 0 for w, h in boxes), (stem, boxes)
                assert page.locator(".math-unrendered").count() == 0, stem
                fractions = page.eval_on_selector_all(
                    "main mfrac", "els => els.map(f => [f.children[0].getBoundingClientRect().bottom, "
                                  "f.children[1].getBoundingClientRect().top])")
                assert all(num_bottom <= den_top + 1 for num_bottom, den_top in fractions), (stem, fractions)
                if stem == "zz_formulas":
                    assert count == 7 and len(fractions) >= 4
                    assert page.locator("main math mtable").count() == 1  # the aligned block
                    page.screenshot(path=str(site / "browser_formulas.png"), full_page=True)

                # Every index link into this page lands on an element of it.
                for link in links:
                    base, fragment = urldefrag(link)
                    if base == url and fragment:
                        assert page.evaluate("f => !!(document.getElementById(f) || "
                                             "document.getElementById(decodeURIComponent(f)))", fragment), \
                            (stem, fragment)
                if stem.startswith("05"):
                    page.screenshot(path=str(site / "browser_05_report.png"), full_page=True)
                assert page.locator("text=VBox(children").count() == 0
        finally:
            browser.close()
    assert not blocked, blocked
    assert all(urlparse(u).scheme in ("file", "data") for u in requested), requested
    assert not problems, problems
