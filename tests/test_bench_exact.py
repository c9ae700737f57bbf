"""What ``microcnn bench`` builds from its measurements: the headline table, its JSON records, the text
rendering and the report of ``bench.run`` with every optional table. The measurements themselves
(timers, loaders, the other tables' producers) are replaced by fixed stand-ins, so every number in the
result can be computed here by hand: the test checks the bookkeeping, not the clock."""

import contextlib

import numpy as np
import pandas as pd
import pytest

import microcnn.analysis
import microcnn.compare
import microcnn.convolution
import microcnn.quant
import microcnn.resolve
import microcnn.train
from microcnn import bench
from microcnn.errors import InputError, MicrocnnError

LABELS = np.array([0, 1, 2, 1, 0])
IMAGES = np.zeros((5, 1, 28, 28), np.float32)


class Model:
    """Stand-in model: fixed predicted classes, size and (via the stubbed timers) times."""

    input_shape = None  # as a model that records none: any images fit

    def __init__(self, classes, nbytes, seconds, latency, settings=None):
        self.classes, self.nbytes, self.seconds, self.latency = np.asarray(classes), nbytes, seconds, latency
        if settings is not None:
            self.settings = settings
        self.batch_sizes = []

    def predict(self, x, batch_size=256):
        self.batch_sizes.append(batch_size)
        return np.eye(3, dtype=np.float32)[self.classes[:len(x)]]


@pytest.fixture()
def timers(monkeypatch):
    calls = []

    def median_time(fn, repeats):
        model = fn.__defaults__[0]
        fn()
        calls.append(("median", model, repeats))
        return model.seconds

    def batch1_latency(model, images, n, repeats):
        calls.append(("latency", model, n, repeats, len(images)))
        return model.latency

    monkeypatch.setattr(bench, "median_time", median_time)
    monkeypatch.setattr(bench, "batch1_latency", batch1_latency)
    return calls


def models():
    return {"fp32": Model([0, 1, 2, 1, 0], 4000, 0.02, 0.004),             # 5 / 5 right
            "int8": Model([0, 1, 2, 2, 2], 1000, 0.005, 0.001, {"weight_bits": 8, "act_bits": 8}),  # 3 / 5
            "int4": Model([1, 1, 1, 1, 1], 600, 0.008, 0.002, {"weight_bits": 4, "act_bits": 4})}   # 2 / 5


COLUMNS = ["Precision", "Inference Time (ms)", "Per Image (us)", "Latency (us)", "Memory (KiB)", "Speedup",
           "Savings (%)", "model_bytes", "Accuracy (%)"]


def test_headline_table_rows_are_computed_from_each_models_measurements(timers):
    ms = models()
    df = bench.headline_table(ms, IMAGES, LABELS, repeats=7, threads=1, latency_samples=3)
    assert list(df.columns) == COLUMNS
    expected = pd.DataFrame({
        "Precision": ["FP32", "INT8", "INT4"],
        "Inference Time (ms)": [20.0, 5.0, 8.0],
        "Per Image (us)": [0.02e6 / 5, 0.005e6 / 5, 0.008e6 / 5],
        "Latency (us)": [4000.0, 1000.0, 2000.0],
        "Memory (KiB)": [4000 / 1024, 1000 / 1024, 600 / 1024],
        "Speedup": [1.0, 4.0, 2.5],
        "Savings (%)": [0.0, 75.0, 85.0],
        "model_bytes": [4000, 1000, 600],
        "Accuracy (%)": [100.0, 60.0, 40.0]})
    pd.testing.assert_frame_equal(df, expected, check_exact=False, rtol=1e-12)
    assert [c[1:] for c in timers if c[0] == "latency"] == [(m, 3, 3, 5) for m in ms.values()]
    assert [c[1:] for c in timers if c[0] == "median"] == [(m, 7) for m in ms.values()]
    assert all(m.batch_sizes[0] == 5 for m in ms.values())  # timed as one batch of every image


def test_headline_records_are_the_json_rows(timers):
    df = bench.headline_table(models(), IMAGES, LABELS, repeats=1)
    df.loc[1, "Inference Time (ms)"] = 5.00049  # rounding to 3 decimals shows
    df.loc[1, "Per Image (us)"] = 1000.00049
    df.loc[1, "Latency (us)"] = 1000.00049
    assert bench.headline_records(df) == [
        {"precision": "fp32", "time_ms": 20.0, "per_image_us": 4000.0, "latency_us": 4000.0,
         "model_bytes": 4000, "accuracy": 1.0},
        {"precision": "int8", "time_ms": 5.0, "per_image_us": 1000.0, "latency_us": 1000.0,
         "model_bytes": 1000, "accuracy": 0.6},
        {"precision": "int4", "time_ms": 8.0, "per_image_us": 1600.0, "latency_us": 2000.0,
         "model_bytes": 600, "accuracy": 0.4}]
    df.loc[2, "Accuracy (%)"] = 100 / 3
    assert bench.headline_records(df)[2]["accuracy"] == 0.333333


