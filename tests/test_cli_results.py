"""What the CLI reports is what happened: ``eval``'s figures recomputed independently from the same images,
the precision read from the model, limits on sample counts at their exact boundary, and the
``--precisions`` list parser on both sides of each rule."""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest

from microcnn import cli
from microcnn.datasets import load_mnist
from microcnn.errors import InputError, MicrocnnError
from microcnn.lenet import lenet
from microcnn.resolve import first


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def test_split():
    return load_mnist("test")


def test_first_takes_exactly_n_and_refuses_more_than_the_split_has():
    images, labels = np.arange(10).reshape(5, 2), np.array([3, 1, 4, 1, 5])
    got = first(images, labels, 3, "toy")
    np.testing.assert_array_equal(got[0], images[:3])
    np.testing.assert_array_equal(got[1], labels[:3])
    assert first(images, labels, None, "toy")[0] is images
    assert len(first(images, labels, 5, "toy")[1]) == 5  # all of them: allowed
    message = r"--calibration: expected at most 5 \(the toy split's size\), found 6"
    with pytest.raises(InputError, match=message):
        first(images, labels, 6, "toy", "--calibration")


@pytest.mark.parametrize(("settings", "expected"), [
    (None, "fp32"), ({}, "fp32"), ({"weight_bits": 8, "act_bits": 8}, "int8"),
    ({"weight_bits": 4, "act_bits": 8}, "w4a8"), ({"weight_bits": 4, "act_bits": 4}, "int4"),
    ({"weight_bits": 8, "act_bits": 4}, "w8a4"), ({"weight_bits": 6, "act_bits": 8}, "w6a8")])
def test_precision_is_read_from_the_models_settings(settings, expected):
    model = SimpleNamespace() if settings is None else SimpleNamespace(settings=settings)
    assert cli._precision_of(model) == expected
    assert cli._stored_precision(model) == (None if expected == "fp32" else expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("fp32", ["fp32"]), ("int8,fp32", ["int8", "fp32"]), (" int4 , w4a8 ", ["int4", "w4a8"]),
    ("int8,,fp32", ["int8", "fp32"]), ("w4a4,w2a4,W3A4", ["int4", "w2a4", "w3a4"])])
def test_precision_list_keeps_the_order_given(text, expected):
    assert cli.precision_list(text) == expected


@pytest.mark.parametrize("text", ["", " , ", "fp16", "int8,fp16", "int8,int8", "fp32, fp32", "int4,w4a4",
                                  "w9a4"])
def test_precision_list_refuses_empty_unknown_and_repeated_names(text):
    with pytest.raises(argparse.ArgumentTypeError, match="distinct precisions"):
        cli.precision_list(text)


@pytest.mark.parametrize("n", [37, 301])  # one batch, and more than one (where a progress bar could show)
def test_eval_json_figures_are_recomputed_from_the_same_images(capsys, test_split, n):
    code, out, err = run(capsys, "eval", "--samples", str(n), "--json")
    assert code == 0 and err == ""  # --json: the JSON object alone, no progress bar
    result = json.loads(out)
    images, labels = test_split
    net = lenet(weights="bundled")
    predicted = np.argmax(net.predict(images[:n]), axis=1)
    assert result == {"model": "bundled", "precision": "fp32", "samples": n,
                      "accuracy": pytest.approx(float(np.mean(predicted == labels[:n])), abs=1e-12),
                      "model_bytes": net.nbytes}


def test_eval_text_reports_the_same_figures(capsys, test_split):
    n = 23
    code, out, _ = run(capsys, "eval", "--samples", str(n))
    images, labels = test_split
    net = lenet(weights="bundled")
    acc = float(np.mean(np.argmax(net.predict(images[:n]), axis=1) == labels[:n]))
    assert code == 0
    assert f"bundled [fp32]: accuracy {acc * 100:.2f}% on {n} test images, {net.nbytes} bytes" in out


def test_eval_of_a_model_quantized_on_the_fly_reports_its_own_precision_and_calibration(capsys):
    code, out, err = run(capsys, "eval", "--precision", "w4a8", "--calibration", "30", "--samples", "41",
                         "--json")
    assert code == 0 and err == ""  # --json: no progress bars, for calibration or for scoring
    result = json.loads(out)
    assert result["precision"] == "w4a8" and result["samples"] == 41
    assert result["calibration_samples"] == 30
    assert result["model_bytes"] < lenet(weights="bundled").nbytes / 4  # 4-bit weights, not the FP32 size


def test_eval_refuses_more_samples_than_the_test_split_has(capsys, test_split):
    code, _, err = run(capsys, "eval", "--samples", str(len(test_split[1]) + 1), "--json")
    assert code != 0 and f"expected at most {len(test_split[1])}" in err


def test_a_quantized_model_runs_only_at_its_own_precision():
    stored = SimpleNamespace(settings={"weight_bits": 4, "act_bits": 4})
    for requested in (None, "int4"):
        assert cli._model_at_precision(stored, SimpleNamespace(precision=requested, model="m.safetensors")) \
            is stored
    with pytest.raises(MicrocnnError, match=r"--precision int8: m.safetensors is already quantized \(int4\)"):
        cli._model_at_precision(stored, SimpleNamespace(precision="int8", model="m.safetensors"))
    fp32 = SimpleNamespace()
    for requested in (None, "fp32"):
        assert cli._model_at_precision(fp32, SimpleNamespace(precision=requested, model="bundled")) is fp32


def test_eval_refuses_a_dataset_the_model_cannot_score_naming_it(capsys, tmp_path):
    # 1x20x24 images for LeNet-5 (1x28x28): one error line naming the --dataset, no figures
    npz = tmp_path / "small.npz"
    np.savez(npz, images=np.zeros((3, 1, 20, 24), np.uint8), labels=np.array([0, 1, 2]))
    code, out, err = run(capsys, "eval", "--dataset", str(npz), "--json")
    assert code != 0 and out == ""
    assert f"--dataset {npz}: images are (1, 20, 24) (C, H, W), the model expects (1, 28, 28)" in err
