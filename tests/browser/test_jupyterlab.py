"""Notebook 05 in a real browser: JupyterLab runs every cell, the slider moves, a digit is drawn.

Runs only with MICROCNN_BROWSER=1 (see conftest.py); ``bash tests/browser/run.sh`` sets it up.
JupyterLab serves a temporary copy of the notebook, so running it never rewrites the committed one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "05_interactive_prediction.ipynb"
REPORTS = REPO / "reports"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                json.load(r)
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer {url} within {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "served"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    home = tmp / "jupyter-home"  # settings and workspaces of this run only
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp / "jupyterlab.log"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "run"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    cmd = [sys.executable, "-m", "jupyterlab", "--ip=127.0.0.1", f"--port={port}", "--no-browser",
           "--ServerApp.open_browser=False", "--allow-root", f"--ServerApp.root_dir={root}",
           f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield {"url": base, "token": token, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _text(page, selector: str) -> str:
    return page.locator(selector).first.inner_text().strip()


def test_notebook_05_runs_and_responds_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    REPORTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            # The kernel is ready once the status bar names it and says Idle (the toolbar's indicator
            # reads "idle" before any kernel exists).
            expect(page.locator(".jp-StatusBar-Widget").get_by_text("| Idle")).to_be_visible(timeout=90_000)
            news = page.get_by_role("alert").get_by_role("button", name="No")
            if news.count():  # the "official Jupyter news?" question would cover the canvas
                news.first.click()

            # Run > Run All Cells, through the menu as a person would.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            # The expectations wait for the live widget's text: right after Run All Cells the output area
            # may render the summary more than once, and a one-shot read can catch a view still empty.
            summary = page.locator(".microcnn-summary").first
            expect(summary).to_contain_text(re.compile(r"test image 0:.*label 7"), timeout=180_000)  # a 7

            # Move the test-image slider two steps with the keyboard, as noUiSlider allows.
            handle = page.locator(".widget-slider .noUi-handle").first
            handle.scroll_into_view_if_needed()
            handle.focus()
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            expect(summary).to_contain_text(re.compile(r"test image 2:.*label 1"), timeout=30_000)  # a 1
            summary.scroll_into_view_if_needed()
            page.screenshot(path=str(REPORTS / "browser_05_explorer.png"))

            # Draw a vertical stroke on the canvas with the mouse: a "1".
            canvas = page.locator("canvas.microcnn-canvas").first
            canvas.scroll_into_view_if_needed()
            prediction = page.locator(".microcnn-drawing-prediction").first
            expect(prediction).to_contain_text("Prediction: none")
            box = canvas.bounding_box()
            x = box["x"] + box["width"] * 0.5
            page.mouse.move(x, box["y"] + box["height"] * 0.15)
            page.mouse.down()
            for k in range(1, 21):
                page.mouse.move(x + k * 0.4, box["y"] + box["height"] * (0.15 + 0.035 * k))
            page.mouse.up()
            expect(prediction).to_contain_text("Prediction: 1 (", timeout=30_000)
            text = prediction.inner_text()
            assert "FP32: 1" in text, text
            page.screenshot(path=str(REPORTS / "browser_05.png"))

            # Clear empties the prediction again.
            page.locator("button.microcnn-clear").first.click()
            expect(prediction).to_contain_text("Prediction: none", timeout=30_000)

            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
            assert not tracebacks, tracebacks
        finally:
            browser.close()
