"""Benchmarks that return pandas tables: headline, latency, start-up/compile time.

Timings are medians of ``repeats`` runs after a warm-up run, with Numba's thread count pinned for
the duration (``threads``), so ratios measured side by side in one process are comparable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd

from .quant.precision import PRECISIONS, build_precision, precision_of, stored_precision
from .timing import batch1_latency, machine_loop, median_time, pinned_threads

__all__ = ["PRECISIONS", "batch1_latency", "build_precision", "format_table", "headline_records",
           "headline_table", "median_time", "pinned_threads", "random_images", "run", "startup_times",
           "threads_table"]


def headline_table(models: dict, images, labels, repeats: int = 5, threads: int | None = 1,
                   latency_samples: int = 200) -> pd.DataFrame:
    """One row per precision: Precision, Inference Time (ms), Per Image (us), Latency (us), Memory,
    Speedup and Savings relative to the first (FP32) row, Accuracy on ``labels``."""
    rows = []
    with pinned_threads(threads):
        for name, model in models.items():
            # mypy cannot infer a lambda whose only parameter has a default against Callable[[], Any]
            # (it is one); the default binds this iteration's model.
            t = median_time(lambda m=model: m.predict(images, batch_size=len(images)),  # type: ignore[misc]
                            repeats)
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


def threads_table(models: dict, images, threads: list[int], repeats: int = 5) -> pd.DataFrame:
    """Batched time per precision and thread count (at most NUMBA_NUM_THREADS): Precision, Threads, Time
    (ms), Scaling (time at threads[0] / time), Machine (the same ratio for ``timing.machine_loop``, timed
    right after the model in each round: the scaling the cores themselves gave meanwhile). The counts take
    turns, a run untimed (waking idle cores) then one timed per round; a time is the median of its rounds,
    so a slow spell hits all counts alike."""
    rows = []
    for name, model in models.items():
        seconds: dict[int, list[float]] = {t: [] for t in threads}
        machine: dict[int, list[float]] = {t: [] for t in threads}
        for _ in range(max(1, repeats)):
            for t in threads:
                with pinned_threads(t):  # (mypy cannot type the defaulted lambda: see headline_table)
                    seconds[t].append(median_time(lambda m=model: m.predict(images, batch_size=len(images)),  # type: ignore[misc]
                                                  1, warmup=1))
                    machine[t].append(median_time(machine_loop, 1, warmup=1))
        for t in threads:
            rows.append({"Precision": name.upper(), "Threads": t, "Time (ms)": np.median(seconds[t]) * 1e3,
                         "Scaling": np.median(seconds[threads[0]]) / np.median(seconds[t]),
                         "Machine": np.median(machine[threads[0]]) / np.median(machine[t])})
    return pd.DataFrame(rows)


_STARTUP_SCRIPT = """
import time, json
t0 = time.perf_counter()
import microcnn, numpy as np
from microcnn.resolve import load_model_spec
t1 = time.perf_counter()
net = load_model_spec({weights!r})
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


