"""The ``microcnn`` command: info, fetch, predict, eval, bench, train, quantize, compare, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InputError, MicrocnnError
from .quant.observers import OBSERVERS
from .quant.params import KERNEL_BITS
from .quant.precision import PRECISIONS, build_precision, precision_of, stored_precision
from .resolve import (
    check_data_fits,
    data_dir,
    dataset_of,
    is_npz,
    load_calibration_images,
    load_model_spec,
    load_test_images,
)

METHODS = list(OBSERVERS)  # calibration methods: the observer registry's names
BITS = sorted(KERNEL_BITS, reverse=True)  # bit widths the integer kernels run, widest first


def _stored_precision(model) -> str | None:
    stored = stored_precision(model)
    return stored.name if stored is not None else None


def _precision_of(model) -> str:
    return precision_of(model).name


def _dataset(args) -> str:
    """``--dataset`` if given, else the dataset the model spec is scored on."""
    return getattr(args, "dataset", None) or dataset_of(getattr(args, "model", "bundled"))


def _fitting(model, images, labels, args):
    """The data, refused with a clear error when the model cannot score it (another image shape)."""
    check_data_fits(model, images, labels, f"--dataset {_dataset(args)}")
    return images, labels


def _calibration_images(args, n: int):
    return load_calibration_images(n, args.data, "--calibration", _dataset(args))


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
    fp32 = getattr(net, "network", net)  # a storage-compressed model quantizes its decompressed network
    fp32, cal = _calibrated(fp32, args, progress=not getattr(args, "json", False))
    return build_precision(fp32, requested, cal, **_quantize_options(args))


def _calibrated(net, args, progress: bool = True):
    """(the FP32 network to quantize -- cross-layer equalized with ``--cle`` --, its calibration)."""
    from .quant import calibrate

    if args.cle:
        from .quant.cle import equalize

        net = equalize(net)  # before calibrating: equalization changes the activation ranges
    cal = calibrate(net, _calibration_images(args, args.calibration), samples=args.calibration,
                    method=args.method, progress=progress)
    return net, cal


def _quantize_options(args) -> dict:
    """``quantize`` arguments of the quantization options (``--rounding``, ``--granularity``, ...)."""
    options = {"rounding": args.rounding, "per_channel": args.granularity == "channel",
               "symmetric": args.symmetric, "progress": not getattr(args, "json", False)}
    if args.rounding == "adaround":
        options["rounding_options"] = {"iterations": args.adaround_iterations}
    return options


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
    from .kernels.pool import avgpool2d
    from .lenet import BUNDLED_RAW

    # Numba picks its threading layer at the first parallel launch; run one tiny parallel kernel.
    avgpool2d(np.zeros((1, 1, 2, 2), np.float32), 2, 2, 2, 2)
    info = {
        "microcnn": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
        "numba": numba.__version__, "threading_layer": numba.threading_layer(),
        "threads": numba.get_num_threads(), "data_dir": data_dir(args.data),
        "mnist_found": str(find_dataset_dir("mnist", data_dir(args.data))),
        "bundled_weights": str(BUNDLED_RAW) if BUNDLED_RAW.exists() else None,
    }
    if args.model is None:
        if args.json:
            print(json.dumps(info))
        else:
            for k, v in info.items():
                print(f"{k:16s} {v}")
        return 0
    model = load_model_spec(args.model)
    table = model.layer_table()
    if args.json:
        records = table.assign(**{"Output Shape": table["Output Shape"].map(
            lambda s: None if s is None else list(s))}).to_dict(orient="records")
        print(json.dumps({"model": args.model, "input_shape": model.input_shape, "bytes": int(model.nbytes),
                          "parameters": int(table["Parameters"].sum()),
                          "macs": None if table["MACs"].isna().any() else int(table["MACs"].sum()),
                          "layers": records}))
        return 0
    shape = "unknown" if model.input_shape is None else "x".join(map(str, model.input_shape))
    print(f"{args.model}: {type(model).__name__}, input {shape}, {model.nbytes} bytes")
    print(table.to_string(index=False))
    macs = "unknown (no input shape)" if table["MACs"].isna().any() else f"{int(table['MACs'].sum()):,}"
    print(f"total: {int(table['Parameters'].sum()):,} parameters, {macs} MACs per image")
    return 0


def cmd_fetch(args) -> int:
    from .datasets import fetch

    names = [args.dataset] if isinstance(args.dataset, str) else args.dataset  # the default is one name
    for name in dict.fromkeys(names):
        print(f"{name}: {fetch(name, data_dir=data_dir(args.data), progress=True)}")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from .datasets import CLASSES, ascii_digit

    images, labels = load_test_images(None, args.data, "--index", _dataset(args))
    if not 0 <= args.index < len(images):
        raise MicrocnnError(f"--index: expected 0..{len(images) - 1}, found {args.index}")
    args.json = False
    model = _model_at_precision(load_model_spec(args.model), args)
    one = slice(args.index, args.index + 1)
    images, labels = _fitting(model, images[one], labels[one], args)
    probs = model.predict(images)[0]
    if images.shape[1] == 1:  # a grey image draws as text
        print(ascii_digit(images[0]))
    print(f"test image {args.index}: label {labels[0]}, predicted {int(np.argmax(probs))} "
          f"[{_precision_of(model)}]")
    classes = CLASSES.get(_dataset(args)) or [str(k) for k in range(len(probs))]
    width = max(map(len, classes))
    for k, p in enumerate(probs):
        print(f"  {classes[k]:>{width}s} {p:7.4f} {'#' * int(round(p * 40))}")
    return 0


def cmd_eval(args) -> int:
    images, labels = load_test_images(args.samples, args.data, "--samples", _dataset(args))
    model = _model_at_precision(load_model_spec(args.model), args)
    images, labels = _fitting(model, images, labels, args)
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

    report = bench.run(args.model, data=args.data, samples=args.samples, threads=args.threads,
                       repeats=args.repeats, calibration=args.calibration, method=args.method,
                       precisions=args.precisions, conv=args.conv, per_layer=args.per_layer, train=args.train,
                       compare=args.compare, startup=not args.no_startup, quiet=args.json,
                       dataset=args.dataset)
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_quantize(args) -> int:
    from .quant import quantize

    if Path(args.out).suffix == ".raw":
        raise MicrocnnError(f"--out {args.out}: a .raw file holds only FP32 LeNet-5 weights and could not be "
                            "loaded back; write the quantized model to a .safetensors file")
    _check_outputs([args.out], args.force)  # before spending time on calibration
    net = load_model_spec(args.model)
    if _stored_precision(net) is not None:
        raise MicrocnnError(f"--model {args.model}: already quantized ({_stored_precision(net)}); quantize "
                            "an FP32 model")
    net = getattr(net, "network", net)  # a storage-compressed model: its decompressed FP32 network
    fp32, cal = _calibrated(net, args)
    bits = args.bits
    qnet = quantize(fp32, cal, weight_bits=bits, act_bits=args.act_bits or bits, **_quantize_options(args))
    _check_outputs([args.out], args.force)
    qnet.save(args.out)
    print(f"wrote {args.out}: {_precision_of(qnet)}, {qnet.nbytes} bytes (FP32 {net.nbytes} bytes), "
          f"calibrated on {qnet.settings['calibration_samples']} "
          f"{'images of ' + _dataset(args) if is_npz(_dataset(args)) else 'training images'}")
    return 0


# Defaults of ``microcnn train`` that differ between training from scratch (the recipe of the bundled
# data/lenet.raw) and QAT fine-tuning from a trained model (--qat; the recipe of data/lenet-w2a2-qat).
# The parser's defaults are the from-scratch ones, marked by their type so --qat can tell them from
# values the user typed.
class _DefaultInt(int):
    pass


class _DefaultFloat(float):
    pass


class _DefaultStr(str):
    pass


TRAIN_DEFAULTS = {"epochs": _DefaultInt(240), "lr": _DefaultFloat(3e-3), "optimizer": _DefaultStr("adamw"),
                  "schedule": _DefaultStr("onecycle"), "label_smoothing": _DefaultFloat(0.1),
                  "augmentation": _DefaultStr("elastic")}
QAT_DEFAULTS = {"epochs": 8, "lr": 1e-3, "optimizer": "adam", "schedule": "cosine", "label_smoothing": 0.0,
                "augmentation": "shift"}


def cmd_train(args) -> int:
    if args.qat:
        for key, value in QAT_DEFAULTS.items():
            if isinstance(getattr(args, key), _DefaultInt | _DefaultFloat | _DefaultStr):
                setattr(args, key, value)
    augment = args.augmentation if args.augment else False
    if args.qat:
        return _train_qat(args, augment)
    from .train import run_train

    return run_train(args.model, args.dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, optimizer=args.optimizer, schedule=args.schedule,
                     label_smoothing=args.label_smoothing, seed=args.seed,
                     augment=augment, holdout=args.holdout,
                     threads=args.threads,
                     out=args.out, progress=not args.no_progress, data=args.data,
                     force=getattr(args, "force", False))


def _train_qat(args, augment) -> int:
    from .train import run_qat

    if args.out is None:
        raise InputError("train --qat: expected --out F.safetensors (the quantized model to write)")
    if args.holdout:
        raise InputError("train --qat: --holdout is not supported; QAT reports the test split")
    _check_outputs([args.out], args.force)
    init = args.init or args.model
    dataset = "fashion-mnist" if init == "fashion" else args.dataset
    return run_qat(load_model_spec(init), args.qat, args.out, dataset=dataset, data_dir=data_dir(args.data),
                   force=args.force, train_images=args.train_images, threads=args.threads,
                   progress=not args.no_progress, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   optimizer=args.optimizer, schedule=args.schedule, weight_decay=args.weight_decay,
                   seed=args.seed, augment=augment, distill=args.distill, temperature=args.temperature,
                   label_smoothing=args.label_smoothing, init=args.qat_init)


def cmd_compare(args) -> int:
    from .compare import run_compare

    return run_compare(args.model, data=args.data, samples=args.samples, threads=args.threads,
                       repeats=args.repeats, calibration=args.calibration, method=args.method,
                       systems=args.systems, precisions=args.precisions, torch_compile=not args.no_compile,
                       output="json" if args.json else "markdown" if args.markdown else "table",
                       dataset=args.dataset, seeds=args.seeds if args.quantized_accuracy else None)


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    table = run_sweep(args.models, args.precisions, args.methods, args.rounding, args.seeds, args.out,
                      scheduler=args.scheduler, calibration=args.calibration, samples=args.samples,
                      progress=not args.json, workers=args.workers, data_dir=data_dir(args.data),
                      cle=args.cle, granularities=args.granularity)
    if args.json:
        print(table.assign(finished=table["finished"].astype(str)).to_json(orient="records"))
    else:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_report(args) -> int:
    import warnings

    from .report import FormulaWarning, notebook_paths, render_report, report_destinations

    notebooks = notebook_paths(args.notebooks or None)
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
    """argparse type of ``bench --precisions``: a non-empty comma-separated list of precision names or
    wXaY spellings (``w2a4``), as canonical names (``w4a4`` is ``int4``), no repeats."""
    from .quant.precision import parse_precision_list

    found, unknown = parse_precision_list(text)
    names = [p.name for p in found]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of distinct precisions from "
                                         f"{','.join(PRECISIONS)} or wXaY, found {text!r}")
    return names


def train_arguments(parser) -> None:
    """Options of ``microcnn train`` (``--data`` is added by ``command``)."""
    from .cliargs import epoch_count, float_in, int_in, seed_value, thread_count
    from .train import AUGMENTATIONS, DATASETS, MODELS, OPTIMIZERS, SCHEDULES

    parser.add_argument("--model", choices=MODELS, default="lenet")
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    # The defaults are the recipe of the bundled data/lenet.raw (see README).
    d = TRAIN_DEFAULTS
    parser.add_argument("--epochs", type=epoch_count, default=d["epochs"], help="default 240 (--qat: 8)")
    parser.add_argument("--batch-size", type=int_in(1, 65536, "a batch size"), default=64)
    parser.add_argument("--lr", type=float_in(0, None, "a learning rate", low_open=True), default=d["lr"],
                        help="peak learning rate (default 3e-3; --qat: 1e-3)")
    parser.add_argument("--weight-decay", type=float_in(0, None, "a weight decay"), default=None,
                        help="default: 0 for adam/sgd, 1e-2 for adamw")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"],
                        help="default adamw (--qat: adam)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                        help="default onecycle (--qat: cosine)")
    parser.add_argument("--label-smoothing", type=float_in(0, 1, "a label smoothing", high_open=True),
                        default=d["label_smoothing"], help="default 0.1 (--qat: 0)")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="augment the training images (default on; --no-augment to disable)")
    parser.add_argument("--augmentation", choices=sorted(AUGMENTATIONS), default=d["augmentation"],
                        help="shift: +-2 px; affine: also +-10 degrees and +-10%% scale; elastic: "
                        "affine plus a 1 px elastic distortion (default; --qat: shift)")
    parser.add_argument("--holdout", type=int_in(0, 59999, "a holdout size"), default=0,
                        help="score the last N training images after each epoch and train on the rest; "
                        "the test split is then scored once, after training (default 0: train on all, "
                        "score the test split after each epoch)")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="Numba threads (results do not depend on it)")
    parser.add_argument("--out", default=None,
                        help="weights file (default: <model>-<dataset>.raw in the current directory); a "
                        ".raw file gets a .safetensors file beside it. Existing files are not replaced "
                        "unless --force is given")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    qat = parser.add_argument_group("quantization-aware training (LSQ fake quantization, microcnn.quant.qat)")
    qat.add_argument("--qat", default=None, metavar="wXaY",
                     help="fine-tune --init with X-bit weights and Y-bit activations (2..8) and write the "
                     "quantized model to --out (.safetensors)")
    qat.add_argument("--init", default=None, metavar="MODEL",
                     help="the trained model to start from: bundled, lenet, fashion, a .raw or .safetensors "
                     "file (default: the bundled --model)")
    qat.add_argument("--distill", type=float_in(0, 1, "a distillation weight"), default=0.0,
                     help="weight of the KL divergence to the FP32 model's softened logits (default 0)")
    qat.add_argument("--temperature", type=float_in(0, None, "a temperature", low_open=True), default=4.0,
                     help="distillation temperature (default 4)")
    qat.add_argument("--qat-init", choices=("lsq", "calibration"), default="calibration",
                     help="activation step initialisation: LSQ's 2 mean|x| / sqrt(Qp) or MSE "
                     "calibration (default: measured better after one W2A2 epoch, 97.85 vs 97.46%%)")
    qat.add_argument("--train-images", type=int_in(1, 60000, "a number of images"), default=None,
                     help="fine-tune on the first N training images (default all)")


DATASET_HELP = ("mnist, fashion-mnist or an .npz file with images (N, C, H, W) uint8/float32 and labels "
                "(default: the model's own dataset)")


def compare_arguments(parser) -> None:
    """Options of ``microcnn compare`` (``--data`` is added by ``command``)."""
    from .cliargs import dataset_spec, image_count, int_in, repeat_count, thread_count
    from .compare import SYSTEMS

    def seed_list(text):
        seeds = [int_in(0, None, "a seed")(v.strip()) for v in text.split(",") if v.strip()]
        if not seeds:
            raise argparse.ArgumentTypeError(f"expected comma-separated seeds, found {text!r}")
        return seeds

    parser.add_argument("--model", default="bundled",
                        help="'bundled', a LeNet-5 .raw file, a .safetensors model, an .onnx file, or a "
                             "PyTorch .pt state_dict of LeNet-5 (default: bundled)")
    parser.add_argument("--dataset", type=dataset_spec, default=None, help=DATASET_HELP)
    parser.add_argument("--samples", type=image_count, default=1000,
                        help="first N test images (default 1000)")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="threads for every system (default 1)")
    parser.add_argument("--repeats", type=repeat_count, default=5,
                        help="timed runs per model; the median is shown")
    parser.add_argument("--calibration", type=image_count, default=100, metavar="N",
                        help="calibration images from the training split, the same for every system "
                             "(default 100)")
    parser.add_argument("--method", default="mse", choices=METHODS,
                        help="microcnn's calibration method (default mse)")
    parser.add_argument("--systems", choices=list(SYSTEMS), default="all")
    labels = ",".join(p.label.lower() for p in PRECISIONS.values())  # fp32,int8,w4a8,w4a4
    parser.add_argument("--precisions", default=labels,
                        help=f"comma-separated subset of {labels} (int4 = w4a4)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--quantized-accuracy", action="store_true",
                        help="instead of the timing table: accuracy at every quantized point PyTorch or ONNX "
                             "Runtime offers, next to microcnn's on the same calibration images, per --seeds")
    parser.add_argument("--seeds", type=seed_list, default="0,1,2",
                        help="with --quantized-accuracy: calibration-subset seeds (default 0,1,2)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    out.add_argument("--markdown", action="store_true", help="a markdown table (for the README)")


def precision_name(text: str) -> str:
    """argparse type of ``--precision``: a named precision or wXaY, as its canonical name."""
    from .errors import InputError
    from .quant.precision import parse_precision

    try:
        return parse_precision(text).name
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def quantization_options(parser) -> None:
    """How weights are quantized: rounding method, grid granularity and symmetry, equalization."""
    from .cliargs import int_in
    from .quant.rounding import ROUNDINGS

    parser.add_argument("--rounding", choices=list(ROUNDINGS), default="nearest",
                        help="weight rounding (default nearest; adaround: layer-wise reconstruction)")
    parser.add_argument("--adaround-iterations", type=int_in(1, 100_000, "a number of iterations"),
                        default=1000, metavar="N", help="AdaRound iterations per layer (default 1000)")
    parser.add_argument("--granularity", choices=["channel", "tensor"], default="channel",
                        help="one weight scale per output channel (default) or per tensor")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True,
                     help="weights on a grid symmetric about 0 (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="weights with a zero point (at most 7 bits)")
    parser.add_argument("--cle", action="store_true",
                        help="cross-layer equalization of the FP32 weights before calibrating")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage is one ``--help`` away); subcommands inherit this class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .cliargs import dataset_spec, image_count, index_value, repeat_count, thread_counts

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
        sp.add_argument("--method", default="mse", choices=METHODS)

    def force_option(sp):
        sp.add_argument("--force", action="store_true",
                        help="replace existing output files (default: refuse)")

    def model_options(sp, precision=True, dataset=True):
        sp.add_argument("--model", default="bundled", help="'bundled' or 'lenet' (LeNet-5, MNIST), 'fashion' "
                        "(Fashion-MNIST CNN), a LeNet-5 .raw file, a .safetensors model or an .onnx file "
                        "(default: bundled)")
        if dataset:
            sp.add_argument("--dataset", type=dataset_spec, default=None, help=DATASET_HELP)
        if precision:
            sp.add_argument("--precision", type=precision_name, default=None,
                            help=f"{', '.join(PRECISIONS)} or wXaY (X, Y in 2..8; int4 means W4A4); default: "
                            "fp32 for an FP32 model, the file's own for a quantized one (others are refused)")
            calibration_options(sp)
            quantization_options(sp)

    sp = command("info", cmd_info, "versions, threading layer, data directory; with --model, its layer table")
    sp.add_argument("--model", default=None, help="a model spec (as --model elsewhere): print its layers "
                    "with output shapes, parameters and MACs per image")
    sp.add_argument("--json", action="store_true")
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
    sp.add_argument("--threads", type=thread_counts, default=[1],
                    help="thread count, or a list (1,2) for a scaling table; the other tables use the first")
    sp.add_argument("--repeats", type=repeat_count, default=5)
    calibration_options(sp)
    sp.add_argument("--precisions", type=precision_list, default=None,
                    help=f"comma-separated list of {','.join(PRECISIONS)} or wXaY (default: all for an FP32 "
                    "model, the file's own precision for a quantized one)")
    sp.add_argument("--conv", action="store_true", help="add the conv algorithm table")
    sp.add_argument("--per-layer", action="store_true", help="add the per-layer table")
    sp.add_argument("--train", action="store_true", help="add training throughput")
    sp.add_argument("--compare", choices=["torch", "onnxruntime", "all"], help="run other stacks too")
    sp.add_argument("--no-startup", action="store_true", help="skip the fresh-process start-up timing")
    sp.add_argument("--json", action="store_true")

    sp = command("quantize", cmd_quantize, "calibrate and write a quantized model")
    model_options(sp, precision=False)
    sp.add_argument("--bits", type=int, choices=BITS, default=8, help="weight bits, 2..8 (default 8)")
    sp.add_argument("--act-bits", type=int, choices=BITS, default=None,
                    help="activation bits, 2..8 (default: same as --bits)")
    calibration_options(sp)
    quantization_options(sp)
    sp.add_argument("--out", required=True, help="the .safetensors file to write")
    force_option(sp)

    sp = command("train", cmd_train, "train LeNet-5 or an MLP with microcnn's autograd")
    train_arguments(sp)
    force_option(sp)

    sp = command("compare", cmd_compare, "microcnn vs PyTorch and ONNX Runtime, same weights and data")
    compare_arguments(sp)

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

    def names(text):
        return [v.strip() for v in text.split(",") if v.strip()]

    def seeds(text):
        return [int_in(0, None, "a seed")(v) for v in names(text)]

    def switches(text):
        values = {"off": False, "on": True}
        unknown = [v for v in names(text) if v not in values]
        if unknown:
            raise argparse.ArgumentTypeError(f"expected off, on or off,on, found {','.join(unknown)}")
        return [values[v] for v in names(text)]

    sp = command("sweep", cmd_sweep, "accuracy over a grid of models x precisions x methods x roundings "
                 "x CLE x granularity x seeds, on Dask, into a resumable Parquet table")
    sp.add_argument("--models", type=names, required=True, help="comma-separated: lenet, fashion")
    sp.add_argument("--precisions", type=names, required=True, help="comma-separated wXaY, int8, int4")
    sp.add_argument("--methods", type=names, default=["mse"], help="calibration observers (default mse)")
    sp.add_argument("--rounding", type=names, default=["nearest"], help="rounding methods (default nearest)")
    sp.add_argument("--cle", type=switches, default=[False], metavar="off,on",
                    help="cross-layer equalization of the FP32 weights first: off (default), on, or both")
    sp.add_argument("--granularity", type=names, default=["channel"], metavar="channel,tensor",
                    help="weight scales per output channel (default), per tensor, or both")
    sp.add_argument("--seeds", type=seeds, default=[0], help="calibration-subset seeds (default 0)")
    sp.add_argument("--out", required=True, help="Parquet table; an existing sweep table is resumed")
    sp.add_argument("--scheduler", default=None, help="address of a running Dask scheduler "
                    "(tcp://host:port; default: a local cluster)")
    sp.add_argument("--workers", type=int_in(1, 1024, "a worker count"), default=None,
                    help="local cluster worker processes (default: one per CPU)")
    sp.add_argument("--calibration", type=image_count, default=100, metavar="N",
                    help="calibration images from the training split (default 100)")
    sp.add_argument("--samples", type=image_count, default=None, help="first N test images (default all)")
    sp.add_argument("--json", action="store_true", help="print the table as JSON records")
    return p


def _interrupted(exc: BaseException | None) -> bool:
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