def test_format_table_hides_the_byte_count_and_formats_floats():
    df = pd.DataFrame({"Precision": ["FP32"], "Speedup": [1.23456], "model_bytes": [5]})
    assert bench.format_table(df) == "Precision  Speedup\n     FP32     1.23"
    assert bench.format_table(df, ".3f") == "Precision  Speedup\n     FP32    1.235"


# -- bench.run -----------------------------------------------------------------------------------------
@pytest.fixture()
def world(monkeypatch, timers):
    """Stand-ins for everything ``run`` measures or loads; returns the log of what was asked for."""
    log = {}

    def load_test_images(n, data, what, dataset):
        log["test"] = (n, data, what, dataset)
        return IMAGES[:n], LABELS[:n]

    def load_calibration_images(n, data, what, dataset="mnist"):
        log.setdefault("calibration", []).append((n, data, what, dataset))
        return np.ones((n, 1, 28, 28), np.float32)

    stored = {"q4.safetensors": Model([0, 1, 2, 1, 0], 500, 0.004, 0.001, {"weight_bits": 4, "act_bits": 8})}
    fp32 = Model([0, 1, 2, 1, 0], 4000, 0.02, 0.004)
    monkeypatch.setattr(microcnn.resolve, "load_test_images", load_test_images)
    monkeypatch.setattr(microcnn.resolve, "load_calibration_images", load_calibration_images)
    monkeypatch.setattr(microcnn.resolve, "load_model_spec", lambda spec: stored.get(spec, fp32))

    class Cal:
        samples = 11

    def calibrate(net, images, samples, method, progress):
        log["calibrate"] = (net, len(images), samples, method, progress)
        return Cal()

    built = {"int8": models()["int8"], "int4": models()["int4"],
             "w4a8": Model([2, 2, 2, 2, 2], 700, 0.01, 0.002, {"weight_bits": 4, "act_bits": 8})}

    def build_precision(net, p, cal):
        log.setdefault("built", []).append((net, p, cal))
        return built[p]

    monkeypatch.setattr(microcnn.quant, "calibrate", calibrate)
    monkeypatch.setattr(bench, "build_precision", build_precision)
    monkeypatch.setattr(bench, "startup_times", lambda model: log.setdefault("startup", model) and
                        {"import_s": 0.5, "compile_s": 3.0, "warm_first_predict_s": 0.25})
    per_layer = pd.DataFrame({"Layer": ["conv1", "relu1", "fc1"], "Type": ["Conv2d", "ReLU", "Linear"],
                              "FP32 Time (ms)": [1.0, 0.5, 0.25], "INT8 Time (ms)": [0.5, 0.0, 0.125],
                              "INT4 Time (ms)": [0.75, 0.0, 0.5], "INT8 MSE": [1e-4, 0.0, 2e-4],
                              "INT4 MSE": [1e-3, 0.0, 3e-3]})

    def per_layer_table(net, cal, images):
        log["per_layer"] = (net, cal, len(images))
        return per_layer

    def benchmark_algorithms(net, images, repeats, progress):
        log["conv"] = (net, len(images), repeats, progress)
        return pd.DataFrame({"Algorithm": ["naive"], "Total Time (ms)": [2.0], "Per Image (us)": [400.0],
                             "Speedup": [1.0], "Max Error vs Naive": [0.0], "Extra": [9]})

    def throughput_table(threads, data_dir, compare):
        log["train"] = (threads, data_dir, compare)
        return pd.DataFrame({"System": ["microcnn"], "Dataset": ["MNIST"], "Images/s": [1234.0]})

    def compare_table(net, images, labels, calibration_images, threads, repeats, systems, method):
        log["compare"] = (net, len(images), len(calibration_images), threads, repeats, systems, method)
        return pd.DataFrame({"System": ["torch"], "Precision": ["fp32"], "Time (ms)": [3.0],
                             "Per Image (us)": [600.0], "Accuracy": [0.8]})

    monkeypatch.setattr(microcnn.quant, "per_layer_table", per_layer_table)
    monkeypatch.setattr(microcnn.convolution, "benchmark_algorithms", benchmark_algorithms)
    monkeypatch.setattr(microcnn.train, "throughput_table", throughput_table)
    monkeypatch.setattr(microcnn.compare, "compare_table", compare_table)
    log["fp32"], log["stored"] = fp32, stored
    return log


