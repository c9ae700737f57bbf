"""microcnn report: an index, one titled page per notebook and one stylesheet, all readable offline.

The repository's notebooks are rendered with their stored outputs (no kernel: fast); two tests run a
real kernel on a tiny notebook. Expected titles and headings are read from the notebooks' Markdown
source here, independently of the renderer. The browser-level check (pages open offline, images
load, formulas lay out) is tests/browser/test_report_offline.py.
"""

import base64
import html
import io
import os
import re
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pytest
from matplotlib.figure import Figure
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from microcnn.cli import main
from microcnn.errors import InputError, MicrocnnError
from microcnn.plots import save_figure
from microcnn.report import (
    NOTEBOOK_DIR,
    FormulaError,
    FormulaWarning,
    latex_to_mathml,
    render_report,
)

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

TABLE_AND_FIGURE = """
import matplotlib.pyplot as plt
import pandas as pd
import microcnn
table = pd.DataFrame({"Precision": ["FP32", "INT8"], "Accuracy (%)": [98.25, 98.0]})
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot([0, 1], [0, 1])
ax.set_xlabel("x")
ax.set_ylabel("y")
from IPython.display import display
display(fig)
plt.close(fig)
print("microcnn from", microcnn.__file__)
table
"""


def _write(path, cells):
    cells = [c if isinstance(c, dict) else new_code_cell(c) for c in cells]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _markdown_headings(path) -> list[tuple[int, str]]:
    """(level, text) of the ATX headings of a notebook's Markdown cells, outside code fences."""
    out = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        fenced = False
        for line in cell.source.splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
            m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if m and not fenced:
                text = re.sub(r"[`*_]", "", m.group(2))  # inline code and emphasis marks
                out.append((len(m.group(1)), text))
    return out


def _title(page: str) -> str:
    (title,) = re.findall(r"<title>(.*?)</title>", page, re.S)
    return html.unescape(title)


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def _images(page: str) -> list[str]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=\s]+)"', page)
    return [re.sub(r"\s", "", m) for m in found]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The repository's notebooks rendered with their stored outputs, with and without code."""
    out = {}
    for hide in (False, True):
        d = tmp_path_factory.mktemp("hidden" if hide else "shown")
        written = render_report(out_dir=d, execute=False, hide_code=hide, progress=False)
        out[hide] = (d, written)
    return out


# ------------------------------------------------------------------------------ the repository's notebooks
def test_writes_index_pages_and_one_stylesheet(stored):
    d, written = stored[False]
    assert written == [d / f"{p.stem}.html" for p in NOTEBOOKS] + [d / "index.html", d / "style.css"]
    assert sorted(os.listdir(d)) == sorted(p.name for p in written)  # nothing else, no temporary left


def test_every_page_has_its_notebooks_title(stored):
    d, _ = stored[False]
    for nb in NOTEBOOKS:
        level, first = _markdown_headings(nb)[0]
        page = (d / f"{nb.stem}.html").read_text()
        assert _title(page) == first != "Notebook"
        assert 'href="index.html"' in page  # back to the contents


def test_index_lists_every_notebook_with_its_headings_linked(stored):
    d, _ = stored[False]
    index = (d / "index.html").read_text()
    anchors = re.findall(r'<a[^>]*href="([^"]+)"[^>]*>(.*?)</a>', index)
    links = [(href, _text(inner)) for href, inner in anchors]
    for nb in NOTEBOOKS:
        headings = _markdown_headings(nb)
        page = (d / f"{nb.stem}.html").read_text()
        ids = set(re.findall(r'<h[1-6] id="([^"]+)"', page))
        assert (f"{nb.stem}.html", headings[0][1]) in links, nb.name
        for _, text in headings[1:]:
            targets = [href for href, label in links if label == text and href.startswith(f"{nb.stem}.html#")]
            assert targets, (nb.name, text)
            assert targets[0].split("#", 1)[1] in ids  # the link lands on the heading
        assert nb.name in index
    # In notebook order.
    assert [index.index(f'href="{nb.stem}.html"') for nb in NOTEBOOKS] == \
        sorted(index.index(f'href="{nb.stem}.html"') for nb in NOTEBOOKS)


