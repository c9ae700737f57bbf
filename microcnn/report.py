"""Rendered reports: the notebooks as a small static site that works offline.

``microcnn report`` calls ``render_report``, which writes into one directory:

* ``index.html``: a table of contents, each notebook's title (its first heading) and headings, linked;
* one ``<notebook>.html`` page per notebook, titled with the notebook's own title;
* ``style.css``: the one stylesheet every page links to (no page inlines its own copy).

Nothing in a page is fetched from a network: no script or stylesheet from a CDN (no require.js, no
MathJax, no widget manager). Formulas in Markdown cells become MathML at report time (Chromium and
Firefox draw it natively). Widget outputs, which need a live kernel, show the static preview the
widget stored with them (``microcnn.widgets``: an image of the current view and a line of text).

Notebooks are executed in a fresh kernel first (``execute=True``), or rendered with their stored
outputs. The kernel runs the Python of the current process (not whatever kernel named "python3"
happens to be installed), and it imports the same microcnn package as the caller, so a report always
shows the code that asked for it.
"""

from __future__ import annotations

import copy
import html
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .errors import InputError, MicrocnnError
from .fileutil import all_or_nothing, atomic_write_bytes, check_destination

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
INDEX = "index.html"
STYLESHEET = "style.css"
_CURRENT_ENV = "microcnn-current-env"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


# ------------------------------------------------------------------------------------ execution
def _kernel_manager():
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class CurrentEnvSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name == _CURRENT_ENV:
                return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                              **ipykernel.kernelspec.get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    # Async: with a blocking kernel client, nbclient waits for output inside its event loop and a
    # cell's timeout never fires.
    return AsyncKernelManager(kernel_name=_CURRENT_ENV, kernel_spec_manager=CurrentEnvSpecs())


def _kernel_env() -> dict:
    # Put this microcnn first on the kernel's path: notebooks run from notebooks/, where an
    # uninstalled checkout would not be importable, or an installed older copy would win.
    package_root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=package_root + (os.pathsep + path if path else ""))


def notebook_paths(paths) -> list[Path]:
    """The notebooks to run: ``paths`` (one or several .ipynb files), or every notebook of notebooks/."""
    if paths is None:
        found = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
        if not found:
            raise InputError(f"notebooks: expected *.ipynb files in {NOTEBOOK_DIR}, found none")
        return found
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        if p.suffix != ".ipynb":
            raise InputError(f"notebooks: expected .ipynb files, found {p}")
        if not p.is_file():
            raise InputError(f"notebooks: {p} does not exist")
        out.append(p)
    if not out:
        raise InputError("notebooks: expected at least one notebook, found an empty list")
    pages: dict[str, Path] = {}
    for p in out:  # one page per notebook: two notebooks must not share a page, nor take the index's
        page = page_name(p)
        if page == INDEX:
            raise InputError(f"notebooks: {p} would be written as {INDEX}, which is the report's table "
                             "of contents; rename the notebook")
        if page in pages:
            raise InputError(f"notebooks: {pages[page]} and {p} would both be written as {page}; "
                             "render them into separate directories")
        pages[page] = p
    return out


def page_name(notebook) -> str:
    """The report page of a notebook: ``05_prediction.ipynb`` -> ``05_prediction.html``."""
    return f"{Path(notebook).stem}.html"


def report_destinations(notebooks, out_dir) -> list[Path]:
    """Every file ``render_report`` writes for these notebooks: the pages first, then the index and the
    stylesheet."""
    out_dir = Path(out_dir)
    return [out_dir / page_name(p) for p in notebooks] + [out_dir / INDEX, out_dir / STYLESHEET]


class NotebookError(MicrocnnError):
    """A notebook cell failed or timed out while executing; ``notebook`` is the executed notebook (with
    the error output), so the report can still show it."""

    def __init__(self, message: str, notebook):
        super().__init__(message)
        self.notebook = notebook


