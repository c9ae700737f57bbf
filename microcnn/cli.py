"""The ``microcnn`` command: info, fetch, predict, eval, bench, train, quantize, compare, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .bench import PRECISION_BITS, PRECISIONS, build_precision
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


def _first(images, labels, n: int | None, split: str, flag: str = "--samples"):
    """The first ``n`` images (all when None); refused when the split has fewer than asked for, so
    every figure reported is over the number of images requested."""
    if n is not None and n > len(images):
        raise MicrocnnError(f"{flag}: expected at most {len(images)} (the {split} split's size), found {n}")
    return (images, labels) if n is None else (images[:n], labels[:n])


def _test_images(args, n: int | None):
    from .datasets import load_mnist

    return _first(*load_mnist("test", data_dir=_data_dir(args), samples=n), n, "MNIST test")


def _calibration_images(args, n: int):
    """Calibration images come from the training split, never from the test images being scored."""
    from .datasets import load_mnist

    images, labels = load_mnist("train", data_dir=_data_dir(args), samples=n)
    return _first(images, labels, n, "MNIST training", "--calibration")[0]


def _stored_precision(model) -> str | None:
    """The precision a quantized model (from a file or built here) computes in: int8, w4a8, int4 or
    e.g. w8a4; None for a model that computes in FP32 (plain or storage-compressed)."""
    settings = getattr(model, "settings", None)
    if not settings:
        return None
    bits = (settings.get("weight_bits"), settings.get("act_bits"))
    names = {v: k for k, v in PRECISION_BITS.items()}
    return names.get(bits, f"w{bits[0]}a{bits[1]}")


def _precision_of(model) -> str:
    """What ``model`` computes in, read from the model itself (never from the arguments)."""
    return _stored_precision(model) or "fp32"


def _model_at_precision(net, args):
    """``net`` at ``--precision`` (None: as it is). A model file that is already quantized runs only as
    stored: asking it for another precision is refused rather than answered at the file's precision."""
    requested = getattr(args, "precision", None)
    stored = _stored_precision(net)
    if stored is not None:
        if requested not in (None, stored):
            raise MicrocnnError(f"--precision {requested}: {args.model} is already quantized ({stored}) and "
                                f"runs only as stored; omit --precision (or pass --precision {stored})")
        return net
    if requested in (None, "fp32"):
        return net
    from .quant import calibrate

    fp32 = getattr(net, "network", net)  # a storage-compressed model quantizes its decompressed network
    cal = calibrate(fp32, _calibration_images(args, args.calibration), samples=args.calibration,
                    method=args.method, progress=not getattr(args, "json", False))
    return build_precision(fp32, requested, cal)


def _check_outputs(paths, force: bool) -> None:
    """Every destination of a command, checked before any work (and again just before writing)."""
    from .fileutil import check_destination

    for path in paths:
        check_destination(path, overwrite=force)


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

    names = [args.dataset] if isinstance(args.dataset, str) else args.dataset  # the default is one name
    for name in dict.fromkeys(names):
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
    print(f"test image {args.index}: label {labels[args.index]}, predicted {int(np.argmax(probs))} "
          f"[{_precision_of(model)}]")
    for k, p in enumerate(probs):
        print(f"  {MNIST_CLASSES[k]:>2s} {p:7.4f} {'#' * int(round(p * 40))}")
    return 0


def cmd_eval(args) -> int:
    images, labels = _test_images(args, args.samples)
    model = _model_at_precision(_load_model(args.model), args)
    acc = model.accuracy(images, labels, progress=not args.json)
    result = {"model": args.model, "precision": _precision_of(model), "samples": len(labels),
              "accuracy": acc, "model_bytes": int(model.nbytes)}
    if getattr(model, "settings", None):  # quantized: the calibration the model was built from
        result["calibration_samples"] = model.settings.get("calibration_samples")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} [{result['precision']}]: accuracy {acc * 100:.2f}% on {len(labels)} test "
              f"images, {model.nbytes} bytes")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    report = bench.run(args)
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_quantize(args) -> int:
    from .quant import calibrate, quantize

    if Path(args.out).suffix == ".raw":
        raise MicrocnnError(f"--out {args.out}: a .raw file holds only FP32 LeNet-5 weights and could not be "
                            "loaded back; write the quantized model to a .safetensors file")
    _check_outputs([args.out], args.force)  # before spending time on calibration
    net = _load_model(args.model)
    if _stored_precision(net) is not None:
        raise MicrocnnError(f"--model {args.model}: already quantized ({_stored_precision(net)}); quantize "
                            "an FP32 model")
    net = getattr(net, "network", net)  # a storage-compressed model: its decompressed FP32 network
    cal = calibrate(net, _calibration_images(args, args.calibration), samples=args.calibration,
                    method=args.method)
    bits = args.bits
    qnet = quantize(net, cal, weight_bits=bits, act_bits=args.act_bits or bits)
    _check_outputs([args.out], args.force)
    qnet.save(args.out)
    print(f"wrote {args.out}: {_precision_of(qnet)}, {qnet.nbytes} bytes (FP32 {net.nbytes} bytes), "
          f"calibrated on {qnet.settings['calibration_samples']} training images")
    return 0


def cmd_train(args) -> int:
    from .train import run_train

    return run_train(args)


def cmd_compare(args) -> int:
    from .compare import run_compare

    return run_compare(args)


