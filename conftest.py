"""Root conftest: applies to tests/ and to the notebooks nbval replays.

The data directory defaults to the shared MNIST folder beside the checkout (where CI's fresh clone
finds it); MICROCNN_DATA overrides it. Set here, before any notebook kernel starts, so kernels inherit it.
"""

import os
from pathlib import Path

_SHARED_MNIST = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "mnist"
if "MICROCNN_DATA" not in os.environ and _SHARED_MNIST.is_dir():
    os.environ["MICROCNN_DATA"] = str(_SHARED_MNIST)

import pytest  # noqa: E402  (after the environment default above, which notebook kernels inherit)

# Fixtures (tests/conftest.py) that read the MNIST files.
_DATA_FIXTURES = {"mnist_test", "mnist_train"}


def pytest_collection_modifyitems(config, items):
    """Test lanes: every notebook cell nbval replays is ``notebook`` (and ``slow`` and ``data``: each
    notebook reads MNIST and takes tens of seconds); tests that use the MNIST fixtures, or skip without
    the shared MNIST files, are ``data``. Quick lane: ``pytest -m "not slow"``."""
    for item in items:
        if item.path.suffix == ".ipynb":
            for mark in (pytest.mark.notebook, pytest.mark.slow, pytest.mark.data):
                item.add_marker(mark)
        elif _DATA_FIXTURES & set(getattr(item, "fixturenames", ())) or any(
                "MNIST" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.data)
