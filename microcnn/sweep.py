"""Quantization sweeps on Dask: every (model, precision, method, rounding, cle, granularity, seed) of a grid,
one row each.

``run_sweep`` sends one task per configuration to ``dask.distributed`` (an embedded LocalCluster of
single-threaded worker processes, or an existing cluster given by address) and writes the table to
Parquet after every finished configuration, atomically, so an interrupted sweep keeps what it finished
and a rerun with the same ``out`` skips it.

What a seed changes: the ``calibration`` images, drawn at random from the model's TRAINING split with
that seed, and AdaRound's batches (nearest and GPTQ rounding are deterministic). Accuracy is on the first
``samples`` images of the TEST split, and ``drop`` is the FP32 model's accuracy on those same images
minus the quantized one's (both fractions of 1). ``cle``: the FP32 weights cross-layer equalized
(``quant.cle.equalize``) before calibrating; ``granularity``: one weight scale per output "channel" or
per "tensor" (CLE matters most for the latter). Workers find the datasets by the same search as
``load_dataset`` (``data_dir`` passed on, else $MICROCNN_DATA and the defaults on the worker's machine).
"""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime

from .errors import InputError, MicrocnnError

# Named models a sweep can load on any worker, and the dataset each was trained on.
MODEL_DATASETS = {"lenet": "mnist", "fashion": "fashion-mnist"}
KEY = ("model", "precision", "method", "rounding", "cle", "granularity", "seed", "calibration", "samples")
# Columns added after the first tables were written, with the value those tables' rows were computed with.
LATER_COLUMNS = {"cle": False, "granularity": "channel"}
GRANULARITIES = ("channel", "tensor")
COLUMNS = (*KEY, "accuracy", "fp32_accuracy", "drop", "model_bytes", "seconds", "finished")
CONNECT_TIMEOUT = 10.0  # seconds to reach an existing scheduler before giving up


class SweepError(MicrocnnError):
    """A sweep could not run: no scheduler reached, or an output that is not a sweep table."""


def parse_precision(name: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a quantized precision: ``wXaY`` with X, Y in 2..8, ``int8`` =
    w8a8, ``int4`` = w4a4 (``quant.precision.parse_precision``; ``bits outside 2..8`` refused by name)."""
    from .quant.precision import parse_precision as parse

    p = parse(name)
    if p.is_float:
        raise InputError(f"precision {name!r}: expected a quantized precision (fp32 is every row's "
                         "reference)")
    return p.weight_bits, p.act_bits


def _names(what: str, values, known=None) -> list:
    values = list(dict.fromkeys(values or ()))
    if not values:
        raise InputError(f"{what}: expected at least one value, found none (an empty grid)")
    unknown = [v for v in values if known is not None and v not in known]
    if unknown:
        raise InputError(f"{what}: expected names from {sorted(known)}, found {unknown}")
    return values


def grid(models, precisions, methods, roundings, seeds, calibration: int = 100, samples: int | None = None,
         cle=(False,), granularities=("channel",)) -> list[dict]:
    """The configurations of a sweep, validated against the registries (names are checked before any
    work). ``fp32`` among the precisions is skipped: it is the reference every row's ``drop`` uses.
    ``cle``: booleans (False: as trained, True: cross-layer equalized first)."""
    from .quant.observers import OBSERVERS
    from .quant.rounding import ROUNDINGS

    models = _names("models", models, MODEL_DATASETS)
    precisions = [p for p in _names("precisions", precisions) if str(p).strip().lower() != "fp32"]
    if not precisions:
        raise InputError("precisions: expected at least one quantized precision (fp32 is the reference of "
                         "every row, not a row), found only fp32")
    precisions = list(dict.fromkeys(f"w{w}a{a}" for w, a in map(parse_precision, precisions)))
    methods = _names("methods", methods, OBSERVERS)
    roundings = _names("roundings", roundings, ROUNDINGS)
    cle = _names("cle", cle)
    if any(not isinstance(c, bool) for c in cle):
        raise InputError(f"cle: expected True (equalize) or False, found {cle}")
    granularities = _names("granularities", granularities, GRANULARITIES)
    seeds = _names("seeds", seeds)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise InputError(f"seeds: expected non-negative integers, found {seeds}")
    for what, n in (("calibration", calibration), ("samples", samples)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InputError(f"{what}: expected a positive number of images, found {n!r}")
    return [dict(model=m, precision=p, method=me, rounding=r, cle=c, granularity=g, seed=s,
                 calibration=calibration, samples=-1 if samples is None else samples)  # -1: whole test split
            for m in models for p in precisions for me in methods for r in roundings for c in cle
            for g in granularities for s in seeds]


@functools.lru_cache(maxsize=4)
def _model_and_data(model: str, samples: int, data_dir):
    """FP32 model, training images, test images and labels, FP32 test accuracy: once per worker."""
    from .datasets import load_dataset
    from .lenet import fashion_cnn, lenet

    net = (lenet if model == "lenet" else fashion_cnn)(weights="bundled")
    dataset = MODEL_DATASETS[model]
    train = load_dataset(dataset, "train", data_dir, download=False, progress=False)[0]
    test, labels = load_dataset(dataset, "test", data_dir, download=False, progress=False,
                                samples=None if samples < 0 else samples)
    return net, train, test, labels, net.accuracy(test, labels)


@functools.lru_cache(maxsize=4)
def _equalized(model: str):
    from .lenet import fashion_cnn, lenet
    from .quant.cle import equalize

    return equalize((lenet if model == "lenet" else fashion_cnn)(weights="bundled"))


def run_configuration(config: dict, data_dir=None) -> dict:
    """One row of the table: calibrate on ``calibration`` training images drawn with ``seed``, quantize,
    score on the test images. Runs on a worker (also usable in-process)."""
    from .bench import pinned_threads
    from .quant import calibrate, quantize

    with pinned_threads(1):  # one task per worker thread: Numba must not oversubscribe the machine
        net, train, test, labels, fp32 = _model_and_data(config["model"], config["samples"], data_dir)
        t0 = time.perf_counter()
        if config["cle"]:  # before calibrating: equalization changes the activation ranges
            net = _equalized(config["model"])
        cal = calibrate(net, train, method=config["method"], samples=config["calibration"],
                        seed=config["seed"], progress=False)
        w, a = parse_precision(config["precision"])
        qnet = quantize(net, cal, weight_bits=w, act_bits=a, rounding=config["rounding"], seed=config["seed"],
                        per_channel=config["granularity"] == "channel")
        acc = qnet.accuracy(test, labels)
        seconds = time.perf_counter() - t0
    return {**config, "accuracy": acc, "fp32_accuracy": fp32, "drop": fp32 - acc,
            "model_bytes": int(qnet.nbytes), "seconds": seconds, "finished": datetime.now(UTC)}


def read_table(path):
    """The rows of an existing sweep file as a DataFrame; SweepError for a file that is not one."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .fileutil import regular_file_size

    regular_file_size(path, "sweep table")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise SweepError(f"{path}: not a sweep table (expected a Parquet file written by microcnn sweep; "
                         f"{exc}); not replaced: choose another --out") from None
    missing = [c for c in COLUMNS if c not in table.column_names and c not in LATER_COLUMNS]
    if missing:
        raise SweepError(f"{path}: not a sweep table (expected the columns {list(COLUMNS)}, missing "
                         f"{missing}); not replaced: choose another --out")
    df = table.to_pandas()
    for column, value in LATER_COLUMNS.items():  # a table from before the column: its rows had this value
        if column not in df:
            df[column] = value
    return pd.DataFrame(df, columns=list(COLUMNS))


def _write_table(rows, path) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .fileutil import atomic_open

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    with atomic_open(path, "wb") as f:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)


