"""The command line under hostile or careless use (issue 18): nothing lost, nothing overwritten by
surprise, no silent wrong answers, every figure reported measured rather than echoed.

Most commands run in-process through ``cli.main`` on a tiny MNIST-shaped data directory (150
training, 37 test images taken from the real files), so a request and what the data allows can differ.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import pytest

import microcnn
from microcnn import cli, fileutil
from microcnn.datasets import SPLIT_FILES, write_idx
from microcnn.errors import InputError
from microcnn.quant import calibrate, quantize

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 150, 37


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``microcnn *argv``; argparse's exit counts as a return."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and "batch/s" not in ln]  # progress bars aside
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mnist_train, mnist_test):
    """A data directory holding the first 150 training and 37 test images of MNIST."""
    root = tmp_path_factory.mktemp("tiny")
    for split, (images, labels), n in (("train", mnist_train, N_TRAIN), ("test", mnist_test, N_TEST)):
        image_base, label_base = SPLIT_FILES[split]
        write_idx(root / "mnist" / f"{image_base}.gz", np.rint(images[:n, 0] * 255).astype(np.uint8))
        write_idx(root / "mnist" / f"{label_base}.gz", labels[:n].astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def w4a4_file(tmp_path_factory, mnist_train):
    net = microcnn.lenet(weights="bundled")
    path = tmp_path_factory.mktemp("w4a4") / "lenet-w4a4.safetensors"
    quantize(net, calibrate(net, mnist_train[0][:16], progress=False), weight_bits=4, act_bits=4).save(path)
    return path


# -- destinations: what every writing command must refuse -------------------------------------------
def _snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: kind, and content / link target / device number."""
    out = {}
    for p in sorted(folder.rglob("*")):
        info = os.lstat(p)
        if stat.S_ISLNK(info.st_mode):
            out[p] = ("link", os.readlink(p))
        elif stat.S_ISREG(info.st_mode):
            out[p] = ("file", p.read_bytes())
        else:
            out[p] = (stat.S_IFMT(info.st_mode), info.st_rdev, info.st_ino)
    return out