def execute_notebook(path, timeout: int = 600):
    """Run every cell of the notebook at ``path`` in its own directory; return the executed notebook.
    ``timeout``: seconds any one cell may run.

    On a failing cell raises ``NotebookError`` (a ``MicrocnnError``) naming the notebook; the notebook
    (with the error output) is the exception's ``notebook`` attribute.
    """
    import nbformat
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    km = _kernel_manager()
    client = NotebookClient(nb, km=km, timeout=timeout,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        client.execute(env=_kernel_env())
    except CellExecutionError as exc:
        raise NotebookError(f"{path}: a cell failed while executing the notebook: "
                            f"{str(exc).strip().splitlines()[-1]}", nb) from exc
    except TimeoutError as exc:  # nbclient's CellTimeoutError
        raise NotebookError(f"{path}: a cell ran longer than the timeout of {timeout} s", nb) from exc
    finally:
        if km.has_kernel:  # a kernel manager handed to nbclient is ours to shut down
            run_sync(km.shutdown_kernel)(now=True)
    return nb


# ------------------------------------------------------------------------------------ formulas
# latex2mathml gaps, rewritten to forms it converts (checked in tests/test_report.py).
_LATEX_REWRITES = [
    (re.compile(r"\\(begin|end)\{(aligned|align\*?|eqnarray\*?)\}"), r"\\\1{align*}"),
    (re.compile(r"\\(begin|end)\{(equation\*?|displaymath)\}"), ""),
    (re.compile(r"\\operatorname\*\{([^{}]*)\}"), r"\\mathop{\\mathrm{\1}}"),
    (re.compile(r"\\arg(?![A-Za-z])"), r"\\operatorname{arg}"),
]
# latex2mathml passes a command it does not know through as a literal "\name" in an <mi> or <mo>,
# and an alignment "&" outside a table as an <mi>: such output is not a rendered formula.
_UNCONVERTED = re.compile(r"<m[io][^>]*>(?:\\[A-Za-z]+|&amp;|&)</m[io]>")


class FormulaError(MicrocnnError):
    """A LaTeX formula that could not be converted to MathML."""


class FormulaWarning(UserWarning):
    """A report page shows a formula as its LaTeX source, because it could not be converted."""


def latex_to_mathml(latex: str, display: bool = False) -> str:
    """A ``<math>`` element for a LaTeX formula (as written between ``$...$`` or ``$$...$$``).

    Raises ``FormulaError`` naming the formula when it uses something the converter does not know
    (an unknown command would otherwise be shown as its raw name)."""
    from latex2mathml.converter import convert

    source = latex.strip()
    for pattern, replacement in _LATEX_REWRITES:
        source = pattern.sub(replacement, source)
    try:
        mathml = convert(source, display="block" if display else "inline")
    except Exception as exc:  # the converter's own errors have no common base class
        raise FormulaError(f"formula ${latex.strip()}$: {type(exc).__name__} {exc}".strip()) from exc
    # Accents as spacing modifier letters (what MathJax draws), not the ASCII ^ and ~ the converter emits.
    mathml = re.sub(r"(<mo[^>]*>)&#x0005E;(</mo></mover>)", r"\1&#x002C6;\2", mathml)
    mathml = re.sub(r"(<mo[^>]*>)&#x0007E;(</mo></mover>)", r"\1&#x002DC;\2", mathml)
    bad = _UNCONVERTED.search(mathml)
    if bad:
        raise FormulaError(f"formula ${latex.strip()}$: not converted: {html.unescape(bad.group(0))}")
    # Keep the source for copy and paste, as MathJax does.
    annotation = f'<annotation encoding="application/x-tex">{html.escape(latex.strip())}</annotation>'
    return re.sub(r"^(<math[^>]*>)(.*)</math>$",
                  lambda m: f"{m.group(1)}<semantics>{m.group(2)}{annotation}</semantics></math>",
                  mathml, flags=re.S)


def _math_renderer_class():
    from nbconvert.filters.markdown_mistune import IPythonRenderer

    class MathMLRenderer(IPythonRenderer):
        """Markdown with formulas as MathML instead of ``$...$`` text left for MathJax."""

        def __init__(self, *args, unrendered: list, **kwargs):
            super().__init__(*args, **kwargs)
            self.unrendered = unrendered

        def _formula(self, latex: str, display: bool, shown: str) -> str:
            try:
                return latex_to_mathml(latex, display)
            except FormulaError as exc:
                self.unrendered.append(str(exc))
                tag = "pre" if display else "code"
                return (f'<{tag} class="math-unrendered" title="formula not rendered">'
                        f"{html.escape(shown)}</{tag}>")

        def heading(self, text: str, level: int, **attrs) -> str:
            # nbconvert's add_anchor re-serializes the heading through ElementTree, which renames a
            # formula's tags (ns0:math: no longer drawn) and leaves a heading it cannot parse without
            # an id. Same ids as nbconvert's otherwise: the text, spaces as "-", URL-quoted.
            anchor = html.escape(quote(_plain_text(text).replace(" ", "-"), safe="?/:@!$&'()*+,;="))
            link = ("" if self.exclude_anchor_links else
                    f'<a class="anchor-link" href="#{anchor}">{self.anchor_link_text}</a>')
            return f'<h{level} id="{anchor}">{text}{link}</h{level}>\n'

        def inline_math(self, body: str) -> str:
            return self._formula(body, False, f"${body}$")

        def block_math(self, body: str) -> str:
            return self._formula(body, True, f"$${body}$$")

        def multiline_math(self, text: str) -> str:
            return self._formula(text.strip("$"), True, text)

        def latex_environment(self, name: str, body: str) -> str:
            source = f"\\begin{{{name}}}{body}\\end{{{name}}}"
            return self._formula(source, True, source)

    return MathMLRenderer


def _exporter(hide_code: bool, unrendered: list):
    from jinja2 import pass_context
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import MarkdownWithMath

    renderer_class = _math_renderer_class()

    class ReportExporter(HTMLExporter):
        @pass_context
        def markdown2html(self, context, source):
            cell = context.get("cell", {})
            path = context.get("resources", {}).get("metadata", {}).get("path", "")
            renderer = renderer_class(escape=False, attachments=cell.get("attachments", {}),
                                      embed_images=self.embed_images, path=path,
                                      anchor_link_text=self.anchor_link_text,
                                      exclude_anchor_links=self.exclude_anchor_links,
                                      unrendered=unrendered, **self.lexer_options)
            return MarkdownWithMath(renderer=renderer).render(source)

    # "basic": the cells only. The page around them (head, stylesheet link) is ours: the "lab" and
    # "classic" templates inline ~250 KB of CSS into every page and load scripts from a CDN.
    return ReportExporter(template_name="basic", exclude_input=hide_code, exclude_input_prompt=hide_code,
                          exclude_output_prompt=hide_code, embed_images=True)


# ------------------------------------------------------------------------------------ widgets
def _static_widget_outputs(nb):
    """A copy of ``nb`` whose widget views are replaced by their static preview: the image and the
    text the widget stored beside its view (``microcnn.widgets``), or a note when it stored none.
    A widget view cannot be drawn without a kernel and a widget manager, which a report has not."""
    from nbformat.v4 import new_output

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)  # the saved widget state: data no report page can use
    for cell in nb.cells:
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW not in data:
                outputs.append(out)
                continue
            if "image/png" in data:
                text = data.get("text/plain", "")
                if text:
                    outputs.append(new_output("display_data", data={"text/plain": text}))
                outputs.append(new_output("display_data", data={"image/png": data["image/png"]},
                                          metadata=out.get("metadata", {})))
            else:
                outputs.append(new_output("display_data", data={"text/plain": (
                    "[interactive widget: no static preview was stored with this output; "
                    "run the notebook in Jupyter to use it]")}))
        if "outputs" in cell:
            cell.outputs = outputs
    return nb