def cmd_report(args) -> int:
    import warnings

    from .report import FormulaWarning, _notebook_paths, render_report, report_destinations

    notebooks = _notebook_paths(args.notebooks or None)
    _check_outputs(report_destinations(notebooks, args.out), args.force)  # before any notebook runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FormulaWarning)
        written = render_report(notebooks, out_dir=args.out, execute=args.execute, hide_code=args.hide_code,
                                timeout=args.timeout, overwrite=args.force)
    for w in caught:
        print(f"microcnn report: warning: {w.message}", file=sys.stderr)
    print(written[-2])  # index.html, the report's entry point
    return 0


# -- parser --------------------------------------------------------------------------------------
def precision_list(text: str) -> list[str]:
    """argparse type of ``bench --precisions``: a non-empty comma-separated list, no repeats."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of distinct precisions from "
                                         f"{','.join(PRECISIONS)}, found {text!r}")
    return names


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage is one ``--help`` away); subcommands inherit this class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .cliargs import image_count, index_value, repeat_count, thread_count

    p = _Parser(prog="microcnn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--data", help="dataset directory (default: $MICROCNN_DATA, ./data, cache)")
        sp.set_defaults(func=fn)
        return sp

    def calibration_options(sp):
        sp.add_argument("--calibration", type=image_count, default=100, metavar="N",
                        help="calibration images from the training split (default 100)")
        sp.add_argument("--method", default="mse", choices=["minmax", "ema", "percentile", "mse", "entropy"])

    def force_option(sp):
        sp.add_argument("--force", action="store_true",
                        help="replace existing output files (default: refuse)")

    def model_options(sp, precision=True):
        sp.add_argument("--model", default="bundled", help="'bundled', a LeNet-5 .raw file or a "
                        ".safetensors model (default: bundled)")
        if precision:
            sp.add_argument("--precision", choices=["fp32", *PRECISION_BITS], default=None,
                            help="int4 means W4A4 (4-bit weights and activations); default: fp32 for an "
                            "FP32 model, the file's own for a quantized one (others are refused)")
            calibration_options(sp)

    command("info", cmd_info, "versions, threading layer, data directory")
    sp = command("fetch", cmd_fetch, "download (or find) datasets, verifying checksums")
    # A str default: argparse checks a list default against `choices` as a whole and refuses it.
    sp.add_argument("dataset", nargs="*", default="mnist", choices=["mnist", "fashion-mnist"],
                    help="datasets to fetch (default: mnist)")

    sp = command("predict", cmd_predict, "ASCII digit and class probabilities for one test image")
    model_options(sp)
    sp.add_argument("--index", type=index_value, default=0)

    sp = command("eval", cmd_eval, "accuracy on the official MNIST test set")
    model_options(sp)
    sp.add_argument("--samples", type=image_count, default=None, help="first N test images (default all)")
    sp.add_argument("--json", action="store_true")

    sp = command("bench", cmd_bench, "speed tables (headline, per-layer, conv algorithms, training)")
    model_options(sp, precision=False)
    sp.add_argument("--samples", type=image_count, default=1000)
    sp.add_argument("--threads", type=thread_count, default=1)
    sp.add_argument("--repeats", type=repeat_count, default=5)
    calibration_options(sp)
    sp.add_argument("--precisions", type=precision_list, default=None,
                    help=f"comma-separated subset of {','.join(PRECISIONS)} (default: all for an FP32 model, "
                    "the file's own precision for a quantized one)")
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
    calibration_options(sp)
    sp.add_argument("--out", required=True, help="the .safetensors file to write")
    force_option(sp)

    sp = command("train", cmd_train, "train LeNet-5 or an MLP with microcnn's autograd")
    try:
        from .train import add_train_arguments
    except ImportError:  # training module absent in a partial install
        pass
    else:
        add_train_arguments(sp)
        force_option(sp)

    sp = command("compare", cmd_compare, "microcnn vs PyTorch and ONNX Runtime, same weights and data")
    try:
        from .compare import add_compare_arguments
    except ImportError:
        pass
    else:
        add_compare_arguments(sp)

    from .cliargs import int_in

    sp = command("report", cmd_report, "render the notebooks as HTML pages with an index, viewable offline")
    sp.add_argument("notebooks", nargs="*", help="notebooks to render (default: the repository's notebooks/)")
    sp.add_argument("--out", default="reports", help="output directory: index.html, one page per notebook "
                                                     "and style.css (default: reports)")
    sp.add_argument("--no-execute", dest="execute", action="store_false",
                    help="render the outputs stored in the notebooks instead of running them first")
    sp.add_argument("--hide-code", action="store_true", help="leave out the code cells' inputs")
    sp.add_argument("--timeout", type=int_in(1, 7 * 86_400, "a number of seconds"), default=600,
                    help="seconds any one cell may run when executing (default: 600)")
    force_option(sp)
    return p


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, Ctrl-C. An interrupt that arrives while compiled (Numba)
    code runs can surface as ``SystemError: ... returned a result with an exception set`` whose
    context is the KeyboardInterrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MicrocnnError, OSError) as exc:  # bad input or an unusable path: one line, no traceback
        if _interrupted(exc):
            return _report_interrupt(args)
        print(f"microcnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        if _interrupted(exc):
            return _report_interrupt(args)
        raise


def _report_interrupt(args) -> int:
    # Every writer is atomic (microcnn.fileutil): an interrupted command leaves no partial file.
    print(f"microcnn {args.command}: interrupted (Ctrl-C); no partial file was left", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
