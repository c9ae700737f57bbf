"""Sweeps under hostile conditions, beyond tests/test_sweep.py: AdaRound end to end through Dask, a
configuration that fails on a worker (the rows finished before it are kept, a rerun does only the rest),
an output directory that refuses writes, and the command line's one-line errors for bad grids."""

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from microcnn import sweep
from microcnn.errors import InputError
from microcnn.sweep import COLUMNS, read_table, run_sweep

ROOT = Path(__file__).resolve().parent.parent


def _direct(config, mnist_train, mnist_test):
    """Accuracy and bytes of ``config`` computed in this process without Dask or microcnn.sweep."""
    import microcnn
    from microcnn.quant import calibrate, quantize

    net = microcnn.lenet(weights="bundled")
    cal = calibrate(net, mnist_train[0], method=config["method"], samples=config["calibration"],
                    seed=config["seed"], progress=False)
    w, a = (int(b) for b in config["precision"][1:].split("a"))
    qnet = quantize(net, cal, weight_bits=w, act_bits=a, rounding=config["rounding"], seed=config["seed"])
    return qnet.accuracy(*(v[:config["samples"]] for v in mnist_test)), qnet.nbytes


@pytest.mark.slow  # AdaRound: minutes per LeNet configuration on one loaded core
def test_an_adaround_sweep_runs_end_to_end_on_a_local_cluster(tmp_path, mnist_train, mnist_test):
    out = tmp_path / "adaround.parquet"
    table = run_sweep(["lenet"], ["w3a3"], ["mse"], ["nearest", "adaround"], [1], out, calibration=32,
                      samples=500, progress=False, workers=2)
    assert list(table.columns) == list(COLUMNS) and len(table) == 2
    rows = {r["rounding"]: r for r in table.to_dict("records")}
    for rounding, row in rows.items():
        acc, nbytes = _direct(row, mnist_train, mnist_test)
        assert row["accuracy"] == acc, rounding  # seeded AdaRound: the same codes on the worker as here
        assert row["model_bytes"] == nbytes, rounding
    # Same grid width, same bytes; other codes (AdaRound keeps the MSE range, nearest rounding chooses
    # its range by the output error, so at 3 bits on 32 images they land points apart).
    assert rows["adaround"]["model_bytes"] == rows["nearest"]["model_bytes"]
    assert rows["adaround"]["accuracy"] != rows["nearest"]["accuracy"]
    assert min(rows["adaround"]["accuracy"], rows["nearest"]["accuracy"]) > 0.95


_released = threading.Event()
_run_configuration = sweep.run_configuration  # the real one, before a test patches the module


def _fails_on_seed_1(config, data_dir=None):
    """A worker-side failure (as a missing dataset on one machine would be) for seed 1, raised only
    after seed 0's row is done, so which rows were finished before the failure is known."""
    if config["seed"] == 1:
        _released.wait(300)
        raise InputError("dataset mnist: not found on this worker (simulated)")
    try:
        return _run_configuration(config, data_dir)
    finally:
        _released.set()


@pytest.mark.slow
def test_a_failing_configuration_keeps_the_finished_rows_and_a_rerun_does_the_rest(tmp_path, monkeypatch,
                                                                                     mnist_train, mnist_test):
    from dask.distributed import LocalCluster

    out = tmp_path / "half.parquet"
    grid = dict(models=["lenet"], precisions=["w8a8"], methods=["minmax"], roundings=["nearest"],
                seeds=[0, 1], calibration=16, samples=100, progress=False)
    # Worker threads in this process (so the patched task runs there), reached over tcp like any cluster.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=None) as cluster:
        monkeypatch.setattr(sweep, "run_configuration", _fails_on_seed_1)
        _released.clear()
        with pytest.raises(InputError, match="not found on this worker"):
            run_sweep(**grid, out=out, scheduler=cluster.scheduler_address)
        kept = read_table(out)
        assert kept["seed"].tolist() == [0]  # the finished row, nothing invented for the failed one
        acc, nbytes = _direct(kept.iloc[0].to_dict(), mnist_train, mnist_test)
        assert kept["accuracy"].iloc[0] == acc and kept["model_bytes"].iloc[0] == nbytes

        monkeypatch.setattr(sweep, "run_configuration", _run_configuration)
        again = run_sweep(**grid, out=out, scheduler=cluster.scheduler_address)
    assert sorted(again["seed"]) == [0, 1]
    assert again[again["seed"] == 0].reset_index(drop=True).equals(kept)  # kept bit for bit, not rerun
    row = again[again["seed"] == 1].iloc[0].to_dict()
    assert row["accuracy"] == _direct(row, mnist_train, mnist_test)[0]


def test_a_directory_that_refuses_writes_is_refused_before_any_work(tmp_path, monkeypatch):
    # Root ignores permission bits, so a read-only file system is simulated where the write probe fails.
    import microcnn.fileutil as fileutil

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    started = []
    monkeypatch.setattr(fileutil.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(sweep, "_client", lambda *a: started.append(a))
    with pytest.raises(OSError, match="Read-only file system") as info:
        run_sweep(["lenet"], ["w8a8"], ["mse"], ["nearest"], [0], tmp_path / "t.parquet", progress=False)
    assert "t.parquet" in str(info.value)  # names the output the user gave
    assert started == [] and not (tmp_path / "t.parquet").exists()


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "microcnn.cli", "sweep", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--precisions", "w9a8"], "precision 'w9a8': weight bits outside 2..8 (found 9)"),
    (["--precisions", "w4a1"], "precision 'w4a1': activation bits outside 2..8 (found 1)"),
    (["--precisions", ","], "precisions: expected at least one value, found none (an empty grid)"),
    (["--precisions", "int8", "--seeds", ""], "seeds: expected at least one value, found none"),
    (["--precisions", "int8", "--methods", ","], "methods: expected at least one value"),
    (["--precisions", "int8", "--scheduler", "localhost:8786"], "expected an address like tcp://HOST:PORT"),
    (["--precisions", "int8", "--out", "."], "is a directory; expected the path of a file to write"),
])
def test_the_command_line_gives_one_line_per_bad_input(tmp_path, args, message):
    argv = ["--models", "lenet", "--out", "t.parquet", *args]
    t0 = time.monotonic()
    proc = _cli(tmp_path, *argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microcnn sweep: error: "), proc.stderr
    assert message in lines[0]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []  # nothing written, no cluster started
    assert time.monotonic() - t0 < 120


@pytest.mark.slow  # waits out the 10 s connect timeout
def test_the_command_line_names_an_unreachable_scheduler(tmp_path):
    port = _free_port()  # nothing listens there
    proc = _cli(tmp_path, "--models", "lenet", "--precisions", "int8", "--out", "t.parquet",
                "--scheduler", f"tcp://127.0.0.1:{port}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"microcnn sweep: error: scheduler tcp://127.0.0.1:{port}: not reachable "
                               "within 10 s")
    assert "start one with `dask scheduler`" in lines[0]
    assert list(tmp_path.iterdir()) == []