def test_run_reports_every_precision_with_the_calibration_it_used(world, capsys):
    report = bench.run("bundled", data="d", samples=5, threads=1, repeats=2, calibration=11, method="minmax",
                       quiet=True)
    fp32 = world["fp32"]
    assert world["test"] == (5, "d", "--samples", "mnist")
    assert world["calibration"] == [(11, "d", "--calibration", "mnist")]
    assert world["calibrate"] == (fp32, 11, 11, "minmax", False)
    assert [b[1] for b in world["built"]] == ["int8", "w4a8", "int4"]
    assert all(b[0] is fp32 for b in world["built"])
    assert world["startup"] == "bundled"
    assert list(report) == ["threads", "samples", "model", "calibration_samples", "headline", "latency_us",
                            "import_s", "compile_s", "warm_first_predict_s"]
    assert (report["threads"], report["samples"], report["model"], report["calibration_samples"]) == \
        (1, 5, "bundled", 11)
    assert [r["precision"] for r in report["headline"]] == ["fp32", "int8", "w4a8", "int4"]
    assert [r["accuracy"] for r in report["headline"]] == [1.0, 0.6, 0.2, 0.4]
    assert report["latency_us"] == {"fp32": 4000.0, "int8": 1000.0, "w4a8": 2000.0, "int4": 2000.0}
    assert (report["import_s"], report["compile_s"], report["warm_first_predict_s"]) == (0.5, 3.0, 0.25)
    assert capsys.readouterr().out == ""


def test_run_prints_the_tables_unless_quiet(world, capsys):
    bench.run("fashion", samples=4, precisions=["fp32"], startup=False)
    out = capsys.readouterr().out
    assert out.startswith("Headline: fashion on fashion-mnist, 4 test images batched, 1 thread(s), "
                          "median of 5\n")
    assert "FP32" in out and "model_bytes" not in out
    assert world["test"] == (4, None, "--samples", "fashion-mnist")
    assert "calibration" not in world and "calibrate" not in world and "startup" not in world


def test_run_of_a_quantized_file_times_it_as_stored(world):
    report = bench.run("q4.safetensors", samples=5, startup=False, quiet=True)
    assert [r["precision"] for r in report["headline"]] == ["w4a8"]
    assert "calibration_samples" not in report and "built" not in world
    assert bench.run("q4.safetensors", samples=5, precisions=["w4a8"], startup=False,
                     quiet=True)["headline"] == report["headline"]
    with pytest.raises(InputError, match=r"^--precisions int8: q4.safetensors is already quantized \(w4a8\) "
                                         r"and runs only as stored; omit --precisions$"):
        bench.run("q4.safetensors", precisions=["int8"], quiet=True)
    for option in ({"per_layer": True}, {"conv": True}, {"compare": "torch"}):
        with pytest.raises(InputError, match=r"^--per-layer, --conv and --compare compare against FP32: "
                                             r"they need an FP32 model, and q4.safetensors is quantized "
                                             r"\(w4a8\)$"):
            bench.run("q4.safetensors", startup=False, quiet=True, **option)


def test_run_adds_each_optional_table_as_records(world):
    report = bench.run("bundled", samples=5, threads=1, repeats=3, calibration=11, method="mse",
                       precisions=["fp32", "int8"], per_layer=True, conv=True, train=True, compare="all",
                       startup=False, quiet=True, data="d")
    fp32 = world["fp32"]
    assert world["per_layer"][0] is fp32 and world["per_layer"][2] == 5
    assert world["conv"] == (fp32, 5, 3, False)
    assert world["train"] == (1, "d", True)
    assert world["compare"] == (fp32, 5, 11, 1, 3, "all", "mse")
    assert world["calibration"][1] == (11, "d", "--calibration", "mnist")
    assert report["conv_precision"] == [{"layer": "conv1", "fp32_ms": 1.5, "int8_ms": 0.5, "speedup": 3.0}]
    assert report["per_layer"] == [
        {"layer": "conv1", "type": "Conv2d", "fp32_ms": 1.0, "int8_ms": 0.5, "int4_ms": 0.75,
         "int8_mse": 1e-4, "int4_mse": 1e-3},
        {"layer": "relu1", "type": "ReLU", "fp32_ms": 0.5, "int8_ms": 0.0, "int4_ms": 0.0, "int8_mse": 0.0,
         "int4_mse": 0.0},
        {"layer": "fc1", "type": "Linear", "fp32_ms": 0.25, "int8_ms": 0.125, "int4_ms": 0.5,
         "int8_mse": 2e-4, "int4_mse": 3e-3}]
    assert report["conv"] == [{"algorithm": "naive", "total_ms": 2.0, "per_image_us": 400.0, "speedup": 1.0,
                               "max_error": 0.0}]
    assert report["train"] == [{"system": "microcnn", "dataset": "MNIST", "images_per_s": 1234.0}]
    assert report["compare"] == [{"system": "torch", "precision": "fp32", "time_ms": 3.0,
                                  "per_image_us": 600.0, "accuracy": 0.8}]
    # train compares with PyTorch only when asked for torch or all
    bench.run("bundled", samples=5, precisions=["fp32"], train=True, compare="onnxruntime", startup=False,
              quiet=True)
    assert world["train"][2] is False