def run(model: str = "bundled", *, data: str | None = None, samples: int = 1000, threads: int | list = 1,
        repeats: int = 5, calibration: int = 100, method: str = "mse", precisions=None, conv: bool = False,
        per_layer: bool = False, train: bool = False, compare: str | None = None, startup: bool = True,
        quiet: bool = False, dataset: str | None = None) -> dict:
    """``microcnn bench``: build every requested table, print them (unless ``quiet``), return the report.

    ``model``: a spec of ``microcnn.resolve.load_model_spec``; ``data``: the dataset directory;
    ``dataset``: mnist, fashion-mnist or an .npz path (default: the model's own dataset);
    ``precisions``: names of ``microcnn.quant.precision.PRECISIONS`` (default: all for an FP32 model, the
    file's own for a quantized one); ``compare``: None, "torch", "onnxruntime" or "all"; ``threads``: a
    count, or a list of counts -- the tables use the first, and a ``threads`` scaling table (batched
    time of every precision at each count) is added."""
    import numba

    from .errors import InputError
    from .resolve import (
        check_data_fits,
        data_dir,
        dataset_of,
        load_calibration_images,
        load_model_spec,
        load_test_images,
    )

    say = (lambda *a: None) if quiet else print
    thread_counts = [int(t) for t in threads] if isinstance(threads, list | tuple) else [int(threads)]
    threads = thread_counts[0]
    dataset = dataset or dataset_of(model)
    images, labels = load_test_images(samples, data, "--samples", dataset)
    net = load_model_spec(model)
    check_data_fits(net, images, labels, f"--dataset {dataset}")
    stored_as = stored_precision(net)
    stored = stored_as.name if stored_as is not None else None
    if stored is None:
        precisions = precisions or list(PRECISIONS)
    elif precisions in (None, [stored]):  # a quantized file is timed as stored, under its own name
        precisions = [stored]
    else:
        raise InputError(f"--precisions {','.join(precisions)}: {model} is already quantized "
                         f"({stored}) and runs only as stored; omit --precisions")
    if stored is not None and (per_layer or conv or compare):
        raise InputError(f"--per-layer, --conv and --compare compare against FP32: they need an FP32 model, "
                         f"and {model} is quantized ({stored})")
    calibration_stats = None
    fp32 = getattr(net, "network", net)  # a storage-compressed model quantizes its decompressed network
    if stored is None and any(p != "fp32" for p in precisions):
        from .quant import calibrate

        images_cal = load_calibration_images(calibration, data, "--calibration", dataset)
        calibration_stats = calibrate(fp32, images_cal, samples=calibration, method=method,
                                      progress=not quiet)
    built = [net if stored is not None or p == "fp32" else build_precision(fp32, p, calibration_stats)
             for p in precisions]
    models = {precision_of(m).name: m for m in built}  # each row named by what its model computes in
    with pinned_threads(threads):
        used_threads = numba.get_num_threads()
    report = {"threads": used_threads, "samples": len(images), "model": model}
    if calibration_stats is not None:
        report["calibration_samples"] = calibration_stats.samples

    head = headline_table(models, images, labels, repeats=repeats, threads=threads)
    say(f"Headline: {model} on {dataset}, {len(images)} test images batched, {used_threads} thread(s), "
        f"median of {repeats}")
    say(format_table(head))
    report["headline"] = headline_records(head)
    report["latency_us"] = {r["precision"]: r["latency_us"] for r in report["headline"]}

    if len(thread_counts) > 1:
        table = threads_table(models, images, thread_counts, repeats=repeats)
        say(f"\nThreads (batched, {len(images)} images; Scaling = time at {thread_counts[0]} / time; "
            "Machine = the same for a compute-only loop timed in the same rounds):\n" + format_table(table))
        records = _records(table, {"Precision": "precision", "Threads": "threads", "Time (ms)": "time_ms",
                                   "Scaling": "scaling", "Machine": "machine_scaling"})
        # lower case, as the headline's rows and latency_us name the precisions
        report["threads_table"] = [r | {"precision": r["precision"].lower()} for r in records]

    if startup:
        times = startup_times(model)
        report.update(times)
        say(f"\nimport {times['import_s']:.2f} s; first prediction: cold cache (compile) "
            f"{times['compile_s']:.2f} s, warm cache {times['warm_first_predict_s']:.2f} s")

    if per_layer:
        from .quant import per_layer_table

        with pinned_threads(threads):
            table = per_layer_table(fp32, calibration_stats, images)
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

    if conv:
        from .convolution import benchmark_algorithms

        with pinned_threads(threads):
            table = benchmark_algorithms(fp32, images, repeats=repeats, progress=not quiet)
        say("\nConvolution algorithms:\n" + format_table(table, ".4g"))
        report["conv"] = _records(table, {
            "Algorithm": "algorithm", "Total Time (ms)": "total_ms", "Per Image (us)": "per_image_us",
            "Speedup": "speedup", "Max Error vs Naive": "max_error"})

    if train:
        from .train import throughput_table

        table = throughput_table(threads=threads, data_dir=data_dir(data),
                                 compare=compare in ("torch", "all"))
        say("\nTraining throughput (batch 64):\n" + format_table(table, ".0f"))
        report["train"] = _records(table, {"System": "system", "Dataset": "dataset",
                                           "Images/s": "images_per_s"})

    if compare:
        from .compare import compare_table

        table = compare_table(fp32, images, labels, calibration_images=load_calibration_images(
            calibration, data, "--calibration", dataset), threads=threads, repeats=repeats,
            systems=compare, method=method)
        say("\nComparison:\n" + format_table(table, ".3f"))
        report["compare"] = _records(table, {"System": "system", "Precision": "precision",
                                             "Time (ms)": "time_ms", "Per Image (us)": "per_image_us",
                                             "Accuracy": "accuracy"})
    return report