def test_no_page_loads_anything_from_a_network(stored):
    for hide in (False, True):
        d, written = stored[hide]
        for path in written:
            text = path.read_text()
            assert "<script" not in text.lower(), path  # no require.js, MathJax or widget manager
            refs = re.findall(r'<(?:link|img|iframe|source|video|audio|embed|object)\b[^>]*?'
                              r'(?:src|href|data)="([^"]*)"', text, re.I)
            refs += [r for pair in re.findall(r"@import\s+['\"]?([^'\";]+)|url\(\s*['\"]?([^'\")]+)", text)
                     for r in pair if r]
            remote = [r for r in refs if re.match(r"\s*(https?:)?//", r, re.I)]
            assert not remote, (path, remote)
    style = stored[False][0] / "style.css"
    assert "http" not in style.read_text() and ".highlight" in style.read_text()


def test_no_execute_shows_the_stored_outputs(stored):
    d, _ = stored[False]
    for nb_path in NOTEBOOKS:
        page = (d / f"{nb_path.stem}.html").read_text()
        shown = set(_images(page))
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                if "image/png" in data:
                    assert re.sub(r"\s", "", data["image/png"]) in shown, nb_path.name
                if out.output_type == "stream":
                    for line in out.text.strip().splitlines()[:3]:
                        assert html.escape(line.strip(), quote=False) in page, (nb_path.name, line)
                if WIDGET_VIEW in data:  # a stored widget shows its preview, or says it has none
                    assert "VBox(children" not in page and "HBox(children" not in page


def test_hide_code_removes_inputs_and_keeps_outputs(stored):
    shown, hidden = stored[False][0], stored[True][0]
    for nb in NOTEBOOKS:
        with_code = (shown / f"{nb.stem}.html").read_text()
        without = (hidden / f"{nb.stem}.html").read_text()
        assert with_code.count('class="input_area"') > 0
        assert 'class="input_area"' not in without and "input_prompt" not in without
        assert _images(without) == _images(with_code)
        assert _title(without) == _title(with_code)


def test_pages_stay_small(stored):
    d, written = stored[False]
    css = (d / "style.css").stat().st_size
    for path in written[:-2]:
        page = path.read_text()
        assert page.count('<link rel="stylesheet" href="style.css">') == 1
        overhead = len(page.encode()) - sum(len(i) for i in _images(page))  # beyond the figures themselves
        # 96 KB: notebook 03, which writes the integer arithmetic out, carries ~14 KB of MathML and the
        # worked example's code and tables (~79 KB in all); a page inlining its CSS or scripts is far larger
        assert overhead < 96_000, (path.name, overhead)
        # DataFrames' own scoped styles, ~230 bytes a table (notebook 03 shows 9 tables: ~2.1 KB)
        styles = sum(len(s) for s in re.findall(r"<style.*?</style>", page, re.S))
        assert styles < css / 3
    assert css < 32_000


# ------------------------------------------------------------------------------------ formulas
FORMULAS = [
    # (LaTeX, MathML elements it must produce)
    (r"s = \frac{x_{\max} - x_{\min}}{2^b - 1}", ["mfrac", "msub", "msup"]),
    (r"q = \mathrm{clamp}\left(\left\lfloor \frac{x}{s} \right\rceil + z,\; 0,\; 2^b - 1\right)", ["mfrac"]),
    (r"M = \frac{s_w s_x}{s_y} = M_0 \cdot 2^{-n}", ["mfrac", "msup"]),
    (r"\operatorname*{arg\,min}_{V} \left\| W x - \tilde{W} x \right\|_F^2 + \lambda f_{\text{reg}}(V)",
     ["msubsup", "mover", "mtext"]),
    (r"\arg\min_V f(V)", ["msub"]),
    (r"\begin{aligned} a &= b + c \\ d &= e \end{aligned}", ["mtable", "mtr"]),
    (r"\begin{equation} y = \sum_{k} W_{c,k} x_k \end{equation}", ["msub"]),
    (r"\hat{x} = s\,(q - z)", ["mover"]),
    (r"\mathbb{E}[W\epsilon]", ["mi"]),
]


