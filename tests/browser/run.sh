#!/usr/bin/env bash
# Real-browser tests, headless Chromium driven by Playwright: JupyterLab runs
# notebooks/05_interactive_prediction.ipynb (screenshots in reports/browser_05*.png), and the output of
# `microcnn report --no-execute` is opened with the network blocked (test_report_offline.py).
# Uses Debian's chromium (never a browser download: no `playwright install`).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
python -c "import playwright" 2>/dev/null || python -m pip install -q playwright

export MICROCNN_DATA="${MICROCNN_DATA:-$(cd .. && pwd)/shared/datasets/mnist}"
export MICROCNN_BROWSER=1
# The notebook's kernel must import this checkout even when it is not pip-installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m pytest tests/browser -v
