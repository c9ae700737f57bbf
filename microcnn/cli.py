"""The ``microcnn`` command: info, fetch, predict, eval, bench, train, quantize, compare, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .bench import PRECISION_BITS, build_precision
from .errors import MicrocnnError


def _load_model(spec: str):
    """``bundled``, a ``.raw`` LeNet-5 weight file, or a self-describing (possibly quantized) model."""
    from .io import load_model
    from .lenet import lenet

    if spec == "bundled":
        return lenet(weights="bundled")
    if Path(spec).suffix == ".raw":
        return lenet(weights=spec)
    return load_model(spec)


def _data_dir(args):
    return args.data or os.environ.get("MICROCNN_DATA")


def _calibration_images(args, n: int):
    """Calibration images come from the training split, never from the test images being scored."""
    from .datasets import load_mnist

    images, _ = load_mnist("train", data_dir=_data_dir(args), samples=n)
    return images[:n]


def _model_at_precision(net, args):
    precision = getattr(args, "precision", "fp32")
    if precision == "fp32" or not hasattr(net, "parameters"):
        return net
    from .quant import calibrate

    cal = calibrate(net, _calibration_images(args, args.calibration), method=args.method,
                    progress=not args.json)
    return build_precision(net, precision, cal)


def _precision_of(model, requested: str) -> str:
    """What the evaluated model computes in: a model file that is already quantized reports its own
    precision (int8, w4a8, int4, or e.g. w8a4), a storage-compressed one fp32."""
    settings = getattr(model, "settings", None)
    if requested != "fp32" or not settings:
        return requested
    bits = (settings.get("weight_bits"), settings.get("act_bits"))
    names = {v: k for k, v in PRECISION_BITS.items()}
    return names.get(bits, f"w{bits[0]}a{bits[1]}")


# -- commands ------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import numba
    import numpy as np

    from . import __version__
    from .datasets import find_dataset_dir
    from .kernels.pool import _maxpool_parallel
    from .lenet import BUNDLED_RAW

    # Numba picks its threading layer at the first parallel launch; run one tiny parallel kernel.
    x = np.zeros((1, 1, 2, 2), np.float32)
    _maxpool_parallel(x, np.empty((1, 1, 1, 1), np.float32), 2, 2, 2, 2, np.float32(-np.inf), 1)
    info = {
        "microcnn": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
        "numba": numba.__version__, "threading_layer": numba.threading_layer(),
        "threads": numba.get_num_threads(), "data_dir": _data_dir(args),
        "mnist_found": str(find_dataset_dir("mnist", _data_dir(args))),
        "bundled_weights": str(BUNDLED_RAW) if BUNDLED_RAW.exists() else None,
    }
    for k, v in info.items():
        print(f"{k:16s} {v}")
    return 0


def cmd_fetch(args) -> int:
    from .datasets import fetch

    for name in args.dataset:
        print(f"{name}: {fetch(name, data_dir=_data_dir(args), progress=True)}")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from .datasets import MNIST_CLASSES, ascii_digit, load_mnist

    images, labels = load_mnist("test", data_dir=_data_dir(args))
    if not 0 <= args.index < len(images):
        raise MicrocnnError(f"--index: expected 0..{len(images) - 1}, found {args.index}")
    args.json = False
    model = _model_at_precision(_load_model(args.model), args)
    probs = model.predict(images[args.index:args.index + 1])[0]
    print(ascii_digit(images[args.index]))
    print(f"test image {args.index}: label {labels[args.index]}, predicted {int(np.argmax(probs))}")
    for k, p in enumerate(probs):
        print(f"  {MNIST_CLASSES[k]:>2s} {p:7.4f} {'#' * int(round(p * 40))}")
    return 0


def cmd_eval(args) -> int:
    from .datasets import load_mnist

    images, labels = load_mnist("test", data_dir=_data_dir(args), samples=args.samples or None)
    if args.samples:
        images, labels = images[:args.samples], labels[:args.samples]
    model = _model_at_precision(_load_model(args.model), args)
    acc = model.accuracy(images, labels, progress=not args.json)
    result = {"model": args.model, "precision": _precision_of(model, args.precision), "samples": len(labels),
              "accuracy": acc, "model_bytes": int(model.nbytes)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} [{args.precision}]: accuracy {acc * 100:.2f}% on {len(labels)} test images, "
              f"{model.nbytes} bytes")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    report = bench.run(args)
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_quantize(args) -> int:
    from .quant import calibrate, quantize

    if Path(args.out).is_dir():  # report a bad path before spending time on calibration
        raise MicrocnnError(f"{args.out}: is a directory; expected the path of a file to write")
    net = _load_model(args.model)
    cal = calibrate(net, _calibration_images(args, args.calibration), method=args.method)
    bits = args.bits
    qnet = quantize(net, cal, weight_bits=bits, act_bits=args.act_bits or bits)
    qnet.save(args.out)
    print(f"wrote {args.out}: {qnet.nbytes} bytes (FP32 {net.nbytes} bytes)")
    return 0


def cmd_train(args) -> int:
    from .train import run_train

    return run_train(args)


def cmd_compare(args) -> int:
    from .compare import run_compare

    return run_compare(args)


def cmd_report(args) -> int:
    from .report import render_notebooks

    for path in render_notebooks(args.notebooks or None, out_dir=args.out):
        print(path)
    return 0


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microcnn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--data", help="dataset directory (default: $MICROCNN_DATA, ./data, cache)")
        sp.set_defaults(func=fn)
        return sp

    def model_options(sp, precision=True):
        sp.add_argument("--model", default="bundled", help="'bundled', a LeNet-5 .raw file or a "
                        ".safetensors model (default: bundled)")
        if precision:
            sp.add_argument("--precision", choices=["fp32", *PRECISION_BITS], default="fp32",
                            help="int4 means W4A4 (4-bit weights and activations)")
            sp.add_argument("--calibration", type=int, default=100, metavar="N",
                            help="calibration images from the training split (default 100)")
            sp.add_argument("--method", default="mse",
                            choices=["minmax", "ema", "percentile", "mse", "entropy"])

    command("info", cmd_info, "versions, threading layer, data directory")
    sp = command("fetch", cmd_fetch, "download (or find) datasets, verifying checksums")
    sp.add_argument("dataset", nargs="*", default=["mnist"], choices=["mnist", "fashion-mnist"])

    sp = command("predict", cmd_predict, "ASCII digit and class probabilities for one test image")
    model_options(sp)
    sp.add_argument("--index", type=int, default=0)

    sp = command("eval", cmd_eval, "accuracy on the official MNIST test set")
    model_options(sp)
    sp.add_argument("--samples", type=int, default=0, help="first N test images (default all)")
    sp.add_argument("--json", action="store_true")

    sp = command("bench", cmd_bench, "speed tables (headline, per-layer, conv algorithms, training)")
    model_options(sp, precision=False)
    sp.add_argument("--samples", type=int, default=1000)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--calibration", type=int, default=100)
    sp.add_argument("--method", default="mse")
    sp.add_argument("--precisions", default="fp32,int8,w4a8,int4")
    sp.add_argument("--conv", action="store_true", help="add the conv algorithm table")
    sp.add_argument("--per-layer", action="store_true", help="add the per-layer table")
    sp.add_argument("--train", action="store_true", help="add training throughput")
    sp.add_argument("--compare", choices=["torch", "onnxruntime", "all"], help="run other stacks too")
    sp.add_argument("--no-startup", action="store_true", help="skip the fresh-process start-up timing")
    sp.add_argument("--json", action="store_true")

    sp = command("quantize", cmd_quantize, "calibrate and write a quantized model")
    model_options(sp, precision=False)
    sp.add_argument("--bits", type=int, choices=[8, 4], default=8)
    sp.add_argument("--act-bits", type=int, choices=[8, 4], default=None,
                    help="activation bits (default: same as --bits)")
    sp.add_argument("--calibration", type=int, default=100)
    sp.add_argument("--method", default="mse", choices=["minmax", "ema", "percentile", "mse", "entropy"])
    sp.add_argument("--out", required=True)

    sp = command("train", cmd_train, "train LeNet-5 or an MLP with microcnn's autograd")
    try:
        from .train import add_train_arguments
    except ImportError:  # training module absent in a partial install
        pass
    else:
        add_train_arguments(sp)

    sp = command("compare", cmd_compare, "microcnn vs PyTorch and ONNX Runtime, same weights and data")
    try:
        from .compare import add_compare_arguments
    except ImportError:
        pass
    else:
        add_compare_arguments(sp)

    sp = command("report", cmd_report, "execute the notebooks and render HTML into reports/")
    sp.add_argument("notebooks", nargs="*")
    sp.add_argument("--out", default="reports")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MicrocnnError, OSError) as exc:  # bad input or an unusable path: one line, no traceback
        print(f"microcnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
