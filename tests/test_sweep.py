"""Sweeps on Dask: every row equals the same configuration computed here, in-process; resume skips
finished rows; an interrupted sweep keeps them; a real scheduler + worker pair; one error per bad input."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microcnn.cli import build_parser
from microcnn.errors import InputError
from microcnn.sweep import (
    COLUMNS,
    LATER_COLUMNS,
    SweepError,
    grid,
    parse_precision,
    read_table,
    run_configuration,
    run_sweep,
)

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(models=["lenet"], precisions=["int8", "w4a4"], methods=["minmax"], roundings=["nearest"])


def _env():
    """Subprocesses import this checkout and see the same data directory; one Numba thread each."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1")
    env.pop("COLUMNS", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _direct(row, mnist_train, mnist_test):
    """The configuration of ``row`` computed without Dask or microcnn.sweep: the documented recipe."""
    import microcnn
    from microcnn.quant import calibrate, quantize
    from microcnn.quant.cle import equalize

    net = fp32 = microcnn.lenet(weights="bundled")
    if row.get("cle", False):
        net = equalize(fp32)
    images, labels = mnist_test[0][:row["samples"]], mnist_test[1][:row["samples"]]
    cal = calibrate(net, mnist_train[0], method=row["method"], samples=row["calibration"],
                    seed=row["seed"], progress=False)
    w, a = {"w8a8": (8, 8), "w4a4": (4, 4), "w4a8": (4, 8), "w3a8": (3, 8)}[row["precision"]]
    qnet = quantize(net, cal, weight_bits=w, act_bits=a, rounding=row["rounding"],
                    per_channel=row.get("granularity", "channel") == "channel")
    return qnet.accuracy(images, labels), fp32.accuracy(images, labels), qnet.nbytes, cal.images


def _check_rows(table, mnist_train, mnist_test):
    for row in table.to_dict("records"):
        acc, fp32, nbytes, _ = _direct(row, mnist_train, mnist_test)
        key = {k: row[k] for k in ("precision", "seed", "rounding")}
        assert row["accuracy"] == acc, key
        assert row["fp32_accuracy"] == fp32, key
        assert row["drop"] == pytest.approx(fp32 - acc, abs=1e-12), key
        assert row["model_bytes"] == nbytes, key
        assert row["seconds"] > 0


# -- the grid and its errors (no cluster) --------------------------------------------------------
def test_grid_is_the_full_product_with_canonical_precisions():
    configs = grid(["lenet", "fashion"], ["int8", "w4a8", "int4", "fp32", "w8a8"], ["minmax", "mse"],
                   ["nearest", "gptq"], [0, 1, 2], calibration=20, samples=None)
    assert len(configs) == 2 * 3 * 2 * 2 * 3  # fp32 skipped, int8 and w8a8 are one precision
    assert {c["precision"] for c in configs} == {"w8a8", "w4a8", "w4a4"}
    assert {c["samples"] for c in configs} == {-1} and {c["calibration"] for c in configs} == {20}
    assert len({tuple(sorted(c.items())) for c in configs}) == len(configs)


def test_cle_and_granularity_are_dimensions_of_the_grid():
    configs = grid(["lenet"], ["w4a8"], ["mse"], ["nearest"], [0, 1], cle=[False, True, False],
                   granularities=["tensor", "channel"])
    assert len(configs) == 2 * 2 * 2  # the repeated False counted once
    assert {(c["cle"], c["granularity"]) for c in configs} == {
        (False, "tensor"), (False, "channel"), (True, "tensor"), (True, "channel")}
    assert {(c["cle"], c["granularity"]) for c in grid(["lenet"], ["w4a8"], ["mse"], ["nearest"], [0])} == \
        {(False, "channel")}  # the defaults: as trained, per-channel scales


@pytest.mark.parametrize("argv, expected", [([], [False]), (["--cle", "on"], [True]),
                                            (["--cle", "off,on"], [False, True]),
                                            (["--cle", "on, off"], [True, False])])
def test_cli_cle_switches(argv, expected):
    args = build_parser().parse_args(["sweep", "--models", "lenet", "--precisions", "w4a4", "--out",
                                      "t.parquet", "--granularity", "channel,tensor", *argv])
    assert args.cle == expected and args.granularity == ["channel", "tensor"]


def test_cli_refuses_a_cle_value_that_is_not_off_or_on(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["sweep", "--models", "lenet", "--precisions", "w4a4", "--out", "t.parquet",
                                   "--cle", "off,yes"])
    assert exit_info.value.code == 2
    assert "expected off, on or off,on, found yes" in capsys.readouterr().err


@pytest.mark.parametrize("name, bits", [("int8", (8, 8)), ("int4", (4, 4)), ("w4a8", (4, 8)),
                                        ("w8a4", (8, 4)), ("w3a3", (3, 3)), ("w2a4", (2, 4)),
                                        ("W8A8", (8, 8))])
def test_parse_precision(name, bits):
    assert parse_precision(name) == bits


@pytest.mark.parametrize("name, message", [
    ("w9a8", r"weight bits outside 2..8 \(found 9\)"),
    ("w8a1", r"activation bits outside 2..8 \(found 1\)"),
    ("w8a16", r"activation bits outside 2..8 \(found 16\)"),
    ("int16", "or wXaY"),
    ("fp32", "expected a quantized precision"),
])
def test_bad_precisions_are_refused_by_name(name, message):
    with pytest.raises(InputError, match=message):
        parse_precision(name)


@pytest.mark.parametrize("field, value, message", [
    ("models", [], "models: expected at least one value, found none"),
    ("precisions", [], "precisions: expected at least one value"),
    ("methods", [], "methods: expected at least one value"),
    ("roundings", [], "roundings: expected at least one value"),
    ("seeds", [], "seeds: expected at least one value"),
    ("models", ["resnet"], r"models: expected names from \['fashion', 'lenet'\], found \['resnet'\]"),
    ("methods", ["minmax", "median"], r"found \['median'\]"),
    ("roundings", ["stochastic"], r"roundings: expected names from .*'gptq'.*found \['stochastic'\]"),
    ("precisions", ["fp32"], "found only fp32"),
    ("precisions", ["w4a9"], "bits outside 2..8"),
    ("seeds", [-1], "seeds: expected non-negative integers"),
    ("cle", [], "cle: expected at least one value"),
    ("cle", ["on"], r"cle: expected True \(equalize\) or False, found \['on'\]"),
    ("granularities", ["layer"],
     r"granularities: expected names from \['channel', 'tensor'\], found \['layer'\]"),
])
def test_bad_grids_are_refused_before_any_work(tmp_path, field, value, message):
    args = {**SMALL, "seeds": [0], field: value}
    with pytest.raises(InputError, match=message):
        run_sweep(**args, out=tmp_path / "t.parquet", progress=False)
    assert not (tmp_path / "t.parquet").exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a directory"):
        run_sweep(**SMALL, seeds=[0], out=tmp_path, progress=False)
    with pytest.raises(InputError, match="is not a directory"):
        run_sweep(**SMALL, seeds=[0], out=tmp_path / "file" / "t.parquet", progress=False)


def test_a_file_that_is_not_a_sweep_table_is_refused_and_kept(tmp_path):
    text = tmp_path / "notes.parquet"
    text.write_text("my notes")
    with pytest.raises(SweepError, match="notes.parquet: not a sweep table"):
        run_sweep(**SMALL, seeds=[0], out=text, progress=False)
    assert text.read_text() == "my notes"
    other = tmp_path / "other.parquet"
    pd.DataFrame({"model": ["lenet"], "score": [1.0]}).to_parquet(other)
    before = other.read_bytes()
    with pytest.raises(SweepError, match=r"missing \['precision'"):
        run_sweep(**SMALL, seeds=[0], out=other, progress=False)
    assert other.read_bytes() == before


def test_a_table_from_before_the_cle_and_granularity_columns_is_resumed_as_their_defaults(tmp_path):
    """Its rows were computed as trained with per-channel scales: the same configurations are finished
    (no cluster is started), the other values of the new dimensions are not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = [c for c in COLUMNS if c not in LATER_COLUMNS]
    row = dict(model="lenet", precision="w8a8", method="minmax", rounding="nearest", seed=0, calibration=20,
               samples=50, accuracy=0.98, fp32_accuracy=0.98, drop=0.0, model_bytes=63383, seconds=1.0,
               finished=pd.Timestamp("2026-01-01", tz="UTC"))
    out = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pandas(pd.DataFrame([row], columns=old), preserve_index=False), out)
    table = run_sweep(["lenet"], ["w8a8"], ["minmax"], ["nearest"], [0], out, calibration=20, samples=50,
                      progress=False)  # nothing to do: no cluster, no rewrite
    assert list(table.columns) == list(COLUMNS) and len(table) == 1
    assert not table.loc[0, "cle"] and table.loc[0, "granularity"] == "channel"
    assert table.loc[0, "accuracy"] == 0.98  # the stored row, not a recomputed one
    assert pq.read_table(out).column_names == old  # the file was not rewritten


def test_cle_and_per_tensor_rows_are_the_documented_recipe(mnist_train, mnist_test):
    """In-process (the function a worker runs): equalize the FP32 weights, calibrate, quantize per tensor.
    The configuration is one where equalization changes the answer, so a sweep ignoring it fails."""
    base = dict(model="lenet", precision="w3a8", method="minmax", rounding="nearest", seed=1,
                calibration=20, samples=1000)
    rows = {(c, g): run_configuration({**base, "cle": c, "granularity": g})
            for c in (False, True) for g in ("channel", "tensor")}
    for (c, g), row in rows.items():
        acc, fp32, nbytes, _ = _direct(row, mnist_train, mnist_test)
        assert (row["accuracy"], row["fp32_accuracy"], row["model_bytes"]) == (acc, fp32, nbytes), (c, g)
        assert (row["cle"], row["granularity"]) == (c, g)
    # Both dimensions change the answer here (measured: 96.1 % with CLE against 98.2 % per tensor, 97.2 %
    # per channel), so a sweep that ignored either would fail the equalities above.
    assert rows[True, "tensor"]["accuracy"] != rows[False, "tensor"]["accuracy"]
    assert rows[False, "tensor"]["accuracy"] != rows[False, "channel"]["accuracy"]
    assert rows[False, "tensor"]["model_bytes"] < rows[False, "channel"]["model_bytes"]  # one scale per layer


@pytest.mark.slow  # waits out the 10 s connect timeout
def test_bad_and_unreachable_schedulers_fail_fast(tmp_path):
    with pytest.raises(InputError, match="expected an address like tcp://HOST:PORT"):
        run_sweep(**SMALL, seeds=[0], out=tmp_path / "t.parquet", scheduler="localhost", progress=False)
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(SweepError, match=f"tcp://127.0.0.1:{port}: not reachable within 10 s"):
        run_sweep(**SMALL, seeds=[0], out=tmp_path / "t.parquet", scheduler=f"tcp://127.0.0.1:{port}",
                  progress=False)
    assert time.monotonic() - t0 < 60  # the connect timeout, not distributed's default of minutes
    assert not (tmp_path / "t.parquet").exists()


# -- real runs ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_cluster_rows_match_direct_computation_and_resume_skips_them(tmp_path, mnist_train,
                                                                             mnist_test):
    out = tmp_path / "sweep.parquet"
    table = run_sweep(**SMALL, seeds=[0, 1], out=out, calibration=20, samples=200, progress=False,
                      workers=2)
    assert list(table.columns) == list(COLUMNS) and len(table) == 4
    assert set(zip(table["precision"], table["seed"], strict=True)) == {
        ("w8a8", 0), ("w8a8", 1), ("w4a4", 0), ("w4a4", 1)}
    assert (table["samples"] == 200).all() and (table["calibration"] == 20).all()
    _check_rows(table, mnist_train, mnist_test)
    # A seed changes what the quantized model saw: its calibration images.
    first = table.iloc[0].to_dict()
    assert not np.array_equal(_direct(first, mnist_train, mnist_test)[3],
                              _direct({**first, "seed": 1 - first["seed"]}, mnist_train, mnist_test)[3])
    assert read_table(out).equals(table)

    resumed = run_sweep(**SMALL, seeds=[0, 1, 2], out=out, calibration=20, samples=200, progress=False,
                        workers=1)
    assert len(resumed) == 6
    old = resumed.merge(table, on=list(COLUMNS))
    assert len(old) == 4  # the four finished rows kept bit for bit, finish times included
    new = resumed[resumed["finished"] > table["finished"].max()]
    assert sorted(new["precision"]) == ["w4a4", "w8a8"] and set(new["seed"]) == {2}
    _check_rows(new, mnist_train, mnist_test)
    # Another sample count is another configuration, not a finished one.
    again = run_sweep(**SMALL, seeds=[2], out=out, calibration=20, samples=100, progress=False, workers=1)
    assert len(again) == 8 and sorted(again["samples"]) == [100, 100] + [200] * 6


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_the_rows_it_finished(tmp_path):
    out = tmp_path / "sweep.parquet"
    cmd = [sys.executable, "-m", "microcnn.cli", "sweep", "--models", "lenet", "--precisions",
           "w8a8,w4a8,w4a4", "--methods", "minmax,mse", "--seeds", "0,1,2", "--samples", "100",
           "--calibration", "10", "--workers", "1", "--out", str(out), "--json"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no row in 600 s"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, as in a terminal
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err.decode()[-2000:]
    kept = read_table(out)
    assert 1 <= len(kept) < 18  # finished rows kept, the rest not invented
    assert kept["accuracy"].between(0.9, 1).all() and (kept["samples"] == 100).all()
    assert not list(tmp_path.glob(".sweep.parquet.*"))  # no temporary file left behind


@pytest.mark.slow
def test_a_real_scheduler_and_worker_on_localhost(tmp_path, mnist_train, mnist_test):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=_env(), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen(["dask", "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--no-dashboard"], env=_env(), cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from dask.distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
            worker_pids = set(client.run(os.getpid).values())
        assert os.getpid() not in worker_pids
        out = tmp_path / "remote.parquet"
        table = run_sweep(["lenet"], ["w4a8"], ["mse"], ["nearest", "gptq"], [3], out, scheduler=address,
                          calibration=20, samples=150, progress=False)
        assert len(table) == 2 and set(table["rounding"]) == {"nearest", "gptq"}
        _check_rows(table, mnist_train, mnist_test)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