@functools.cache
def _check_address(scheduler: str) -> str:
    if not re.fullmatch(r"(tcp|tls|inproc|ws|wss)://[^\s/]+", scheduler):
        raise InputError(f"scheduler: expected an address like tcp://HOST:PORT, found {scheduler!r}")
    return scheduler


def _client(scheduler, workers: int):
    from dask.distributed import Client, LocalCluster

    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(_check_address(scheduler), timeout=CONNECT_TIMEOUT), None
    except (OSError, TimeoutError) as exc:
        raise SweepError(f"scheduler {scheduler}: not reachable within {CONNECT_TIMEOUT:g} s ({exc}); "
                         "start one with `dask scheduler` or omit --scheduler for a local cluster") from None


def run_sweep(models, precisions, methods, roundings, seeds, out, scheduler=None, calibration: int = 100,
              samples: int | None = None, progress: bool = True, workers: int | None = None, data_dir=None,
              cle=(False,), granularities=("channel",)):
    """Run the grid (see ``grid``) on Dask and return the whole table of ``out`` as a DataFrame, one
    row per configuration with the columns ``COLUMNS`` (model_bytes: what the quantized model stores;
    seconds: calibrate + quantize + score on the worker; finished: UTC time the row was computed).

    ``out``: Parquet file, rewritten atomically after each finished configuration. An existing sweep
    table is resumed (its configurations are skipped and its rows kept); any other existing file is
    refused. ``scheduler``: None (a LocalCluster of ``workers`` processes, default one per CPU up to the
    number of configurations) or the address of a running scheduler (``tcp://host:port``).
    """
    import os

    from tqdm.auto import tqdm

    from .fileutil import check_destination

    configs = grid(models, precisions, methods, roundings, seeds, calibration, samples, cle, granularities)
    if scheduler is not None:
        _check_address(scheduler)
    check_destination(out)  # unwritable: refused before any work
    rows = read_table(out).to_dict("records") if os.path.lexists(out) else []
    done = {tuple(r[k] for k in KEY) for r in rows}
    todo = [c for c in configs if tuple(c[k] for k in KEY) not in done]
    if todo:
        from dask.distributed import as_completed

        client, cluster = _client(scheduler, workers or min(len(todo), os.cpu_count() or 1))
        try:
            futures = [client.submit(run_configuration, c, data_dir, pure=False) for c in todo]
            for future in tqdm(as_completed(futures), total=len(futures), desc="sweep", unit="config",
                               disable=not progress):
                rows.append(future.result())
                _write_table(rows, out)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return read_table(out)
