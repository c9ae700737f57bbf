"""The ``>>>`` examples in the docstrings are true: each module's examples run with ``doctest`` (in the
module's own namespace, as ``python -m doctest`` would) and a wrong output fails here.

Only examples written as ``>>>`` run; a docstring whose example needs data it cannot make (a trained
network, the MNIST files) shows it as a plain code block instead.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

# The modules whose public classes and functions carry PyTorch-style docstrings with examples.
MODULES = (
    "microcnn.errors",
    "microcnn.checks",
    "microcnn.fileutil",
    "microcnn.jsonutil",
    "microcnn.timing",
    "microcnn.optim",
    "microcnn.losses",
    "microcnn.datasets",
    "microcnn.lenet",
    "microcnn.train",
    "microcnn.cliargs",
    "microcnn.kernels.shapes",
    "microcnn.kernels.linalg",
    "microcnn.kernels.gemm",
    "microcnn.kernels.simd",
    "microcnn.quant.precision",
    "microcnn.quant.loading",
)

# Modules whose docstrings must hold at least one example (the ones users touch first).
WITH_EXAMPLES = {"microcnn.errors", "microcnn.optim", "microcnn.losses", "microcnn.datasets",
                 "microcnn.lenet", "microcnn.train", "microcnn.kernels.shapes", "microcnn.kernels.gemm",
                 "microcnn.quant.precision", "microcnn.quant.loading"}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    # Numba dispatchers hide their docstrings from doctest's finder: list their Python functions too.
    extra = {attr: obj.py_func for attr, obj in vars(module).items()
             if hasattr(obj, "py_func") and getattr(obj.py_func, "__module__", None) == name}
    module.__test__ = extra  # doctest's hook for extra objects
    try:
        result = doctest.testmod(module, optionflags=FLAGS, report=True, verbose=False)
    finally:
        del module.__test__
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see above)"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name}: expected docstring examples, found none"
