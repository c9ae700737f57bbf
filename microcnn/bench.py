"""Benchmarks that return pandas tables: headline, latency, start-up/compile time.

Timings are medians of ``repeats`` runs after a warm-up run, with Numba's thread count pinned for
the duration (``threads``), so ratios measured side by side in one process are comparable.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

PRECISIONS = ("fp32", "int8", "w4a8", "int4")
# (weight bits, activation bits) of each quantized precision; "int4" is W4A4 as in the reference tool.
PRECISION_BITS = {"int8": (8, 8), "w4a8": (4, 8), "int4": (4, 4)}


@contextlib.contextmanager
def pinned_threads(threads: int | None):
    """Run the block with Numba (and BLAS, via env for children) limited to ``threads``."""
    import numba

    if threads is None:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch1_latency(model, images, n: int = 200, repeats: int = 5) -> float:
    """Median over repeats of the mean seconds per image when images are predicted one at a time."""
    singles = [images[i:i + 1] for i in range(min(n, len(images)))]

    def run():
        for x in singles:
            model.predict(x)

    return median_time(run, repeats) / len(singles)


def build_precision(net, precision: str, calibration=None):
    """The model that runs ``precision``: the FP32 net itself or a quantized copy of it."""
    if precision == "fp32":
        return net
    from .quant import quantize

    if precision not in PRECISION_BITS:
        from .errors import InputError

        raise InputError(f"precision: expected one of {PRECISIONS}, found {precision!r}")
    weight_bits, act_bits = PRECISION_BITS[precision]
    return quantize(net, calibration, weight_bits=weight_bits, act_bits=act_bits)


def headline_table(models: dict, images, labels, repeats: int = 5, threads: int | None = 1,
                   latency_samples: int = 200) -> pd.DataFrame:
    """One row per precision: Precision, Inference Time (ms), Per Image (us), Latency (us), Memory,
    Speedup and Savings relative to the first (FP32) row, Accuracy on ``labels``."""
    rows = []
    with pinned_threads(threads):
        for name, model in models.items():
            t = median_time(lambda m=model: m.predict(images, batch_size=len(images)), repeats)
            lat = batch1_latency(model, images, latency_samples, repeats=3)
            acc = float((model.predict(images).argmax(1) == labels).mean())
            rows.append({"Precision": name.upper(), "Inference Time (ms)": t * 1e3,
                         "Per Image (us)": t * 1e6 / len(images), "Latency (us)": lat * 1e6,
                         "Memory (KiB)": model.nbytes / 1024, "model_bytes": int(model.nbytes),
                         "Accuracy (%)": acc * 100})
    df = pd.DataFrame(rows)
    df.insert(5, "Speedup", df["Inference Time (ms)"].iloc[0] / df["Inference Time (ms)"])
    df.insert(6, "Savings (%)", 100 * (1 - df["model_bytes"] / df["model_bytes"].iloc[0]))
    return df


_STARTUP_SCRIPT = """
import time, json
t0 = time.perf_counter()
import microcnn, numpy as np
from microcnn.cli import _load_model
t1 = time.perf_counter()
net = _load_model({weights!r})
x = np.zeros((1, 1, 28, 28), np.float32)
net.predict(x)
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_predict_s": t2 - t1}}))
"""


def startup_times(weights="bundled") -> dict:
    """Fresh-process times: import, and first prediction with a cold Numba cache (compile) and a warm one.

    The cold run points NUMBA_CACHE_DIR at an empty directory, so it measures real compilation
    without disturbing the user's cache; the warm run reuses that directory's fresh cache.
    """
    script = _STARTUP_SCRIPT.format(weights=str(weights))
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                 text=True, check=True)
            out[label] = json.loads(res.stdout.strip().splitlines()[-1])
    return {"import_s": out["warm"]["import_s"], "compile_s": out["cold"]["first_predict_s"],
            "warm_first_predict_s": out["warm"]["first_predict_s"]}


def headline_records(df: pd.DataFrame) -> list[dict]:
    """The ``"headline"`` JSON rows of ``microcnn bench --json``."""
    return [{"precision": r["Precision"].lower(), "time_ms": round(r["Inference Time (ms)"], 3),
             "per_image_us": round(r["Per Image (us)"], 3), "latency_us": round(r["Latency (us)"], 3),
             "model_bytes": int(r["model_bytes"]), "accuracy": round(r["Accuracy (%)"] / 100, 6)}
            for r in df.to_dict("records")]


def format_table(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """Plain-text rendering for terminals (no optional tabulate dependency)."""
    shown = df.drop(columns=[c for c in df.columns if c == "model_bytes"])
    return shown.to_string(index=False, float_format=lambda v: format(v, floatfmt))


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def _records(df: pd.DataFrame, columns: dict) -> list[dict]:
    """Rename a table's columns to JSON keys, keeping only those named."""
    return json.loads(df[list(columns)].rename(columns=columns).to_json(orient="records"))


