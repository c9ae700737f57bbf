"""Rendered reports: execute notebooks in a fresh kernel and write them out as HTML.

``microcnn report`` calls ``render_notebooks``. The kernel runs the Python of the current process
(not whatever kernel named "python3" happens to be installed), and it imports the same microcnn
package as the caller, so a report always shows the code that asked for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError, MicrocnnError
from .fileutil import atomic_write_bytes

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
_CURRENT_ENV = "microcnn-current-env"


def _kernel_manager():
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    class CurrentEnvSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name == _CURRENT_ENV:
                return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                              **ipykernel.kernelspec.get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    return KernelManager(kernel_name=_CURRENT_ENV, kernel_spec_manager=CurrentEnvSpecs())


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
    return out


def execute_notebook(path, timeout: int = 600):
    """Run every cell of the notebook at ``path`` in its own directory; return the executed notebook.

    On a failing cell raises ``MicrocnnError`` naming the notebook; the notebook (with the error
    output) is attached as the exception's ``notebook`` attribute.
    """
    import nbformat
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
        err = MicrocnnError(f"{path}: a cell failed while executing the notebook: "
                            f"{str(exc).strip().splitlines()[-1]}")
        err.notebook = nb
        raise err from exc
    finally:
        if km.has_kernel:  # a kernel manager handed to nbclient is ours to shut down
            km.shutdown_kernel(now=True)
    return nb


def notebook_html(nb) -> str:
    """The notebook as a standalone HTML page (figures embedded as PNG data)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return body


def render_notebooks(paths=None, out_dir="reports", progress: bool = True, timeout: int = 600) -> list[Path]:
    """Execute notebooks and write ``<out_dir>/<name>.html`` for each; return the HTML paths.

    ``paths``: notebook files (default: every ``notebooks/*.ipynb`` of the repository, sorted).
    A notebook whose cell fails still gets its HTML (showing the error), then ``MicrocnnError``
    is raised, so a broken report never passes silently.
    """
    from tqdm.auto import tqdm

    notebooks = notebook_paths(paths)
    out_dir = Path(out_dir)
    written = []
    for path in tqdm(notebooks, desc="notebooks", unit="nb", disable=not progress):
        html_path = out_dir / f"{path.stem}.html"
        try:
            nb = execute_notebook(path, timeout=timeout)
        except MicrocnnError as exc:
            if getattr(exc, "notebook", None) is not None:
                atomic_write_bytes(html_path, notebook_html(exc.notebook).encode("utf-8"))
                raise MicrocnnError(f"{exc} (partial report: {html_path})") from exc
            raise
        atomic_write_bytes(html_path, notebook_html(nb).encode("utf-8"))
        written.append(html_path)
    return written