def _plant(kind: str, dest: Path) -> str:
    """Put a ``kind`` node at ``dest``; return the text the error message must contain."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == "existing file":
        dest.write_bytes(b"precious")
        return "already exists; not replaced (pass --force"
    if kind == "fifo":
        os.mkfifo(dest)
        return "is a FIFO"
    if kind == "device":
        try:  # a null device of our own: if the check regressed, nothing of the system is harmed
            os.mknod(dest, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs root (as non-root, /dev cannot be replaced anyway)")
        return "is a device"
    if kind == "symlink":
        (dest.parent / "target.bin").write_bytes(b"target")
        dest.symlink_to("target.bin")
        return "is a symbolic link (to target.bin)"
    if kind == "dangling symlink":
        dest.symlink_to("nowhere.bin")
        return "is a symbolic link (to nowhere.bin)"
    if kind == "directory":
        dest.mkdir()
        return "is a directory"
    raise AssertionError(kind)


NODE_KINDS = ["existing file", "fifo", "device", "symlink", "dangling symlink", "directory"]


def _command(name: str, tiny: Path, tmp_path: Path, out) -> tuple[list, Path]:
    """argv of a writing command whose (first) destination is ``out``, and that destination."""
    if name == "train":
        return ["train", "--data", tiny, "--epochs", "1", "--no-progress", "--out", out], Path(out)
    if name == "quantize":
        return ["quantize", "--data", tiny, "--calibration", "8", "--out", out], Path(out)
    notebook = tmp_path / "nb" / "demo.ipynb"  # report: refused before the notebook would run
    notebook.parent.mkdir(exist_ok=True)
    notebook.write_text("{}")
    return ["report", notebook, "--out", out], Path(out) / "demo.html"


WRITERS = ["train", "quantize", "report"]


def _no_work(monkeypatch):
    """Fail the test if a command gets as far as loading data or running notebooks."""
    from microcnn import datasets, report

    def refuse(*_, **__):
        raise AssertionError("the destination should have been refused before any work")

    for module, name in ((datasets, "load_dataset"), (datasets, "load_mnist"), (report, "execute_notebook")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("kind", NODE_KINDS)
@pytest.mark.parametrize("command", WRITERS)
def test_writers_refuse_special_existing_and_linked_destinations(command, kind, tiny, tmp_path, capsys,
                                                                  monkeypatch):
    work = tmp_path / "work"
    out = work / ("out.raw" if command == "train" else "out.safetensors" if command == "quantize" else "rep")
    argv, dest = _command(command, tiny, tmp_path, out)
    expected = _plant(kind, dest)
    before = _snapshot(work)
    _no_work(monkeypatch)
    code, _, err = run(capsys, *argv)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"microcnn {command}: error: {dest}: ") and expected in line
    assert _snapshot(work) == before  # the node is untouched and nothing was added


@pytest.mark.parametrize("command", WRITERS)
def test_writers_refuse_unusable_parents_before_any_work(command, tiny, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "afile").write_bytes(b"x")
    argv, dest = _command(command, tiny, tmp_path, tmp_path / "afile" / "sub" / "x.safetensors")
    code, _, err = run(capsys, *argv)
    assert code == 2 and one_line(err) == f"microcnn {command}: error: {dest}: cannot write: " \
                                         f"{tmp_path / 'afile'} is not a directory"
    # A directory nobody can create files in (sysfs refuses even root, whom permission bits do not stop).
    argv, dest = _command(command, tiny, tmp_path, "/sys/microcnn-test-out.safetensors")
    code, _, err = run(capsys, *argv)
    assert code == 2 and one_line(err) == f"microcnn {command}: error: [Errno {errno.EACCES}] Permission " \
                                         f"denied: '{dest}'"
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_train_refuses_when_the_second_file_is_unusable(tiny, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "net.safetensors").mkdir()  # the .raw is fine, its twin cannot be written
    code, _, err = run(capsys, "train", "--data", tiny, "--epochs", "1", "--out", tmp_path / "net.raw")
    assert code == 2 and f"{tmp_path / 'net.safetensors'}: is a directory" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == ["net.safetensors"]


def test_train_default_output_never_replaces_the_shipped_weights(tiny, tmp_path, capsys, monkeypatch):
    # Run from a checkout-like directory: data/lenet.raw is the shipped file the old default overwrote.
    (tmp_path / "data").mkdir()
    shipped = tmp_path / "data" / "lenet.raw"
    shipped.write_bytes(microcnn.lenet(weights="bundled").state_dict()["0.weight"].tobytes())
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--data", tiny, "--epochs", "1", "--no-progress")
    assert code == 0, err
    assert shipped.read_bytes() == microcnn.lenet(weights="bundled").state_dict()["0.weight"].tobytes()
    assert sorted(os.listdir(tmp_path)) == ["data", "lenet-mnist.raw", "lenet-mnist.safetensors"]
    trained = microcnn.lenet(weights=tmp_path / "lenet-mnist.raw")
    assert "saved lenet-mnist.raw and lenet-mnist.safetensors" in out
    # Run again: the default output now exists and is not replaced without --force.
    before = (tmp_path / "lenet-mnist.raw").read_bytes()
    code, _, err = run(capsys, "train", "--data", tiny, "--epochs", "1", "--no-progress", "--seed", "5")
    assert code == 2 and "lenet-mnist.raw: already exists; not replaced" in one_line(err)
    assert (tmp_path / "lenet-mnist.raw").read_bytes() == before
    code, _, err = run(capsys, "train", "--data", tiny, "--epochs", "1", "--no-progress", "--seed", "5",
                       "--force")
    assert code == 0, err
    retrained = microcnn.lenet(weights=tmp_path / "lenet-mnist.safetensors")
    assert not np.array_equal(retrained.state_dict()["0.weight"], trained.state_dict()["0.weight"])
    from_raw = microcnn.lenet(weights=tmp_path / "lenet-mnist.raw").state_dict()["0.weight"]
    np.testing.assert_array_equal(retrained.state_dict()["0.weight"], from_raw)


def test_quantize_force_replaces_and_the_suffix_raw_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"old")
    code, _, err = run(capsys, "quantize", "--data", tiny, "--calibration", "8", "--out", out, "--force")
    assert code == 0, err
    assert microcnn.load(out).settings["calibration_samples"] == 8
    code, _, err = run(capsys, "quantize", "--data", tiny, "--calibration", "8", "--out", tmp_path / "q.raw")
    assert code == 2 and "--out" in one_line(err) and "q.raw" in err and ".safetensors" in err
    assert not (tmp_path / "q.raw").exists()


# -- all or nothing, errors on the user's path ------------------------------------------------------
def test_all_or_nothing_restores_the_first_file_when_a_later_rename_fails(tmp_path, monkeypatch):
    a, b = tmp_path / "m.raw", tmp_path / "m.safetensors"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst) == b and str(src).endswith(".part"):
            raise OSError(errno.EIO, "simulated I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    net = microcnn.lenet(seed=1)
    with pytest.raises(OSError) as info, fileutil.all_or_nothing():
        net.save(a)
        net.save(b)
    assert info.value.filename == str(b) and ".part" not in str(info.value)
    assert calls[:2] == ["m.raw", "m.safetensors"]  # the first really was replaced, then restored
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert sorted(os.listdir(tmp_path)) == ["m.raw", "m.safetensors"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, InputError])
def test_all_or_nothing_writes_nothing_when_the_block_fails(tmp_path, error):
    a = tmp_path / "m.raw"
    with pytest.raises(error), fileutil.all_or_nothing():
        microcnn.lenet(seed=1).save(a)
        assert os.listdir(tmp_path) != []  # staged: a temporary exists, the destination does not
        assert not a.exists()
        raise error("stop")
    assert os.listdir(tmp_path) == []
    with fileutil.all_or_nothing():  # and a block that succeeds writes both
        microcnn.lenet(seed=1).save(a)
        microcnn.lenet(seed=1).save(a.with_suffix(".safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["m.raw", "m.safetensors"]


def test_write_errors_name_the_destination_not_the_temporary(tmp_path, monkeypatch):
    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    dest = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as info:
        microcnn.lenet().save(dest)
    assert str(info.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{dest}'"
    assert os.listdir(tmp_path) == []


def _env(tiny=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if tiny is not None:
        env["MICROCNN_DATA"] = str(tiny)
    return env


def test_real_write_failure_in_a_two_file_train_save_keeps_both_old_files(tiny, tmp_path):
    # A real failing write, no mocks: the file-size limit lets the .raw (246,824 bytes) be written and
    # makes the .safetensors (248,568 bytes) fail with EFBIG. Neither old file may change.
    import resource

    out = tmp_path / "net.raw"
    out.write_bytes(b"old raw")
    out.with_suffix(".safetensors").write_bytes(b"old safetensors")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (247_500, 247_500))

    proc = subprocess.run([sys.executable, "-m", "microcnn.cli", "train", "--epochs", "1", "--no-progress",
                           "--force", "--out", str(out)], env=_env(tiny), capture_output=True, text=True,
                          timeout=600, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"microcnn train: error: [Errno {errno.EFBIG}] File too large: "
                                   f"'{out.with_suffix('.safetensors')}'")
    assert out.read_bytes() == b"old raw"
    assert out.with_suffix(".safetensors").read_bytes() == b"old safetensors"
    assert sorted(os.listdir(tmp_path)) == ["net.raw", "net.safetensors"]


# -- Ctrl-C -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_ctrl_c_during_train_exits_130_with_one_line_and_no_file(tmp_path, delay):
    out = tmp_path / "net.raw"
    proc = subprocess.Popen([sys.executable, "-m", "microcnn.cli", "train", "--epochs", "3", "--no-progress",
                             "--out", str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()  # printed once the data is loaded, right before training
        assert first.startswith("training lenet on"), first + proc.stderr.read()
        time.sleep(delay)  # 0: in the first step's compiled kernels; 1.5 s: well into the epoch
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr == "microcnn train: interrupted (Ctrl-C); no partial file was left\n"
    assert "trained" not in stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("wrapped", [False, True])
def test_interrupt_inside_compiled_code_is_reported_like_any_other(capsys, monkeypatch, wrapped):
    # A Ctrl-C that lands while Numba code runs can surface as SystemError("... returned a result with
    # an exception set") chained to the KeyboardInterrupt.
    def interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            if wrapped:
                raise SystemError("<function> returned a result with an exception set") from None
            raise

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    code, _, err = run(capsys, "eval")
    assert code == 130 and err == "microcnn eval: interrupted (Ctrl-C); no partial file was left\n"


def test_an_unrelated_system_error_is_not_taken_for_an_interrupt(monkeypatch):
    def broken(args):
        raise SystemError("a real bug")

    monkeypatch.setattr(cli, "cmd_eval", broken)
    with pytest.raises(SystemError, match="a real bug"):
        cli.main(["eval"])


# -- integer flags: checked while parsing, one line naming the flag --------------------------------
INTEGER_FLAGS = [  # (command, flag, smallest valid value)
    ("predict", "--index", 0), ("predict", "--calibration", 1),
    ("eval", "--samples", 1), ("eval", "--calibration", 1),
    ("bench", "--samples", 1), ("bench", "--threads", 1), ("bench", "--repeats", 1),
    ("bench", "--calibration", 1),
    ("quantize", "--calibration", 1),
    ("train", "--epochs", 1), ("train", "--batch-size", 1), ("train", "--seed", 0), ("train", "--threads", 1),
    ("compare", "--samples", 1), ("compare", "--threads", 1), ("compare", "--repeats", 1),
    ("compare", "--calibration", 1),
]


@pytest.mark.parametrize("command,flag,low", INTEGER_FLAGS)
def test_every_integer_flag_is_checked_at_parse_time(command, flag, low, capsys, monkeypatch):
    from microcnn import datasets

    monkeypatch.setattr(datasets, "load_mnist", lambda *a, **k: pytest.fail("parsed a bad value"))
    extra = ["--out", "unused.safetensors"] if command == "quantize" else []
    for value in (str(low - 1), "-5", str(10**30), "2.5", "many"):
        code, _, err = run(capsys, command, *extra, flag, value)
        assert code == 2, (flag, value)
        line = one_line(err)
        assert line.startswith(f"microcnn {command}: error: argument {flag}: expected "), line
        assert line.endswith(f"found {value if value[0].isdigit() or value[0] == '-' else repr(value)} "
                             f"(see microcnn {command} --help)") or "found '" in line, line


def test_thread_counts_beyond_numba_are_refused_not_clipped(capsys):
    too_many = numba.config.NUMBA_NUM_THREADS + 1
    code, _, err = run(capsys, "bench", "--threads", too_many)
    assert code == 2 and f"in 1..{too_many - 1}, found {too_many}" in one_line(err)


@pytest.mark.parametrize("text", [",", "", "fp32,fp32", "fp32,int3", " , ,"])
def test_bench_precision_lists_are_checked_at_parse_time(text, capsys):
    code, _, err = run(capsys, "bench", "--precisions", text)
    assert code == 2 and one_line(err).startswith("microcnn bench: error: argument --precisions: expected")


@pytest.mark.parametrize("command,flag,available", [("eval", "--samples", N_TEST),
                                                    ("bench", "--samples", N_TEST),
                                                    ("compare", "--samples", N_TEST),
                                                    ("quantize", "--calibration", N_TRAIN),
                                                    ("eval", "--calibration", N_TRAIN)])
def test_counts_beyond_the_data_are_refused_not_truncated(command, flag, available, tiny, tmp_path, capsys):
    extra = {"quantize": ["--out", tmp_path / "q.safetensors"], "eval": ["--precision", "int8"],
             "bench": ["--no-startup"], "compare": ["--systems", "onnxruntime"]}[command]
    code, _, err = run(capsys, command, "--data", tiny, *extra, flag, available + 1)
    assert code == 2
    assert one_line(err).endswith(f"{flag}: expected at most {available} (the MNIST "
                                  f"{'test' if flag == '--samples' else 'training'} split's size), "
                                  f"found {available + 1}")
    assert os.listdir(tmp_path) == []


def test_fetch_without_arguments_fetches_mnist_once(monkeypatch, capsys):
    from microcnn import datasets

    fetched = []
    monkeypatch.setattr(datasets, "fetch", lambda name, **_: fetched.append(name) or Path("/x") / name)
    assert run(capsys, "fetch")[:2] == (0, "mnist: /x/mnist\n")
    assert run(capsys, "fetch", "fashion-mnist", "mnist", "fashion-mnist")[0] == 0
    assert fetched == ["mnist", "fashion-mnist", "mnist"]


# -- reported figures are measured ------------------------------------------------------------------
def test_eval_json_reports_what_was_evaluated(tiny, capsys, bundled, mnist_test):
    images, labels = mnist_test
    for argv, n in (([], N_TEST), (["--samples", "20"], 20)):  # no request: the whole (37-image) split
        code, out, err = run(capsys, "eval", "--data", tiny, "--json", *argv)
        assert code == 0, err
        result = json.loads(out)
        assert result["samples"] == n
        expected = float((bundled.predict_classes(images[:n]) == labels[:n]).mean())
        assert result["accuracy"] == expected and result["precision"] == "fp32"
        assert result["model_bytes"] == bundled.nbytes == 246_824
    code, out, err = run(capsys, "eval", "--data", tiny, "--json", "--precision", "w4a8",
                         "--calibration", "12")
    result = json.loads(out)
    assert code == 0 and result["precision"] == "w4a8" and result["calibration_samples"] == 12
    assert result["model_bytes"] < bundled.nbytes / 6


def test_eval_of_a_quantized_file_reports_and_enforces_the_files_precision(w4a4_file, tiny, capsys):
    code, out, _ = run(capsys, "eval", "--data", tiny, "--model", w4a4_file, "--json")
    result = json.loads(out)
    assert code == 0 and result["precision"] == "int4" and result["calibration_samples"] == 16
    assert result["model_bytes"] == microcnn.load(w4a4_file).nbytes
    code, out, _ = run(capsys, "eval", "--data", tiny, "--model", w4a4_file)
    assert f"{w4a4_file} [int4]: accuracy" in out
    for asked in ("int8", "fp32", "w4a8"):
        code, _, err = run(capsys, "eval", "--data", tiny, "--model", w4a4_file, "--precision", asked)
        assert code == 2
        assert one_line(err) == (f"microcnn eval: error: --precision {asked}: {w4a4_file} is already "
                                 "quantized (int4) and runs only as stored; omit --precision (or pass "
                                 "--precision int4)")
    assert run(capsys, "eval", "--data", tiny, "--model", w4a4_file, "--precision", "int4")[0] == 0


def test_bench_json_reports_measured_threads_samples_and_precisions(tiny, w4a4_file, capsys):
    code, out, err = run(capsys, "bench", "--data", tiny, "--samples", "20", "--repeats", "1", "--no-startup",
                         "--json", "--precisions", "fp32,int4", "--calibration", "12")
    assert code == 0, err
    report = json.loads(out)
    assert report["threads"] == numba.get_num_threads() and report["samples"] == 20
    assert report["calibration_samples"] == 12
    assert [r["precision"] for r in report["headline"]] == ["fp32", "int4"]
    assert report["headline"][1]["model_bytes"] == 32_648  # a W4A4 LeNet-5, not the FP32 one
    # A quantized file: its rows are named by what it computes in, whatever the request's default.
    code, out, err = run(capsys, "bench", "--data", tiny, "--model", w4a4_file, "--samples", "10",
                         "--repeats", "1", "--no-startup", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["precision"] for r in report["headline"]] == ["int4"] and "calibration_samples" not in report
    code, _, err = run(capsys, "bench", "--data", tiny, "--model", w4a4_file, "--precisions", "fp32",
                       "--samples", "10", "--no-startup")
    assert code == 2 and "is already quantized (int4)" in one_line(err)


def test_quantize_records_the_calibration_it_used(tiny, tmp_path, capsys):
    # More than calibrate()'s default of 100 was once silently cut to 100; here 120 of the 150 images.
    out = tmp_path / "q.safetensors"
    code, text, err = run(capsys, "quantize", "--data", tiny, "--calibration", "120", "--bits", "4",
                          "--out", out)
    assert code == 0, err
    settings = microcnn.load(out).settings
    assert settings["calibration_samples"] == 120
    assert (settings["weight_bits"], settings["act_bits"]) == (4, 4)
    assert "int4" in text and "calibrated on 120 training images" in text


# -- NaN input: the same policy at every precision ---------------------------------------------------
@pytest.fixture(scope="module")
def every_precision(bundled, mnist_train):
    cal = calibrate(bundled, mnist_train[0][:16], progress=False)
    models = {"fp32": bundled}
    for name, (w, a) in {"int8": (8, 8), "w4a8": (4, 8), "int4": (4, 4)}.items():
        models[name] = quantize(bundled, cal, weight_bits=w, act_bits=a)
    models["mixed (fp32 conv1)"] = quantize(bundled, cal, layer_bits={"conv1": 32})
    return models


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["fp32", "int8", "w4a8", "int4", "mixed (fp32 conv1)"])
def test_non_finite_input_never_yields_a_class(every_precision, mnist_test, name, bad):
    model = every_precision[name]
    x = mnist_test[0][:5].copy()
    clean = model.forward(x.copy())
    assert np.isfinite(clean).all()  # finite images are answered
    x[3, 0, 11, 17] = bad
    with pytest.raises(InputError, match="image 3"):
        model.predict(x)
    if name == "fp32":  # the float network carries NaN to its output: no class can be read from it
        assert np.isnan(model.forward(x.copy())[3]).all()
    else:
        # (checked at the input too: in the mixed network, conv1's ReLU and pooling would drop a NaN)
        with pytest.raises(InputError, match=r"found 1 NaN/Inf entering a quantized layer \(first in image"):
            model.forward(x)


def test_overflow_inside_a_mixed_network_is_refused_at_the_quantized_boundary(every_precision, mnist_test):
    # conv1 runs in FP32; an input of 3e38 is finite but overflows there, before any integer stage.
    x = mnist_test[0][:2].copy()
    x[1] *= np.float32(3e38)
    with pytest.raises(InputError, match=r"NaN/Inf entering a quantized layer \(first in image 1\)"):
        every_precision["mixed (fp32 conv1)"].forward(x)


def test_destination_checks_directly(tmp_path):
    # The policy in one place: fileutil.check_destination (used by every CLI writer and by atomic_open).
    (tmp_path / "f").write_bytes(b"")
    deep = tmp_path / "new" / "deeper" / "x.raw"
    assert fileutil.check_destination(deep) == deep
    assert not (tmp_path / "new").exists()  # checking creates nothing
    fileutil.check_destination(tmp_path / "f")  # overwrite=True: the Python API's explicit save
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'f'}: already exists")):
        fileutil.check_destination(tmp_path / "f", overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_bench_of_a_compressed_file_quantizes_its_decompressed_network(tiny, tmp_path, capsys, bundled):
    from microcnn.quant import compress

    path = tmp_path / "c8.safetensors"
    compress(bundled, "int8").save(path)
    code, out, err = run(capsys, "bench", "--data", tiny, "--model", path, "--samples", "10",
                         "--repeats", "1", "--no-startup", "--json", "--precisions", "fp32,int8",
                         "--calibration", "12")
    assert code == 0, err
    rows = json.loads(out)["headline"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    # the fp32 row is the compressed file itself (FP32 compute, compressed storage)
    assert rows[0]["model_bytes"] == microcnn.load(path).nbytes == 63_358
    assert rows[1]["model_bytes"] < bundled.nbytes / 3  # a real INT8 model built from it