def run(args) -> dict:
    """``microcnn bench``: build every requested table, print them (unless --json), return the report."""
    import numba

    from .cli import (
        _calibration_images,
        _data_dir,
        _load_model,
        _precision_of,
        _stored_precision,
        _test_images,
    )
    from .errors import InputError

    say = (lambda *a: None) if args.json else print
    images, labels = _test_images(args, args.samples)
    net = _load_model(args.model)
    stored = _stored_precision(net)
    if stored is None:
        precisions = args.precisions or list(PRECISIONS)
    elif args.precisions in (None, [stored]):  # a quantized file is timed as stored, under its own name
        precisions = [stored]
    else:
        raise InputError(f"--precisions {','.join(args.precisions)}: {args.model} is already quantized "
                         f"({stored}) and runs only as stored; omit --precisions")
    if stored is not None and (args.per_layer or args.conv or args.compare):
        raise InputError(f"--per-layer, --conv and --compare compare against FP32: they need an FP32 model, "
                         f"and {args.model} is quantized ({stored})")
    calibration = None
    fp32 = getattr(net, "network", net)  # a storage-compressed model quantizes its decompressed network
    if stored is None and any(p != "fp32" for p in precisions):
        from .quant import calibrate

        calibration = calibrate(fp32, _calibration_images(args, args.calibration), samples=args.calibration,
                                method=args.method, progress=not args.json)
    built = [net if stored is not None or p == "fp32" else build_precision(fp32, p, calibration)
             for p in precisions]
    models = {_precision_of(m): m for m in built}  # each row named by what its model computes in
    with pinned_threads(args.threads):
        threads = numba.get_num_threads()
    report = {"threads": threads, "samples": len(images), "model": args.model}
    if calibration is not None:
        report["calibration_samples"] = calibration.samples

    head = headline_table(models, images, labels, repeats=args.repeats, threads=args.threads)
    say(f"Headline: LeNet-5, {len(images)} test images batched, {threads} thread(s), "
        f"median of {args.repeats}")
    say(format_table(head))
    report["headline"] = headline_records(head)
    report["latency_us"] = {r["precision"]: r["latency_us"] for r in report["headline"]}

    if not args.no_startup:
        startup = startup_times(args.model if args.model != "bundled" else "bundled")
        report.update(startup)
        say(f"\nimport {startup['import_s']:.2f} s; first prediction: cold cache (compile) "
            f"{startup['compile_s']:.2f} s, warm cache {startup['warm_first_predict_s']:.2f} s")

    if args.per_layer:
        from .quant import per_layer_table

        with pinned_threads(args.threads):
            table = per_layer_table(fp32, calibration, images)
        say("\nPer layer:\n" + format_table(table, ".4g"))
        from .analysis import conv_precision_table

        convs = conv_precision_table(table)
        say("\nConv layers, FP32 im2col vs INT8 im2col (fused conv+relu+pool group):\n"
            + format_table(convs, ".3f"))
        report["conv_precision"] = _records(convs, {"Layer": "layer", "FP32 im2col (ms)": "fp32_ms",
                                                    "INT8 im2col (ms)": "int8_ms", "Speedup": "speedup"})
        report["per_layer"] = _records(table, {
            "Layer": "layer", "Type": "type", "FP32 Time (ms)": "fp32_ms", "INT8 Time (ms)": "int8_ms",
            "INT4 Time (ms)": "int4_ms", "INT8 MSE": "int8_mse", "INT4 MSE": "int4_mse"})

    if args.conv:
        from .convolution import benchmark_algorithms

        with pinned_threads(args.threads):
            table = benchmark_algorithms(fp32, images, repeats=args.repeats, progress=not args.json)
        say("\nConvolution algorithms:\n" + format_table(table, ".4g"))
        report["conv"] = _records(table, {
            "Algorithm": "algorithm", "Total Time (ms)": "total_ms", "Per Image (us)": "per_image_us",
            "Speedup": "speedup", "Max Error vs Naive": "max_error"})

    if args.train:
        from .train import throughput_table

        table = throughput_table(threads=args.threads, data_dir=_data_dir(args),
                                 compare=args.compare in ("torch", "all"))
        say("\nTraining throughput (batch 64):\n" + format_table(table, ".0f"))
        report["train"] = _records(table, {"System": "system", "Dataset": "dataset",
                                           "Images/s": "images_per_s"})

    if args.compare:
        from .compare import compare_table

        table = compare_table(fp32, images, labels, calibration_images=_calibration_images(
            args, args.calibration), threads=args.threads, repeats=args.repeats,
            systems=args.compare, method=args.method)
        say("\nComparison:\n" + format_table(table, ".3f"))
        report["compare"] = _records(table, {"System": "system", "Precision": "precision",
                                             "Time (ms)": "time_ms", "Per Image (us)": "per_image_us",
                                             "Accuracy": "accuracy"})
    return report
