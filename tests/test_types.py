"""The type checker passes: ``python -m mypy microcnn`` (configured in pyproject.toml, basic mode) finds
no error. Annotated public signatures are checked against their bodies and their callers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# mypy is in the dev extra (CI installs it); without it this check cannot run at all.
pytest.importorskip("mypy", reason="mypy is a dev dependency: pip install -e '.[dev]'")


@pytest.mark.slow  # 30-60 s on a cold cache (a few seconds warm)
def test_mypy_finds_no_error():
    done = subprocess.run([sys.executable, "-m", "mypy", "microcnn"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert done.returncode == 0 and not errors, (
        f"mypy found {len(errors)} error(s):\n" + "\n".join(errors[:60]) + f"\n{done.stderr[-2000:]}")
    assert "Success" in done.stdout