def test_run_defaults(world, timers, capsys):
    """``run(model)`` alone: 1000 test images, 5 repeats on 1 thread, every precision calibrated with MSE
    on 100 training images (progress shown), start-up timed, tables printed, no optional table."""
    report = bench.run("bundled")
    fp32 = world["fp32"]
    assert world["test"] == (1000, None, "--samples", "mnist")
    assert world["calibration"] == [(100, None, "--calibration", "mnist")]
    assert world["calibrate"] == (fp32, 100, 100, "mse", True)
    assert [b[1] for b in world["built"]] == ["int8", "w4a8", "int4"] and world["startup"] == "bundled"
    assert {c[2] for c in timers if c[0] == "median"} == {5}
    assert {c[2:4] for c in timers if c[0] == "latency"} == {(200, 3)}
    assert report["threads"] == 1 and [r["precision"] for r in report["headline"]] == ["fp32", "int8", "w4a8",
                                                                                        "int4"]
    assert not {"per_layer", "conv", "train", "compare"} & set(world)
    out = capsys.readouterr().out
    assert "median of 5" in out and "first prediction: cold cache (compile) 3.00 s" in out


def test_headline_table_defaults(timers):
    bench.headline_table({"fp32": models()["fp32"]}, IMAGES, LABELS)
    assert [c[2:] for c in timers if c[0] == "latency"] == [(200, 3, 5)]
    assert [c[2] for c in timers if c[0] == "median"] == [5]


def test_run_prints_every_optional_table(world, capsys):
    bench.run("bundled", samples=5, precisions=["fp32", "int8"], per_layer=True, conv=True, train=True,
              compare="all", startup=False)
    out = capsys.readouterr().out
    for title in ("\nPer layer:\n", "\nConv layers, FP32 im2col vs INT8 im2col (fused conv+relu+pool "
                  "group):\n", "\nConvolution algorithms:\n", "\nTraining throughput (batch 64):\n",
                  "\nComparison:\n"):
        assert title in out
    assert "1234" in out and "naive" in out and "torch" in out


@pytest.fixture()
def thread_clock(monkeypatch, timers):
    """pinned_threads records each count it is asked for; a model then takes ``seconds / SPEED[count]``,
    the machine loop ``LOOP_SECONDS / LOOP_SPEED[count]``."""
    pinned = []

    @contextlib.contextmanager
    def pinned_threads(t):
        pinned.append(t)
        yield

    def median_time(fn, repeats, warmup=1):
        if fn is bench.machine_loop:
            timers.append(("machine", repeats, pinned[-1], warmup))
            return LOOP_SECONDS / LOOP_SPEED[pinned[-1]]
        model = fn.__defaults__[0]
        fn()
        timers.append(("median", model, repeats, pinned[-1], warmup))
        return model.seconds / SPEED[pinned[-1]] * SLOW_SPELL.get(len(timers), 1.0)

    monkeypatch.setattr(bench, "pinned_threads", pinned_threads)
    monkeypatch.setattr(bench, "median_time", median_time)
    return pinned


SPEED = {1: 1.0, 2: 1.6, 3: 2.5}
LOOP_SECONDS, LOOP_SPEED = 0.005, {1: 1.0, 2: 1.9, 3: 2.2}
SLOW_SPELL: dict = {}  # timer call number -> a factor, for a slow spell of the machine


