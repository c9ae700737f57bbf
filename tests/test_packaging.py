"""Install promises: environment.yml matches pyproject, README's commands are what CI runs,
importing compiles nothing."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_deps():
    deps, in_deps = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
        elif in_deps and re.match(r"^  - [A-Za-z]", line):
            deps.append(line.strip()[2:])
    return [d for d in deps if not d.startswith(("python=", "pip"))]


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    pip_deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert sorted(_conda_deps()) == sorted(pip_deps)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install -e ".[dev]" && python -m pytest'
    assert test_cmd in readme
    assert test_cmd in [line.strip() for line in ci.splitlines()]


def test_console_script_and_torch_pin():
    project = _pyproject()["project"]
    assert project["scripts"]["microcnn"] == "microcnn.cli:main"
    # Any other torch spec pulls gigabytes of CUDA wheels; the core install never needs torch.
    assert "torch==2.13.0" in project["optional-dependencies"]["compare"]
    assert not any("torch" in d for d in project["dependencies"] + project["optional-dependencies"]["dev"])


def test_import_compiles_nothing():
    code = """
import importlib, pkgutil, microcnn
from numba.core.registry import CPUDispatcher
mods = [m.name for m in pkgutil.walk_packages(microcnn.__path__, 'microcnn.')
        if m.name.split('.')[-1] not in ('widgets', 'compare', 'report', 'cli')]
compiled, seen = [], 0
for name in mods:
    mod = importlib.import_module(name)
    for attr, obj in vars(mod).items():
        if isinstance(obj, CPUDispatcher):
            seen += 1
            if obj.signatures:
                compiled.append(f'{name}.{attr}')
print(seen, compiled)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split(" ", 1)
    assert int(out[0]) > 10, "expected to find the Numba kernels"
    assert out[1].strip() == "[]"


_EVALUATE_INSTALLED = """
import hashlib, json
import numpy as np
import microcnn
from microcnn.datasets import load_mnist
from microcnn.lenet import BUNDLED_RAW
images, labels = load_mnist("test", download=False)
probs = microcnn.lenet(weights="bundled").predict(images[:500])
print(json.dumps({"module": microcnn.__file__, "weights": str(BUNDLED_RAW),
                  "accuracy": float((probs.argmax(1) == labels[:500]).mean()),
                  "sha256": hashlib.sha256(probs.tobytes()).hexdigest()}))
"""


@pytest.mark.slow
def test_wheel_carries_the_bundled_weights_and_works_outside_the_checkout(tmp_path, mnist_test, bundled):
    """Build the wheel from a copy of the sources, unpack it (a pure-Python wheel's install) outside the
    checkout and evaluate the bundled model from another directory with only the unpacked copy on the
    path: same module from the install, same weights, the same probabilities as the in-tree model."""
    import hashlib
    import json
    import os
    import shutil
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "microcnn", src / "microcnn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data", src / "data")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                 "--no-index", "-q", "-w", str(tmp_path / "dist")]
    built = subprocess.run(pip_wheel, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("microcnn-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        for name in ("lenet.raw", "lenet.safetensors"):
            assert archive.read(f"microcnn/data/{name}") == (ROOT / "data" / name).read_bytes()
        archive.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    env.update(PYTHONPATH=str(site), NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), NUMBA_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _EVALUATE_INSTALLED], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    installed = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(installed["module"]).is_relative_to(site)
    assert Path(installed["weights"]) == site / "microcnn" / "data" / "lenet.raw"
    images, labels = mnist_test
    probs = bundled.predict(images[:500])
    assert installed["accuracy"] == float((probs.argmax(1) == labels[:500]).mean()) > 0.97
    assert installed["sha256"] == hashlib.sha256(probs.tobytes()).hexdigest()


def test_bundled_weights_resolve_to_the_checkout_when_run_from_source():
    """On PYTHONPATH (no microcnn.data package in the source tree) the weights are the repository's data/."""
    from microcnn.lenet import BUNDLED_RAW, DATA_DIR

    assert BUNDLED_RAW.read_bytes() == (ROOT / "data" / "lenet.raw").read_bytes()
    assert (DATA_DIR / "lenet.safetensors").read_bytes() == (ROOT / "data" / "lenet.safetensors").read_bytes()
