"""The README's "Two commands", exactly as written, so the README and the program cannot drift apart.

The commands are read from README.md. Their ``microcnn`` parts run in fresh processes through the
console script's own function (``microcnn.cli:main``, checked against pyproject.toml) with the argv
written in the README; ``pip install`` parts are skipped (the checkout is on PYTHONPATH) and the test
command is not re-run from inside the tests. The data comes over real HTTP from a local mirror (the
server fixture of test_download.py) into an empty cache directory; the only thing the runner changes
is where datasets are downloaded from and the checksums they must match (the shared training file is
a 10,000-image subset, not the official file).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from microcnn import datasets
from tests.test_download import server  # noqa: F401  (the local HTTP server fixture)

ROOT = Path(__file__).resolve().parent.parent

_RUNNER = """
import json, sys
from microcnn import datasets
from microcnn.cli import main
mirror, table = json.loads(sys.argv[1])
datasets.MIRRORS["mnist"] = (mirror,)
datasets.CHECKSUMS["mnist"] = {k: datasets.FileChecksum(*v) for k, v in table.items()}
sys.exit(main(sys.argv[2:]))
"""


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Two commands" section, each split at ``&&`` into its parts."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Two commands\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Two commands' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    return [[part.strip() for part in block.strip().split("&&")] for block in blocks]


def cli_parts(command: list[str]) -> list[list[str]]:
    """The ``microcnn ...`` parts of one command as argv lists; every other part must be an install or
    the test runner, so a new kind of step in the README fails here instead of going untested."""
    out = []
    for part in command:
        words = shlex.split(part)
        if words[0] == "microcnn":
            out.append(words[1:])
        else:
            assert words[:2] == ["pip", "install"] or words[:3] == ["python", "-m", "pytest"], part
    return out


def test_readme_has_the_two_commands_this_test_runs():
    commands = readme_commands()
    assert len(commands) == 2
    assert cli_parts(commands[0]) == [["fetch"], ["bench"]]
    assert cli_parts(commands[1]) == []  # the test command itself
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["microcnn"] == "microcnn.cli:main"  # the function the runner calls


@pytest.fixture
def mirror(server):  # noqa: F811
    """The MNIST files the suite uses, served over HTTP from <root>/mnist/; returns (url, checksums,
    source directory, request log)."""
    root, url, requests = server
    source = datasets.find_dataset_dir("mnist", split=None)
    if source is None:
        pytest.fail("MNIST not found (set MICROCNN_DATA); the README test needs its files to serve")
    (root / "mnist").mkdir()
    table = {}
    for base in datasets.SPLIT_FILES["train"] + datasets.SPLIT_FILES["test"]:
        gz, raw = source / f"{base}.gz", source / base
        if gz.is_file():
            shutil.copyfile(gz, root / "mnist" / gz.name)
            data = gzip.decompress(gz.read_bytes())
        else:
            data = raw.read_bytes()
            (root / "mnist" / f"{base}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        table[base] = [hashlib.sha256(data).hexdigest(), len(data)]
    return f"{url}/mnist/", table, source, requests


@pytest.mark.slow
def test_readme_main_command_runs_as_written(mirror, tmp_path, bundled):
    url, table, source, requests = mirror
    (cwd := tmp_path / "cwd").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MICROCNN_DATA"}  # a new user's environment
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(ROOT))
    outputs = []
    for argv in cli_parts(readme_commands()[0]):
        proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps([url, table]), *argv], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr
        outputs.append(proc.stdout)

    # fetch: both splits came over HTTP into the user cache, and nothing else was written.
    cache = tmp_path / "xdg" / "microcnn" / "mnist"
    assert outputs[0].strip() == f"mnist: {cache}"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{b}.gz" for b in table)
    assert sorted(requests) == sorted(f"/mnist/{b}.gz" for b in table)
    assert list(cwd.iterdir()) == []

    # bench: the headline table over the first 1000 fetched test images, every precision present, and
    # the FP32 accuracy is what the bundled model scores on those images.
    images, labels = datasets.load_mnist("test", data_dir=cache)
    expected = bundled.accuracy(images[:1000], labels[:1000]) * 100
    lines = outputs[1].splitlines()
    assert "1000 test images batched" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["FP32"], ["INT8"],
                                                                                    ["W4A8"], ["INT4"])}
    assert sorted(rows) == ["FP32", "INT4", "INT8", "W4A8"]
    assert rows["FP32"][-1] == f"{expected:.2f}"
    assert "first prediction: cold cache (compile)" in outputs[1]