@pytest.mark.parametrize("latex, elements", FORMULAS)
def test_formulas_become_mathml(latex, elements):
    for display in (False, True):
        out = latex_to_mathml(latex, display=display)
        assert out.startswith('<math xmlns="http://www.w3.org/1998/Math/MathML"')
        assert f'display="{"block" if display else "inline"}"' in out
        for element in elements:
            assert f"<{element}" in out, (latex, element)
        assert not re.search(r"<m[io][^>]*>\\", out)  # no command left unconverted
        assert html.escape(latex.strip()) in out  # the source kept as an annotation


@pytest.mark.parametrize("latex", [r"\frac{", r"\foo x", r"a & b"])
def test_unconvertible_formulas_are_refused(latex):
    with pytest.raises(FormulaError, match="formula"):
        latex_to_mathml(latex)


def test_markdown_formulas_render_as_mathml_and_bad_ones_as_source(tmp_path):
    nb = _write(tmp_path / "math.ipynb", [new_markdown_cell(
        "# Scale and zero point\n\n"
        "Inline $s = \\frac{a}{b}$ and `$5 in code$`, then a display:\n\n"
        "$$z = \\operatorname{round}\\left(-\\frac{x_{\\min}}{s}\\right)$$\n\n"
        "\\begin{equation}\nq = x / s\n\\end{equation}\n\n"
        "## Scale $s$ and point $z_q$\n\n"
        "## Broken\n\nThis one: $\\foo x$.\n")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        render_report([nb], out_dir=tmp_path / "r", execute=False, progress=False)
    page = (tmp_path / "r" / "math.html").read_text()
    maths = re.findall(r"<math\b[^>]*>", page)
    assert len(maths) == 5 and sum('display="block"' in m for m in maths) == 2
    assert ":math" not in page  # no namespace prefix (a browser would not draw ns0:math)
    (heading,) = re.findall(r'<h2 id="([^"]+)">Scale <math.*?</h2>', page, re.S)
    index = (tmp_path / "r" / "index.html").read_text()
    assert f'<a href="math.html#{heading}">Scale s and point z_q</a>' in index
    assert "<code>$5 in code$</code>" in page  # code spans stay code
    assert '<code class="math-unrendered" title="formula not rendered">$\\foo x$</code>' in page
    messages = [str(w.message) for w in caught if issubclass(w.category, FormulaWarning)]
    assert len(messages) == 1 and "math.ipynb" in messages[0] and "\\foo" in messages[0]
    assert _title(page) == "Scale and zero point"


# ------------------------------------------------------------------------------------ widgets
def test_widget_outputs_show_their_static_preview(tmp_path):
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, np.zeros((6, 9)), format="png")
    png = base64.b64encode(buf.getvalue()).decode()
    view = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    with_preview = new_code_cell("explorer(...)", outputs=[new_output(
        "execute_result", execution_count=1,
        data={WIDGET_VIEW: view, "text/plain": "Explorer (static preview): test image 3", "image/png": png})])
    without = new_code_cell("old_widget()", outputs=[new_output(
        "display_data", data={WIDGET_VIEW: view, "text/plain": "VBox(children=(IntSlider(value=0),))"})])
    nb = _write(tmp_path / "w.ipynb", [new_markdown_cell("# Widgets"), with_preview, without])
    saved = nbformat.read(nb, as_version=4)  # the widget state nbclient saves: of no use without a kernel
    saved.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {},
                                                                                "version_major": 2}}
    nbformat.write(saved, nb)
    render_report([nb], out_dir=tmp_path / "r", execute=False, progress=False)
    page = (tmp_path / "r" / "w.html").read_text()
    assert _images(page) == [png]
    assert "Explorer (static preview): test image 3" in page
    assert "no static preview was stored" in page
    assert "VBox(children" not in page and WIDGET_VIEW not in page and "<script" not in page