# ------------------------------------------------------------------------------------ pages
@dataclass
class Page:
    """One rendered notebook: where it came from, its title and headings, and its HTML body."""

    source: Path
    name: str
    title: str
    headings: list = field(default_factory=list)  # (level, anchor id, text)
    body: str = ""
    error: str | None = None
    unrendered: list = field(default_factory=list)  # formulas left as LaTeX source


_HEADING = re.compile(r'<h([1-6]) id="([^"]+)">(.*?)</h\1>', re.S)
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.S)


def _plain_text(fragment: str) -> str:
    """Text of an HTML fragment: a formula counts as its LaTeX source, tags dropped, spaces collapsed."""
    fragment = re.sub(r"<math\b.*?<annotation[^>]*>(.*?)</annotation>.*?</math>", r"\1", fragment,
                      flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def _headings(body: str) -> list:
    """(level, id, text) of every Markdown heading in a rendered body, in order (nbconvert gives each
    an id, which the index links to)."""
    return [(int(level), anchor, _plain_text(_ANCHOR_LINK.sub("", inner)))
            for level, anchor, inner in _HEADING.findall(body)]


def notebook_page(nb, source, hide_code: bool = False, error: str | None = None) -> Page:
    """Render a notebook (executed or as stored) into a ``Page``."""
    unrendered: list = []
    # Images a Markdown cell links by a relative path are embedded: the page must stand alone.
    resources = {"metadata": {"path": str(Path(source).resolve().parent)}}
    body, _ = _exporter(hide_code, unrendered).from_notebook_node(_static_widget_outputs(nb), resources)
    headings = _headings(body)
    title = headings[0][2] if headings else Path(source).stem
    return Page(Path(source), page_name(source), title, headings, body, error, unrendered)


def _template(name: str) -> str:
    """A page template of microcnn/assets/: one head for every page (its title and the shared
    stylesheet; no script, no network), then the page's body."""
    from .widgets import asset

    return asset("head.html") + asset(name)


def _page_html(page: Page, previous: Page | None, following: Page | None, executed: bool) -> str:
    nav = [f'<a href="{INDEX}" rel="index">Contents</a>']
    if previous is not None:
        nav.append(f'<a href="{previous.name}" rel="prev">← {html.escape(previous.title)}</a>')
    if following is not None:
        nav.append(f'<a href="{following.name}" rel="next">{html.escape(following.title)} →</a>')
    error = (f'<p class="report-error">This notebook did not run to the end: {html.escape(page.error)}</p>\n'
             if page.error else "")
    outputs = "executed for this report" if executed else "as stored in the notebook"
    return _template("page.html").format(title=html.escape(page.title), stylesheet=STYLESHEET,
                                         nav=" · ".join(nav),
                        error=error, body=page.body,
                        footer=f"{html.escape(page.source.name)}; outputs {outputs}. "
                               f"Rendered by <code>microcnn report</code>.")


def _index_html(pages: list, executed: bool) -> str:
    entries = []
    for page in pages:
        sub = "".join(f'<li class="toc-h{level}"><a href="{page.name}#{anchor}">'
                      f"{html.escape(text)}</a></li>\n" for level, anchor, text in page.headings[1:])
        failed = (f' <span class="report-error">(did not run to the end: {html.escape(page.error)})</span>'
                  if page.error else "")
        entries.append(f'<li><a class="toc-title" href="{page.name}">{html.escape(page.title)}</a> '
                       f'<span class="toc-file">{html.escape(page.source.name)}</span>{failed}\n'
                       + (f"<ul>\n{sub}</ul>\n" if sub else "") + "</li>")
    outputs = "executed for this report" if executed else "as stored in the notebooks"
    summary = f"{len(pages)} notebook{'s' if len(pages) != 1 else ''}; outputs {outputs}."
    return _template("index.html").format(title="microcnn notebooks", stylesheet=STYLESHEET, summary=summary,
                              entries="\n".join(entries))


def stylesheet() -> str:
    """The report's CSS, with Pygments' colours for highlighted code."""
    from pygments.formatters import HtmlFormatter

    from .widgets import asset

    pygments = HtmlFormatter().get_style_defs(".highlight")
    return asset("report.css") + "/* code highlighting (Pygments) */\n" + pygments + "\n"


# ------------------------------------------------------------------------------------ the report
def render_report(paths=None, out_dir="reports", execute: bool = True, hide_code: bool = False,
                  timeout: int = 600, progress: bool = True, overwrite: bool = True) -> list[Path]:
    """Render notebooks into ``out_dir`` (index, one page each, one stylesheet); return the paths
    written, pages first (``report_destinations``).

    ``paths``: notebook files (default: every ``notebooks/*.ipynb`` of the repository, sorted).
    ``execute``: run each notebook in a fresh kernel first (``timeout`` seconds per cell); otherwise
    show the outputs stored in the notebook. ``hide_code``: leave out code cells' inputs.
    ``overwrite=False`` refuses existing files (checked before any notebook runs).

    The files are written together at the end, or not at all (Ctrl-C leaves nothing). A notebook
    whose cell fails still gets its page (showing the error, flagged in the index), then
    ``MicrocnnError`` is raised, so a broken report never passes silently.
    """
    import nbformat
    from tqdm.auto import tqdm

    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InputError(f"timeout: expected a positive number of seconds, found {timeout!r}")
    notebooks = notebook_paths(paths)
    destinations = report_destinations(notebooks, out_dir)
    for path in destinations:
        check_destination(path, overwrite)
    pages, failures = [], []
    bar = tqdm(notebooks, desc="report", unit="notebook", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.name)
        if execute:
            try:
                nb, error = execute_notebook(path, timeout=timeout), None
            except NotebookError as exc:
                nb, error = exc.notebook, str(exc)
                failures.append(str(exc))
        else:
            nb, error = nbformat.read(path, as_version=4), None
        pages.append(notebook_page(nb, path, hide_code=hide_code, error=error))
    files = {dest: _page_html(page, pages[i - 1] if i else None, pages[i + 1] if i + 1 < len(pages) else None,
                              execute)
             for i, (dest, page) in enumerate(zip(destinations, pages, strict=False))}
    files[destinations[-2]] = _index_html(pages, execute)
    files[destinations[-1]] = stylesheet()
    with all_or_nothing():
        for dest, text in files.items():
            atomic_write_bytes(dest, text.encode("utf-8"), overwrite)
    for page in pages:
        for message in page.unrendered:
            warnings.warn(f"{page.source}: {message} (shown as LaTeX source)", FormulaWarning, stacklevel=2)
    if failures:
        raise MicrocnnError("; ".join(failures) + f" (report written to {Path(out_dir) / INDEX})")
    return destinations
