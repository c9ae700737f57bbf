"""Install promises: environment.yml matches pyproject, README's commands are what CI runs,
importing compiles nothing."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

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
