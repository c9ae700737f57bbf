"""Tables the notebooks show that no other module computes: confusion matrices, the calibration ranges
of several observers side by side, accuracy against calibration-set size and method, and an operation
count of the convolution algorithms. Everything quantization-specific goes through ``microcnn.quant``'s
public API; ``microcnn.plots`` draws these tables.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .errors import InputError

CALIBRATION_METHODS = ("minmax", "ema", "percentile", "mse", "entropy")
SWEEP_PRECISIONS = ("int8", "int4")
# A real 2-D FFT of N points costs about 2.5 N log2 N flops (half the 5 N log2 N of a complex one).
FFT_FLOPS_PER_POINT_LOG = 2.5


# ------------------------------------------------------------------------------ confusion matrix
def confusion_matrix(labels, predicted, num_classes: int = 10) -> pd.DataFrame:
    """Counts of (true class, predicted class): rows are true classes (index ``True``), columns the
    predicted classes (``Predicted``); the diagonal holds the correct predictions."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if labels.ndim != 1 or labels.shape != predicted.shape:
        raise InputError(f"confusion_matrix: expected labels and predictions of one equal length, "
                         f"found shapes {labels.shape} and {predicted.shape}")
    for name, values in (("labels", labels), ("predicted", predicted)):
        if not np.issubdtype(values.dtype, np.integer) or (values.size and (
                values.min() < 0 or values.max() >= num_classes)):
            raise InputError(f"confusion_matrix: {name} must be integer classes 0..{num_classes - 1}, "
                             f"found dtype {values.dtype}"
                             + (f", range {values.min()}..{values.max()}" if values.size else ""))
    counts = np.bincount(labels.astype(np.int64) * num_classes + predicted,
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    classes = range(num_classes)
    return pd.DataFrame(counts, index=pd.Index(classes, name="True"),
                        columns=pd.Index(classes, name="Predicted"))


# ------------------------------------------------------------------------------ calibration
def calibrate_methods(net, images, methods=CALIBRATION_METHODS, samples: int = 1000, seed: int = 0,
                      **options) -> dict:
    """One ``microcnn.quant.calibrate`` per method on the same ``samples`` images (same ``seed``):
    {method: Calibration}. ``images`` must be training images, never the evaluation set."""
    from .quant import calibrate

    methods = _check_methods(methods)
    return {m: calibrate(net, images, method=m, samples=samples, seed=seed, progress=False, **options)
            for m in methods}


def calibration_ranges(calibrations: dict, bits: int = 8, tensors=None) -> pd.DataFrame:
    """The clipping range each calibration picks for each tensor at ``bits``: the rows of every
    ``Calibration.table(bits)`` (Tensor, Observer, Min, Max, Range Lo, Range Hi, Scale, Zero Point)
    under a leading ``Method`` column (the dict's keys), tensors in network order."""
    if not isinstance(calibrations, dict) or not calibrations:
        raise InputError("calibrations: expected a non-empty dict method -> Calibration")
    frames = []
    for method, cal in calibrations.items():
        table = cal.table(bits)
        if tensors is not None:
            missing = [t for t in tensors if t not in set(table["Tensor"])]
            if missing:
                raise InputError(f"tensors: {missing} not in the calibration of {method!r}; "
                                 f"expected names from {list(table['Tensor'])}")
            table = table[table["Tensor"].isin(tensors)]
        frames.append(table.assign(Method=method))
    out = pd.concat(frames, ignore_index=True)
    order = {t: i for i, t in enumerate(tensors if tensors is not None else
                                        next(iter(calibrations.values())).names)}
    out = out.sort_values("Tensor", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    return out[["Tensor", "Method", *[c for c in out.columns if c not in ("Tensor", "Method")]]]


def _check_methods(methods) -> tuple:
    from .quant.observers import OBSERVERS

    methods = tuple(methods)
    bad = [m for m in methods if m not in OBSERVERS]
    if bad or not methods:
        raise InputError(f"methods: expected names from {sorted(OBSERVERS)}, found {methods}")
    return methods


def calibration_sweep(net, calibration_images, images, labels, sizes=(10, 100, 1000),
                      methods=CALIBRATION_METHODS, precisions=SWEEP_PRECISIONS, seed: int = 0,
                      progress: bool = False, seeds=None) -> pd.DataFrame:
    """Accuracy of quantized copies of ``net`` on (images, labels) for every calibration method and
    number of calibration images.

    For each size n, seed s (``seeds``: several subsets, for their spread; default ``(seed,)``) and
    method: ``calibrate(net, calibration_images, method, samples=n, seed=s)`` (every method sees the same
    images), then each precision of ``microcnn.quant.precision.build_precision`` ("int8" = W8A8,
    "w4a8", "int4" = W4A4) with the default settings. One row per (size, seed, method, precision):
    ``SWEEP_COLUMNS`` (Errors: misclassified images).
    """
    from .quant import calibrate
    from .quant.precision import QUANTIZED_PRECISIONS, build_precision

    methods = _check_methods(methods)
    sizes = tuple(sizes)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1 for n in sizes):
        raise InputError(f"sizes: expected positive integers, found {sizes}")
    if len(calibration_images) < max(sizes):
        raise InputError(f"sizes: the largest ({max(sizes)}) exceeds the {len(calibration_images)} "
                         "calibration images")
    precisions = tuple(precisions)
    bad = [p for p in precisions if p not in QUANTIZED_PRECISIONS]
    if bad or not precisions:
        raise InputError(f"precisions: expected names from {QUANTIZED_PRECISIONS}, found {precisions}")
    seeds = (seed,) if seeds is None else tuple(int(s) for s in seeds)
    if not seeds:
        raise InputError("seeds: expected at least one seed, found none")
    labels = np.asarray(labels)
    runs = [(n, s, m) for n in sizes for s in seeds for m in methods]
    if progress:
        from tqdm.auto import tqdm

        runs = tqdm(runs, desc="calibration sweep", unit="calibration")
    rows = []
    for n, s, method in runs:
        cal = calibrate(net, calibration_images, method=method, samples=int(n), seed=s, progress=False)
        for precision in precisions:
            wrong = int((build_precision(net, precision, cal).predict_classes(images) != labels).sum())
            rows.append({"Method": method, "Calibration Images": int(n), "Precision": precision.upper(),
                         "Seed": s, "Accuracy (%)": 100 * (1 - wrong / len(labels)), "Errors": wrong,
                         "Test Images": len(labels)})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


SWEEP_COLUMNS = ["Method", "Calibration Images", "Precision", "Seed", "Accuracy (%)", "Errors", "Test Images"]


def sweep_pivot(sweep: pd.DataFrame, values: str = "Accuracy (%)") -> pd.DataFrame:
    """``calibration_sweep``'s table wide: one row per method (in the sweep's order), one column per
    (Precision, Calibration Images); with several seeds, the median over them of ``values``."""
    wide = sweep.pivot_table(index="Method", columns=["Precision", "Calibration Images"], values=values,
                             aggfunc="median")
    methods = list(dict.fromkeys(sweep["Method"]))
    columns = list(dict.fromkeys(zip(sweep["Precision"], sweep["Calibration Images"], strict=True)))
    return wide.loc[methods, columns]


# ------------------------------------------------------------------------------ convolution cost
def conv_cost_table(net) -> pd.DataFrame:
    """Arithmetic per image of each convolution of ``net`` under the direct, Winograd and FFT methods.

    Direct (MACs): O*C*KH*KW*OH*OW multiply-adds (naive and im2col both do exactly these).
    Winograd (mults): the element-wise products of F(2x2, rxr) -- (2+r-1)^2 per 2x2 output tile and
    channel pair -- NaN where it cannot run (stride > 1, non-square or not 3x3/5x5 kernels).
    FFT: the input is zero-padded to the Hp x Wp grid; the products are 4 real multiply-adds per
    complex frequency (Hp*(Wp//2+1) of them) per channel pair, and C forward plus O inverse real
    transforms cost 2.5*Hp*Wp*log2(Hp*Wp) flops each, counted as half as many multiply-adds.
    FFT / Direct is (products + transforms / 2) / direct: above 1 the FFT does more arithmetic.
    """
    from .convolution import ineligibility
    from .layers import Conv2d

    if getattr(net, "input_shape", None) is None:
        raise InputError("conv_cost_table: the network needs an input_shape (C, H, W)")
    shape, rows = tuple(net.input_shape), []
    for name, layer in zip(net.names, net.layers, strict=True):
        out_shape = layer.output_shape(shape)
        if isinstance(layer, Conv2d):
            c, h, w = shape
            o, oh, ow = out_shape
            (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
            direct = o * c * kh * kw * oh * ow
            winograd = math.nan
            if ineligibility("winograd", (o, c, kh, kw), layer.stride, layer.padding) is None:
                winograd = o * c * math.ceil(oh / 2) * math.ceil(ow / 2) * (2 + kh - 1) ** 2
            hp, wp = h + 2 * ph, w + 2 * pw
            products = 4 * o * c * hp * (wp // 2 + 1)
            transforms = (c + o) * FFT_FLOPS_PER_POINT_LOG * hp * wp * math.log2(hp * wp)
            rows.append({"Layer": name, "Input": "x".join(map(str, shape)),
                         "Output": "x".join(map(str, out_shape)), "Kernel": f"{kh}x{kw}",
                         "Direct (MACs)": direct, "Winograd (mults)": winograd, "FFT Grid": f"{hp}x{wp}",
                         "FFT Products (MACs)": products, "FFT Transforms (flops)": transforms,
                         "FFT / Direct": (products + transforms / 2) / direct})
        shape = out_shape
    if not rows:
        raise InputError("conv_cost_table: the network has no Conv2d layers")
    return pd.DataFrame(rows)


def conv_precision_table(per_layer: pd.DataFrame) -> pd.DataFrame:
    """Per conv layer, FP32 im2col vs INT8 im2col time and speedup, from ``quant.per_layer_table``.

    The integer network runs a convolution with its following ReLU and MaxPool2d fused into one
    stage (timed on the conv row, 0 on the others), so the FP32 side sums the same group of rows:
    the comparison is the same work in both precisions.
    """
    rows, group = [], None
    for row in per_layer.to_dict("records"):
        if row["Type"] == "Conv2d":
            group = {"Layer": row["Layer"], "FP32 im2col (ms)": 0.0, "INT8 im2col (ms)": 0.0}
            rows.append(group)
        elif row["Type"] not in ("ReLU", "MaxPool2d"):
            group = None
        if group is not None:
            group["FP32 im2col (ms)"] += row["FP32 Time (ms)"]
            group["INT8 im2col (ms)"] += row["INT8 Time (ms)"]
    table = pd.DataFrame(rows, columns=["Layer", "FP32 im2col (ms)", "INT8 im2col (ms)"])
    table["Speedup"] = table["FP32 im2col (ms)"] / table["INT8 im2col (ms)"]
    return table