def test_threads_table_times_each_count_in_turn_against_the_first(thread_clock, timers, monkeypatch):
    ms = models()
    # the second round's run at 1 thread (timer call 9 of 24 for fp32: each model run is followed by the
    # machine loop's) and the third round's at 3 (call 41: int8's 17th) come 10x slow: one run in a round
    # of four, which the median over rounds drops
    monkeypatch.setitem(SLOW_SPELL, 9, 10.0)
    monkeypatch.setitem(SLOW_SPELL, 41, 10.0)
    table = bench.threads_table({"fp32": ms["fp32"], "int8": ms["int8"]}, IMAGES[:4], [2, 1, 3], repeats=4)
    assert list(table.columns) == ["Precision", "Threads", "Time (ms)", "Scaling", "Machine"]
    assert table["Precision"].tolist() == ["FP32"] * 3 + ["INT8"] * 3
    assert table["Threads"].tolist() == [2, 1, 3, 2, 1, 3]
    assert thread_clock == [2, 1, 3] * 8  # the counts take turns, round by round, 4 rounds per model
    seconds = [0.02] * 3 + [0.005] * 3
    np.testing.assert_allclose(table["Time (ms)"],
                               [s / SPEED[t] * 1e3 for s, t in zip(seconds, [2, 1, 3] * 2, strict=True)])
    np.testing.assert_allclose(table["Scaling"], [SPEED[t] / SPEED[2] for t in [2, 1, 3] * 2])
    np.testing.assert_allclose(table["Machine"], [LOOP_SPEED[t] / LOOP_SPEED[2] for t in [2, 1, 3] * 2])
    # the loop runs right after the model, at the same count, in every round
    expected = [(kind, t) for t in [2, 1, 3] * 8 for kind in ("median", "machine")]
    assert [(c[0], c[-2]) for c in timers] == expected
    assert {c[-3] for c in timers} == {1}  # one timed run per call
    assert [c[-1] for c in timers] == [1] * 48  # an untimed run before each timed one: idle cores are woken
    assert ms["fp32"].batch_sizes == [4] * 12  # batched: the whole set in one call


def test_threads_table_takes_one_round_at_least(thread_clock, timers):
    table = bench.threads_table({"fp32": models()["fp32"]}, IMAGES[:4], [1, 2], repeats=0)
    assert thread_clock == [1, 2] and [c[-1] for c in timers] == [1, 1, 1, 1]
    np.testing.assert_allclose(table["Time (ms)"], [20, 20 / 1.6])
    np.testing.assert_allclose(table["Machine"], [1, 1.9])


def test_run_with_a_thread_list_measures_the_tables_at_its_first_count(world, thread_clock):
    report = bench.run("bundled", samples=5, threads=[2, 3], repeats=2, precisions=["fp32", "int8"],
                       startup=False, quiet=True)
    # the thread count query and the headline at 2, then the scaling table: 2 rounds of (2, 3) per precision
    assert thread_clock == [2, 2] + [2, 3] * 4
    assert [r["precision"] for r in report["threads_table"]] == ["fp32", "fp32", "int8", "int8"]
    assert [r["threads"] for r in report["threads_table"]] == [2, 3, 2, 3]
    np.testing.assert_allclose([r["scaling"] for r in report["threads_table"]], [1, 2.5 / 1.6] * 2)
    np.testing.assert_allclose([r["machine_scaling"] for r in report["threads_table"]], [1, 2.2 / 1.9] * 2)
    np.testing.assert_allclose([r["time_ms"] for r in report["threads_table"]],
                               [20 / 1.6, 20 / 2.5, 5 / 1.6, 5 / 2.5])
    assert "threads_table" not in bench.run("bundled", samples=5, threads=[2], precisions=["fp32"],
                                            startup=False, quiet=True)


def test_run_prints_the_threads_table_and_its_default_repeats(world, thread_clock, timers, capsys):
    bench.run("bundled", samples=5, threads=[2, 3], precisions=["fp32"], startup=False)
    out = capsys.readouterr().out
    assert ("\nThreads (batched, 5 images; Scaling = time at 2 / time; Machine = the same for a compute-only "
            "loop timed in the same rounds):\n") in out
    assert out.rstrip().endswith("1.56     1.16")  # the last row: 2.5 / 1.6 at 3 threads; loop 2.2 / 1.9
    timers.clear()
    bench.threads_table({"fp32": models()["fp32"]}, IMAGES, [1])
    assert [c[2] for c in timers if c[0] == "median"] == [1] * 5  # 5 rounds by default


def test_run_refuses_images_the_model_cannot_score_naming_the_dataset(world):
    odd = Model([0] * 5, 4000, 0.02, 0.004)
    odd.input_shape = (1, 32, 32)
    world["stored"]["odd.safetensors"] = odd
    with pytest.raises(MicrocnnError, match=r"^--dataset mnist: images are \(1, 28, 28\) \(C, H, W\), "
                                            r"the model expects \(1, 32, 32\)$"):
        bench.run("odd.safetensors", samples=5, dataset="mnist", precisions=["fp32"], startup=False,
                  quiet=True)
