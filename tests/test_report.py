"""render_notebooks: a real kernel executes a small notebook and the HTML holds its table and figure."""

import base64
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from microcnn.errors import InputError, MicrocnnError
from microcnn.report import render_notebooks

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


def _write(path, sources):
    nb = new_notebook(cells=[new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_render_writes_html_with_table_and_png(tmp_path):
    import microcnn

    nb_path = _write(tmp_path / "tiny.ipynb", [TABLE_AND_FIGURE])
    out = render_notebooks([nb_path], out_dir=tmp_path / "reports", progress=False)
    assert out == [tmp_path / "reports" / "tiny.html"]
    html = out[0].read_text()
    # The DataFrame rendered as an HTML table with its values.
    table = re.search(r"<table.*?</table>", html, re.S)
    assert table is not None
    for text in ("Precision", "Accuracy (%)", "FP32", "INT8", "98.25"):
        assert text in table.group(0)
    # The figure embedded as a real PNG (decodes and starts with the PNG signature).
    m = re.search(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=\s]+)"', html)
    assert m is not None
    png = base64.b64decode(m.group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # The kernel imported this checkout's microcnn, not some other copy.
    assert f"microcnn from {microcnn.__file__}" in html
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


def test_failing_cell_still_writes_html_then_raises(tmp_path):
    nb_path = _write(tmp_path / "broken.ipynb", ["print('before')", "raise RuntimeError('boom 123')"])
    with pytest.raises(MicrocnnError, match=r"broken\.ipynb.*boom 123"):
        render_notebooks([nb_path], out_dir=tmp_path, progress=False)
    html = (tmp_path / "broken.html").read_text()
    assert "before" in html and "boom 123" in html


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        render_notebooks([tmp_path / "missing.ipynb"], out_dir=tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"expected \.ipynb"):
        render_notebooks([tmp_path / "notes.txt"], out_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match="empty list"):
        render_notebooks([], out_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.html"))
