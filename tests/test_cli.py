"""The microcnn command, run in-process through cli.main with captured output."""

import json

import numpy as np
import pytest

import microcnn
from microcnn import bench, cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_reports_versions_and_data_dir(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "numba" in out and "threading_layer" in out and "mnist_found" in out


def test_predict_shows_ascii_digit_and_probabilities(capsys):
    code, out, _ = run(capsys, "predict", "--index", "0")
    assert code == 0
    assert "test image 0: label 7, predicted 7" in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith(tuple("0123456789"))]) >= 10


def test_eval_json_object(capsys):
    code, out, _ = run(capsys, "eval", "--samples", "500", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"model", "precision", "samples", "accuracy", "model_bytes"}
    assert result["samples"] == 500 and result["model_bytes"] == 246_824
    assert result["accuracy"] > 0.98


def test_eval_of_a_raw_file_with_wrong_size_is_a_clear_error(capsys, tmp_path):
    bad = tmp_path / "short.raw"
    bad.write_bytes(b"\0" * 1000)
    code, _, err = run(capsys, "eval", "--model", str(bad), "--samples", "10")
    assert code == 2
    assert "short.raw" in err and "expected 246824 bytes" in err and "found 1000 bytes" in err


def test_predict_index_out_of_range(capsys):
    code, _, err = run(capsys, "predict", "--index", "10000")
    assert code == 2 and "expected 0..9999, found 10000" in err


def test_bench_json_fp32(capsys):
    code, out, _ = run(capsys, "bench", "--samples", "200", "--repeats", "2", "--precisions", "fp32",
                       "--no-startup", "--json")
    assert code == 0
    report = json.loads(out)
    (row,) = report["headline"]
    assert row["precision"] == "fp32" and row["model_bytes"] == 246_824
    assert row["time_ms"] > 0 and row["per_image_us"] == pytest.approx(row["time_ms"] * 1e3 / 200, rel=1e-3)
    assert report["latency_us"]["fp32"] > 0 and report["samples"] == 200


def test_headline_table_ratios_come_from_its_own_rows():
    net = microcnn.lenet(seed=0)
    images = bench.random_images(64)
    labels = net.predict_classes(images)
    table = bench.headline_table({"fp32": net, "again": net}, images, labels, repeats=2, latency_samples=5)
    assert list(table.columns[:7]) == ["Precision", "Inference Time (ms)", "Per Image (us)", "Latency (us)",
                                       "Memory (KiB)", "Speedup", "Savings (%)"]
    t = table["Inference Time (ms)"]
    np.testing.assert_allclose(table["Speedup"], t.iloc[0] / t)
    assert table["Accuracy (%)"].iloc[0] == 100.0
    assert table["Savings (%)"].tolist() == [0.0, 0.0]


def test_quantize_writes_a_model_that_eval_reports_at_its_own_precision(capsys, tmp_path):
    out = tmp_path / "lenet_w4a4.safetensors"
    code, text, _ = run(capsys, "quantize", "--bits", "4", "--calibration", "50", "--out", str(out))
    assert code == 0 and "32648 bytes" in text
    code, text, _ = run(capsys, "eval", "--model", str(out), "--samples", "300", "--json")
    result = json.loads(text)
    assert code == 0
    assert result["precision"] == "int4" and result["model_bytes"] == 32_648
    assert result["accuracy"] > 0.97