# ------------------------------------------------------------------------------------ execution
def test_executes_and_renders_table_and_png(tmp_path):
    import microcnn

    nb_path = _write(tmp_path / "tiny.ipynb", [new_markdown_cell("# Tiny"), TABLE_AND_FIGURE])
    out = render_report([nb_path], out_dir=tmp_path / "reports", progress=False, timeout=120)
    assert out[0] == tmp_path / "reports" / "tiny.html"
    page = out[0].read_text()
    # The DataFrame rendered as an HTML table with its values.
    table = re.search(r"<table.*?</table>", page, re.S)
    assert table is not None
    for text in ("Precision", "Accuracy (%)", "FP32", "INT8", "98.25"):
        assert text in table.group(0)
    # The figure embedded as a real PNG (decodes and starts with the PNG signature).
    (image,) = _images(page)
    png = base64.b64decode(image)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # The kernel imported this checkout's microcnn, not some other copy.
    assert f"microcnn from {microcnn.__file__}" in page
    assert "executed for this report" in (tmp_path / "reports" / "index.html").read_text()
    # And it was shut down: no kernel process is left as our child.
    assert not [cmd for cmd in _child_commands() if b"ipykernel_launcher" in cmd]


def _child_commands() -> list[bytes]:
    out = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            if proc.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.append((proc / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            continue  # processes come and go while we look
    return out


def test_failing_cell_still_writes_the_report_then_raises(tmp_path):
    good = _write(tmp_path / "good.ipynb", [new_markdown_cell("# Good"), "print('fine 456')"])
    broken = _write(tmp_path / "broken.ipynb", ["print('before')", "raise RuntimeError('boom 123')"])
    with pytest.raises(MicrocnnError, match=r"broken\.ipynb.*boom 123"):
        render_report([good, broken], out_dir=tmp_path / "r", progress=False)
    page = (tmp_path / "r" / "broken.html").read_text()
    assert "before" in page and "boom 123" in page and "did not run to the end" in page
    assert _title(page) == "broken"  # no heading: the file's name
    assert "fine 456" in (tmp_path / "r" / "good.html").read_text()
    index = (tmp_path / "r" / "index.html").read_text()
    assert re.search(r'href="broken.html">broken</a>.*did not run to the end', index, re.S)


def test_a_cell_over_the_timeout_is_stopped_and_reported(tmp_path):
    nb = _write(tmp_path / "slow.ipynb", ["print('started')", "import time\ntime.sleep(60)"])
    with pytest.raises(MicrocnnError, match=r"slow\.ipynb: a cell ran longer than the timeout of 2 s"):
        render_report([nb], out_dir=tmp_path / "r", progress=False, timeout=2)
    page = (tmp_path / "r" / "slow.html").read_text()
    assert "started" in page and "did not run to the end" in page
    assert not [cmd for cmd in _child_commands() if b"ipykernel_launcher" in cmd]


def test_markdown_images_are_embedded(tmp_path):
    from matplotlib.image import imsave

    imsave(tmp_path / "diagram.png", np.eye(4))
    nb = _write(tmp_path / "pic.ipynb", [new_markdown_cell("# Picture\n\n![a diagram](diagram.png)")])
    render_report([nb], out_dir=tmp_path / "r", execute=False, progress=False)
    page = (tmp_path / "r" / "pic.html").read_text()
    assert _images(page) == [base64.b64encode((tmp_path / "diagram.png").read_bytes()).decode()]


def test_bad_paths_and_timeouts_are_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        render_report([tmp_path / "missing.ipynb"], out_dir=tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"expected \.ipynb"):
        render_report([tmp_path / "notes.txt"], out_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match="empty list"):
        render_report([], out_dir=tmp_path, progress=False)
    (tmp_path / "a").mkdir()
    twins = [_write(tmp_path / "x.ipynb", ["1"]), _write(tmp_path / "a" / "x.ipynb", ["1"])]
    with pytest.raises(InputError, match="both be written as x.html"):
        render_report(twins, out_dir=tmp_path / "r", progress=False)
    with pytest.raises(InputError, match="table of contents"):
        render_report([_write(tmp_path / "index.ipynb", ["1"])], out_dir=tmp_path / "r", progress=False)
    for bad in (0, -1, float("nan"), "10", True):
        with pytest.raises(InputError, match="timeout"):
            render_report(twins[:1], out_dir=tmp_path / "r", progress=False, timeout=bad)
    assert not list(tmp_path.rglob("*.html"))


# ------------------------------------------------------------------------------------ command line
def test_cli_writes_once_and_replaces_only_with_force(tmp_path, capsys):
    nb = _write(tmp_path / "one.ipynb", [new_markdown_cell("# One\n\n## Part"), "print(1)"])
    out = tmp_path / "site"
    assert main(["report", "--no-execute", "--hide-code", str(nb), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["index.html", "one.html", "style.css"]
    assert b'class="input_area"' not in first["one.html"] and b"outputs as stored" in first["one.html"]
    (out / "one.html").write_bytes(b"edited")
    assert main(["report", "--no-execute", str(nb), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"microcnn report: error: {out / 'one.html'}: already exists")
    assert (out / "one.html").read_bytes() == b"edited" and sorted(os.listdir(out)) == sorted(first)
    assert main(["report", "--no-execute", "--hide-code", str(nb), "--out", str(out), "--force"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # same input, same bytes


def test_cli_warns_about_a_formula_it_shows_as_source(tmp_path, capsys):
    nb = _write(tmp_path / "f.ipynb", [new_markdown_cell("# F\n\nGood $x^2$, bad $\\nosuch y$.")])
    assert main(["report", "--no-execute", str(nb), "--out", str(tmp_path / "r")]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("microcnn report: warning")]
    assert line == (f"microcnn report: warning: {nb}: formula $\\nosuch y$: not converted: "
                    "<mi>\\nosuch</mi> (shown as LaTeX source)")


def test_cli_refuses_a_bad_timeout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--timeout", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--timeout" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ figure export
def _figure():
    fig = Figure(figsize=(3.0, 2.0))
    fig.add_subplot().plot([0, 1, 2], [2, 0, 1], label="line")
    return fig


@pytest.mark.parametrize("dpi", [72, 150, 300])
def test_save_figure_png_has_the_requested_resolution(tmp_path, dpi):
    from matplotlib.image import imread

    path = save_figure(_figure(), tmp_path / "f.png", dpi=dpi)
    assert path == tmp_path / "f.png"
    image = imread(path)
    assert image.shape[:2] == (round(2.0 * dpi), round(3.0 * dpi))
    assert image.std() > 0  # something was drawn
    assert os.listdir(tmp_path) == ["f.png"]


def test_save_figure_svg_is_vector_and_repeatable(tmp_path):
    import xml.etree.ElementTree as ET

    fig = _figure()
    a, b = save_figure(fig, tmp_path / "a.svg"), save_figure(fig, tmp_path / "b.SVG", dpi=50)
    root = ET.parse(a).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (root.get("width"), root.get("height")) == ("216pt", "144pt")  # 3 x 2 inches
    assert root.findall(".//{http://www.w3.org/2000/svg}path")
    assert a.read_bytes() == b.read_bytes()  # no date, and dpi does not change a vector file


def test_save_figure_refuses_bad_input_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    fig = _figure()
    for name in ("f.jpg", "f", "f.png.txt"):
        with pytest.raises(InputError, match=r"\.png or \.svg"):
            save_figure(fig, tmp_path / name)
    for dpi in (0, 5, 1.5, True, 10_000):
        with pytest.raises(InputError, match="dpi"):
            save_figure(fig, tmp_path / "f.png", dpi=dpi)
    with pytest.raises(InputError, match="Figure"):
        save_figure(np.zeros((2, 2)), tmp_path / "f.png")
    (tmp_path / "old.png").write_bytes(b"old")
    with pytest.raises(InputError, match="already exists"):
        save_figure(fig, tmp_path / "old.png", overwrite=False)

    def fail(f, **kwargs):
        f.write(b"partial")
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(fig, "savefig", fail)
    with pytest.raises(RuntimeError, match="renderer failed"):
        save_figure(fig, tmp_path / "old.png")
    assert os.listdir(tmp_path) == ["old.png"] and (tmp_path / "old.png").read_bytes() == b"old"
