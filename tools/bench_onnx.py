"""FP32 speed of CNNs exported from PyTorch: microcnn (``load_onnx`` of the file) next to ONNX Runtime
(one intra-op thread, all graph optimizations) running the same file, on the same batch, side by side.

Two networks of issue 13: ``bn_cnn`` (Conv+BatchNorm+ReLU blocks, stride-2 convolutions, global average
pooling, 1x28x28 as Fashion-MNIST) and ``resnet`` (a stem and two residual blocks, one downsampling
with a 1x1 projection, global average pooling, 3x32x32). Weights are PyTorch's seeded initialisation
with non-trivial BatchNorm statistics: speed does not depend on training. The files keep BatchNorm as
nodes (``TrainingMode.PRESERVE``); ONNX Runtime folds them into the convolutions when it loads the file,
microcnn is timed as imported and after ``fold_batchnorm()``. Also reports the largest difference of
the two systems' probabilities on the timed batch.

Usage: ``python tools/bench_onnx.py [--batch 256] [--repeats 5]`` (needs the ``compare`` extra).
Prints a pandas table: per-batch median time of each system and ORT/microcnn (> 1: microcnn faster).

``--accuracy [--samples N]``: instead, ``imported_accuracy``: issue 13's accuracy targets (FP32 vs ONNX
Runtime, INT8 and W4A8 drops) on the trained files ``tools/train_imported.py`` wrote to data/.
"""

import argparse
import os
import tempfile
import warnings

import numpy as np
import onnxruntime
import pandas as pd
import torch
from torch import nn

from microcnn.onnx_io import load_onnx
from microcnn.timing import median_time, pinned_threads


def bn_cnn():
    def block(i, o, stride):
        return [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 32, 1), *block(32, 32, 2), *block(32, 64, 1), *block(64, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), (1, 28, 28)


class Residual(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                               nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o))
        self.skip = (nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))
                     if stride != 1 or i != o else nn.Identity())

    def forward(self, x):
        return torch.relu(self.a(x) + self.skip(x))


def resnet():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Residual(16, 16, 1), Residual(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)), (3, 32, 32)


def exported(module, shape, path):
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, *shape),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE)  # BatchNorm stays a node
    return path


def ort_predictor(path):
    """ONNX Runtime as ``microcnn compare`` sets it up: one intra-op thread, sequential, all optimizations."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def measure(name, build, batch, repeats, folder) -> dict:
    module, shape = build()
    path = exported(module, shape, os.path.join(folder, f"{name}.onnx"))
    net, ort = load_onnx(path), ort_predictor(path)
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    agree = np.abs(softmax(net.predict(x, batch_size=batch)) - softmax(ort(x))).max()
    folded = net.fold_batchnorm()
    with pinned_threads(1):
        ours = median_time(lambda: net.predict(x, batch_size=batch), repeats)
        ours_folded = median_time(lambda: folded.predict(x, batch_size=batch), repeats)
        theirs = median_time(lambda: ort(x), repeats)
    return {"Model": name, "Type": type(net).__name__, "Batch": batch, "microcnn (ms)": ours * 1e3,
            "microcnn BN folded (ms)": ours_folded * 1e3, "ONNX Runtime (ms)": theirs * 1e3,
            "ORT / microcnn": theirs / ours, "ORT / folded": theirs / ours_folded, "max |dp|": agree}


# The trained networks of issue 13's accuracy targets (tools/train_imported.py) and their datasets.
IMPORTED = {"fmnist-bn-cnn": "fashion-mnist", "mnist-mlp": "mnist", "fmnist-resnet": "fashion-mnist"}
# W4A8 rounds with GPTQ: on 3,000 held-out TRAINING images (not the test set) of the residual network
# nearest rounding lost 1.53 pt, GPTQ 0.00 (AdaRound 0.00, 15x slower); per channel, MSE clipping.
W4A8_OPTIONS = {"per_channel": True, "weight_clipping": "mse", "rounding": "gptq"}


def imported_accuracy(folder="data", samples=None, calibration=100, method="mse", w4a8=None,
                      names=tuple(IMPORTED)) -> pd.DataFrame:
    """Issue 13's targets on the trained ONNX files of ``folder``: test accuracy of microcnn's import
    (FP32) and of ONNX Runtime on the same file, their largest probability difference, and the accuracy
    of microcnn's INT8 and W4A8 quantizations (``w4a8``: options of ``quantize``, default
    ``W4A8_OPTIONS``), calibrated (``method``) on ``calibration`` images of the training split.

    ``samples``: the first N test images (None: the whole test split). One row per model; accuracies in
    %, drops in points (FP32 minus quantized)."""
    from microcnn.datasets import load_dataset
    from microcnn.quant import calibrate, quantize

    rows = []
    for name in names:
        path, dataset = os.path.join(folder, f"{name}.onnx"), IMPORTED[name]
        net, ort = load_onnx(path), ort_predictor(path)
        x, y = load_dataset(dataset, "test", samples=samples, progress=False)
        train, _ = load_dataset(dataset, "train", samples=5000, progress=False)
        cal = calibrate(net, train, method=method, samples=calibration, progress=False)
        ours, theirs = net.predict(x), np.concatenate([ort(x[s:s + 1000]) for s in range(0, len(x), 1000)])
        acc = {"FP32": (ours.argmax(1) == y).mean() * 100, "ORT": (theirs.argmax(1) == y).mean() * 100}
        for label, bits, options in (("INT8", 8, {}), ("W4A8", 4, w4a8 or W4A8_OPTIONS)):
            acc[label] = quantize(net, cal, bits, 8, **options).accuracy(x, y) * 100
        rows.append({"Model": name, "Type": type(net).__name__, "Test images": len(y),
                     "Calibration images": cal.samples, "FP32 %": acc["FP32"], "ORT %": acc["ORT"],
                     "|FP32 - ORT| pt": abs(acc["FP32"] - acc["ORT"]),
                     "max |dp|": float(np.abs(softmax(ours) - softmax(theirs)).max()),
                     "INT8 %": acc["INT8"], "INT8 drop pt": acc["FP32"] - acc["INT8"],
                     "W4A8 %": acc["W4A8"], "W4A8 drop pt": acc["FP32"] - acc["W4A8"]})
    return pd.DataFrame(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accuracy", action="store_true",
                        help="instead: issue 13's accuracy targets on the trained files in data/")
    parser.add_argument("--samples", type=int, default=None, help="with --accuracy: first N test images")
    args = parser.parse_args()
    if args.accuracy:
        table = imported_accuracy(samples=args.samples)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, build, args.batch, args.repeats, tmp)
                for name, build in (("bn_cnn", bn_cnn), ("resnet", resnet))]
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
