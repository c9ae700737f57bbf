"""Matplotlib figures of the notebooks, each drawn from a table or arrays that a library function made.

Every function returns a ``matplotlib.figure.Figure`` (no pyplot state: nothing stays open, and
Jupyter displays the returned figure). Axes carry labels with units; log scales say so. The data
drawn is exactly the table's, so tests compare the artists' data with the table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from .errors import InputError
from .quant.observers import HistogramObserver

# Formats save_figure writes, by file suffix.
FIGURE_FORMATS = {".png": "png", ".svg": "svg"}
# 200 dpi: a 6.4-inch figure becomes 1280 px wide, sharp on a high-density screen and in print.
DEFAULT_DPI = 200
# Inline figures in the notebooks: readable text (a 6.4-inch figure is 640 px) at a stored size that
# keeps the notebooks small. Set once, by notebook_style().
NOTEBOOK_DPI = 100
# figure_summary: significant digits kept of every plotted number before hashing.
SUMMARY_DIGITS = 6


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(int(ncols), n))
    return math.ceil(n / ncols), ncols


def _need_columns(table: pd.DataFrame, columns, what: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{what}: expected a pandas DataFrame, found {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{what}: expected columns {list(columns)}, missing {missing}")


# ------------------------------------------------------------------------------ digits
def digit_grid(images, labels=None, predicted=None, ncols: int = 8, title: str | None = None) -> Figure:
    """Images (N, 1, H, W) or (N, H, W) in a grid, each titled with its label and/or prediction
    ("7", "pred 7" or "7 → 1"; a wrong prediction's title is red)."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or len(images) == 0:
        raise InputError(f"images: expected a non-empty batch (N, 1, H, W) or (N, H, W), "
                         f"found {images.shape}")
    for name, values in (("labels", labels), ("predicted", predicted)):
        if values is not None and len(values) != len(images):
            raise InputError(f"{name}: expected {len(images)} values, found {len(values)}")
    rows, cols = _grid(len(images), ncols)
    fig = Figure(figsize=(1.1 * cols, 1.25 * rows + (0.3 if title else 0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(images):
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
        parts, color = [], "black"
        if labels is not None:
            parts.append(str(int(labels[i])))
        if predicted is not None:
            if labels is None:
                parts.append(f"pred {int(predicted[i])}")
            else:
                parts.append(f"→ {int(predicted[i])}")
                color = "black" if int(predicted[i]) == int(labels[i]) else "red"
        ax.set_title(" ".join(parts), fontsize="small", color=color)
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


# ------------------------------------------------------------------------------ calibration
def histogram_counts(observer, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of a histogram observer's data on ``bins`` equal bins over its observed
    [min, max] (each of the observer's fine bins counted at its centre)."""
    if not isinstance(observer, HistogramObserver):
        raise InputError(f"observer of {getattr(observer, 'tensor', '?')}: a {observer.kind} observer keeps "
                         "no histogram; use a percentile, mse or entropy calibration")
    fine_edges, fine_counts = observer.histogram()
    centers = np.clip((fine_edges[:-1] + fine_edges[1:]) / 2, observer.min_val, observer.max_val)
    lo, hi = observer.min_val, observer.max_val
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(centers, edges, weights=fine_counts)
    return edges, counts.astype(np.int64)


def activation_histograms(calibrations: dict, tensors=None, bits: int = 8, bins: int = 60,
                          ncols: int = 3) -> Figure:
    """One panel per tensor: the histogram of its calibration values (log count axis) and, as
    vertical lines, the range [lo, hi] each calibration method picks at ``bits``
    (``microcnn.analysis.calibration_ranges``). The histogram comes from the first calibration with a
    histogram observer (all calibrations of one call should use the same images)."""
    from .analysis import calibration_ranges

    ranges = calibration_ranges(calibrations, bits, tensors)
    names = list(dict.fromkeys(ranges["Tensor"]))
    source = next((c for c in calibrations.values()
                   if all(isinstance(c.observer(t), HistogramObserver) for t in names)), None)
    if source is None:
        raise InputError("calibrations: none keeps histograms; include a percentile, mse or entropy one")
    rows, cols = _grid(len(names), ncols)
    fig = Figure(figsize=(3.4 * cols, 2.5 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colors = {m: f"C{i + 1}" for i, m in enumerate(calibrations)}
    for ax, name in zip(axes, names, strict=False):
        edges, counts = histogram_counts(source.observer(name), bins)
        ax.stairs(counts, edges, fill=True, color="0.75", label="values")
        part = ranges[ranges["Tensor"] == name]
        for method, lo, hi in zip(part["Method"], part["Range Lo"], part["Range Hi"], strict=True):
            ax.axvline(lo, color=colors[method], linestyle="--", linewidth=1)
            ax.axvline(hi, color=colors[method], linewidth=1.2, label=method)
        ax.set_yscale("log")
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("activation value (real units)")
        ax.set_ylabel("count (log scale)")
    for ax in axes[len(names):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False,
               title=f"{bits}-bit range")
    return fig


def _error_spread(rows: pd.DataFrame, by) -> pd.DataFrame:
    """Median, min and max of the test errors (misclassified images) over the seeds of each group."""
    return rows.groupby(by, sort=False)["Errors"].agg(["median", "min", "max"])


def calibration_sweep_figure(sweep: pd.DataFrame, fp32_accuracy: float | None = None,
                             limit: float | None = None) -> Figure:
    """Test errors (misclassified images, linear axis from 0) against the number of calibration images
    (log axis), one line per method and one panel per precision, from
    ``microcnn.analysis.calibration_sweep``: the median over the seeds, with a bar from the best to the
    worst seed. ``fp32_accuracy`` (a fraction) draws the FP32 errors. ``limit`` caps the error axis;
    runs above it (failed calibrations) are marked at the top edge with their count."""
    _need_columns(sweep, ("Method", "Calibration Images", "Precision", "Errors"), "sweep")
    precisions = list(dict.fromkeys(sweep["Precision"]))
    fig = Figure(figsize=(4.2 * len(precisions) + 1.2, 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(precisions))).ravel()
    images = int(sweep["Test Images"].iloc[0]) if "Test Images" in sweep else None
    for ax, precision in zip(axes, precisions, strict=True):
        part = sweep[sweep["Precision"] == precision]
        methods = list(dict.fromkeys(part["Method"]))
        for i, method in enumerate(methods):
            spread = _error_spread(part[part["Method"] == method], "Calibration Images").sort_index()
            # methods side by side at each size (a small offset on the log axis) so the bars stay apart
            x = spread.index.to_numpy(float) * 1.08 ** (i - (len(methods) - 1) / 2)
            med = spread["median"].to_numpy(float)
            ax.errorbar(x, med, yerr=[med - spread["min"], spread["max"] - med], capsize=3, marker="o",
                        color=f"C{i + 1}", label=method)
        if fp32_accuracy is not None and images:
            ax.axhline(round(images * (1 - fp32_accuracy)), color="black", linestyle=":", linewidth=1,
                       label="FP32")
        _mark_off_scale(ax, part, limit)
        ax.set_xscale("log")
        ax.set_title(precision, fontsize="medium")
        ax.set_xlabel("calibration images (log scale)")
        ax.set_ylabel("misclassified test images" + (f" (of {images:,})" if images else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False,
               title="method (median,\nmin-max of seeds)")
    return fig


def _mark_off_scale(ax, part: pd.DataFrame, limit: float | None) -> None:
    """A linear error axis from 0; with ``limit``, runs above it are written at the top edge."""
    if limit is None or part["Errors"].max() <= limit:
        ax.set_ylim(0, None)
        return
    ax.set_ylim(0, limit)
    high = part[part["Errors"] > limit].groupby(["Method", "Calibration Images"], sort=False)["Errors"]
    for (method, n), errors in high:  # one note per point: the seeds above the limit, as lo-hi
        ax.annotate(f"{method}: {errors.min()}" + (f"-{errors.max()}" if errors.max() > errors.min() else ""),
                    (n, limit), xytext=(4, -12),
                    textcoords="offset points", fontsize="x-small", color="red",
                    arrowprops={"arrowstyle": "-|>", "color": "red"})


def method_comparison_figure(sweep: pd.DataFrame, samples: int | None = None,
                             fp32_accuracy: float | None = None) -> Figure:
    """Test errors (misclassified images, axis from 0) per calibration method, one bar per precision,
    at ``samples`` calibration images (default: the sweep's largest), from
    ``microcnn.analysis.calibration_sweep``: the median over the seeds, with a min-max error bar."""
    _need_columns(sweep, ("Method", "Calibration Images", "Precision", "Errors"), "sweep")
    samples = int(sweep["Calibration Images"].max()) if samples is None else int(samples)
    part = sweep[sweep["Calibration Images"] == samples]
    if part.empty:
        raise InputError(f"samples: expected one of {sorted(set(sweep['Calibration Images']))}, "
                         f"found {samples}")
    methods = list(dict.fromkeys(part["Method"]))
    precisions = list(dict.fromkeys(part["Precision"]))
    fig = Figure(figsize=(1.0 * len(methods) + 3.0, 3.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(precisions)
    x = np.arange(len(methods))
    for j, precision in enumerate(precisions):
        spread = _error_spread(part[part["Precision"] == precision], "Method").loc[methods]
        med = spread["median"].to_numpy(float)
        ax.bar(x + (j - (len(precisions) - 1) / 2) * width, med, width, label=precision, color=f"C{j}",
               yerr=np.vstack([med - spread["min"], spread["max"] - med]), capsize=3)
    if fp32_accuracy is not None and "Test Images" in part:
        ax.axhline(round(int(part["Test Images"].iloc[0]) * (1 - fp32_accuracy)), color="black",
                   linestyle=":", linewidth=1, label="FP32")
    ax.set_xticks(x, methods)
    ax.set_xlabel("calibration method")
    ax.set_ylabel("misclassified test images")
    ax.set_title(f"{samples} calibration images (median, min-max of seeds)", fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


# ------------------------------------------------------------------------------ per-layer error
LAYER_ERROR_SERIES = (("MSE", "cumulative"), ("Local MSE", "local"))


def layer_error_figure(tables: dict) -> Figure:
    """Per-layer quantization error from ``microcnn.quant.layer_error_table``, one table per precision
    ({"INT8": table, "INT4": table}): MSE bars on a log axis and SQNR (dB) bars, each cumulative (the
    quantized network end to end) and local (the stage alone, fed FP32 activations)."""
    if not isinstance(tables, dict) or not tables:
        raise InputError("tables: expected a non-empty dict precision -> layer_error_table")
    for name, table in tables.items():
        _need_columns(table, ("Layer", "MSE", "SQNR (dB)", "Local MSE", "Local SQNR (dB)"),
                      f"tables[{name!r}]")
    layers = list(next(iter(tables.values()))["Layer"])
    for name, table in tables.items():
        if list(table["Layer"]) != layers:
            raise InputError(f"tables[{name!r}]: expected layers {layers}, found {list(table['Layer'])}")
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    ax_mse, ax_sqnr = fig.subplots(1, 2)
    n_series = 2 * len(tables)
    width = 0.8 / n_series
    x = np.arange(len(layers))
    k = 0
    for i, (name, table) in enumerate(tables.items()):
        for column, kind in LAYER_ERROR_SERIES:
            offset = (k - (n_series - 1) / 2) * width
            style = {"color": f"C{i}", "alpha": 1.0 if kind == "cumulative" else 0.5,
                     "hatch": None if kind == "cumulative" else "//", "label": f"{name} {kind}"}
            ax_mse.bar(x + offset, table[column].to_numpy(float), width, **style)
            sqnr = table[column.replace("MSE", "SQNR (dB)")].to_numpy(float)
            ax_sqnr.bar(x + offset, np.where(np.isfinite(sqnr), sqnr, np.nan), width, **style)
            k += 1
    labels = [layer.replace("+", "+\n") for layer in layers]
    for ax in (ax_mse, ax_sqnr):
        ax.set_xticks(x, labels, fontsize="x-small")
        ax.set_xlabel("layer (fused stages share a bar group)")
    ax_mse.set_yscale("log")
    ax_mse.set_ylabel("MSE vs FP32 output (log scale)")
    ax_sqnr.set_ylabel("SQNR (dB)")
    ax_mse.set_title("mean squared error", fontsize="medium")
    ax_sqnr.set_title("signal-to-quantization-noise ratio", fontsize="medium")
    ax_sqnr.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


# ------------------------------------------------------------------------------ convolution
def conv_algorithm_figure(table: pd.DataFrame) -> Figure:
    """From ``microcnn.convolution.benchmark_algorithms``: whole-network time (ms) per algorithm, and
    max |logit error| against naive on a log axis (naive, the reference, has none and no bar)."""
    _need_columns(table, ("Algorithm", "Total Time (ms)", "Max Error vs Naive"), "table")
    names = [a.split(" (")[0] for a in table["Algorithm"]]
    x = np.arange(len(names))
    fig = Figure(figsize=(8.0, 2.9), layout="constrained")
    ax_t, ax_e = fig.subplots(1, 2)
    ax_t.bar(x, table["Total Time (ms)"].to_numpy(float), color=[f"C{i}" for i in range(len(x))])
    ax_t.set_ylabel("forward time (ms)")
    ax_t.set_title("LeNet-5 forward, whole batch", fontsize="medium")
    error = table["Max Error vs Naive"].to_numpy(float)
    ax_e.bar(x, np.where(error > 0, error, np.nan), color=[f"C{i}" for i in range(len(x))])
    ax_e.set_yscale("log")
    ax_e.set_ylabel("max |logit error| vs naive (log scale)")
    ax_e.set_title("max |logit error| vs naive", fontsize="medium")
    for i in np.flatnonzero(error == 0):  # no bar on a log axis: say why the slot is empty
        ax_e.text(i, 0.03, "0\n(reference)", ha="center", va="bottom", fontsize="small",
                  transform=ax_e.get_xaxis_transform())
    for ax in (ax_t, ax_e):
        ax.set_xticks(x, names)
        ax.set_xlabel("convolution algorithm")
    return fig


def conv_layer_time_figure(table: pd.DataFrame) -> Figure:
    """From ``microcnn.convolution.per_layer_algorithm_table``: each conv layer's time (ms, log axis)
    under each algorithm; an algorithm that cannot run a layer has no bar there."""
    _need_columns(table, ("Layer",), "table")
    columns = [c for c in table.columns if c.endswith(" (ms)")]
    if not columns:
        raise InputError("table: expected '<algorithm> (ms)' columns")
    x = np.arange(len(table))
    width = 0.8 / len(columns)
    fig = Figure(figsize=(6.5, 3.0), layout="constrained")
    ax = fig.add_subplot()
    for j, column in enumerate(columns):
        ax.bar(x + (j - (len(columns) - 1) / 2) * width, table[column].to_numpy(float), width,
               label=column.removesuffix(" (ms)"), color=f"C{j}")
    ax.set_yscale("log")
    ax.set_xticks(x, table["Layer"])
    ax.set_xlabel("convolution layer")
    ax.set_ylabel("time (ms, log scale)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False,
              title="algorithm")
    return fig


# ------------------------------------------------------------------------------ results
def confusion_figure(matrices: dict) -> Figure:
    """Confusion matrices from ``microcnn.analysis.confusion_matrix`` side by side ({name: table}),
    counts on a log colour scale (empty cells blank) and written in the off-diagonal cells."""
    if not isinstance(matrices, dict) or not matrices:
        raise InputError("matrices: expected a non-empty dict name -> confusion_matrix table")
    top = max(int(m.to_numpy().max()) for m in matrices.values())
    fig = Figure(figsize=(3.3 * len(matrices) + 0.8, 3.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(matrices))).ravel()
    norm = LogNorm(vmin=1, vmax=max(top, 2))
    image = None
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=True):
        counts = matrix.to_numpy()
        image = ax.imshow(np.ma.masked_equal(counts, 0), cmap="Blues", norm=norm)
        for (i, j), v in np.ndenumerate(counts):
            if v and i != j:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
        ax.set_xticks(range(counts.shape[1]), matrix.columns)
        ax.set_yticks(range(counts.shape[0]), matrix.index)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{name}: {np.trace(counts)} / {counts.sum()} correct", fontsize="medium")
    assert image is not None  # matrices is not empty: the loop drew at least one
    fig.colorbar(image, ax=list(axes), label="images (log scale)", shrink=0.8)
    return fig


def training_curves(history: pd.DataFrame) -> Figure:
    """Loss and accuracy per epoch from ``microcnn.train.fit``'s history (test accuracy when the
    history has it)."""
    _need_columns(history, ("epoch", "loss", "train_acc"), "history")
    fig = Figure(figsize=(8.0, 2.9), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    epoch = history["epoch"].to_numpy()
    ax_loss.plot(epoch, history["loss"].to_numpy(), marker="o", label="training loss")
    ax_loss.set_ylabel("cross-entropy loss (nats per image)")
    ax_acc.plot(epoch, 100 * history["train_acc"].to_numpy(), marker="o", label="train (during epoch)")
    if "test_acc" in history and history["test_acc"].notna().any():
        ax_acc.plot(epoch, 100 * history["test_acc"].to_numpy(), marker="s", label="test (end of epoch)")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend(fontsize="small", frameon=False)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.set_xticks(epoch)
    return fig


# ------------------------------------------------------------------------------ export
def save_figure(fig: Figure, path, dpi: int = DEFAULT_DPI, overwrite: bool = True):
    """Write ``fig`` to ``path`` as SVG (vector) or PNG (``dpi`` pixels per inch), chosen by the suffix.

    The write is atomic (``microcnn.fileutil``): a failure leaves no partial file and an existing file
    untouched. ``overwrite=False`` refuses an existing file. The figure keeps its size: a PNG is
    ``figsize * dpi`` pixels. SVGs carry no date, so saving the same figure twice gives the same bytes.
    Returns the path as a ``Path``.
    """
    from pathlib import Path

    from .fileutil import atomic_open

    if not isinstance(fig, Figure):
        raise InputError(f"fig: expected a matplotlib Figure, found {type(fig).__name__}")
    path = Path(path)
    fmt = FIGURE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: expected a file name ending in {' or '.join(FIGURE_FORMATS)}, "
                         f"found {path.suffix or 'no suffix'}")
    if isinstance(dpi, bool) or not isinstance(dpi, int | np.integer) or not 10 <= dpi <= 2400:
        raise InputError(f"dpi: expected an integer in 10..2400, found {dpi!r}")
    import matplotlib

    metadata = {"Date": None} if fmt == "svg" else None
    # A fixed salt: SVG element ids are otherwise random, and the same figure would differ each save.
    with matplotlib.rc_context({"svg.hashsalt": "microcnn"}), atomic_open(path, "wb", overwrite) as f:
        fig.savefig(f, format=fmt, dpi=int(dpi), metadata=metadata)
    return path


def notebook_style() -> None:
    """The notebooks' one display setting: inline figures at ``NOTEBOOK_DPI``, tables with 4 digits."""
    import matplotlib

    matplotlib.rcParams["figure.dpi"] = NOTEBOOK_DPI
    pd.set_option("display.precision", 4)
    pd.set_option("display.width", 120)


def _artist_arrays(ax) -> list:
    """Every number an axes draws: lines, patches (bars, histograms), images, collections (error bars)."""
    out = [line.get_xydata() for line in ax.get_lines()]
    for patch in ax.patches:
        if hasattr(patch, "get_data"):  # StepPatch (histograms): counts and edges
            out += list(patch.get_data()[:2])
        else:  # bars and polygons: the outline in data coordinates
            out.append(patch.get_patch_transform().transform(patch.get_path().vertices))
    out += [np.ma.filled(np.ma.asarray(im.get_array(), float), np.nan) for im in ax.images]
    for c in ax.collections:
        out += [c.get_offsets()] + [p.vertices for p in c.get_paths()]
    return out


def figure_summary(fig: Figure, digits: int = SUMMARY_DIGITS) -> str:
    """A text fingerprint of what ``fig`` plots, so nbval sees a changed plot: every number drawn, to
    ``digits`` significant digits, and every text, hashed (SHA-1, 12 hex digits) for the whole figure,
    then a line per axes that draws more than images (title, y label and range, artists, hash)."""
    import hashlib

    if not isinstance(fig, Figure):
        raise InputError(f"fig: expected a matplotlib Figure, found {type(fig).__name__}")
    whole, lines = hashlib.sha1(), []
    for k, ax in enumerate(fig.axes):
        digest = hashlib.sha1()
        for arr in _artist_arrays(ax):
            values = np.asarray(arr, float).ravel()
            digest.update(" ".join(f"{v:.{digits}g}" for v in values).encode() + b";")
        texts = [t.get_text() for t in ax.texts] + [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        digest.update("|".join(texts).encode())
        whole.update(digest.digest())
        if (ax.get_lines() or ax.patches or ax.collections) and ax.get_label() != "<colorbar>":
            lo, hi = ax.get_ylim()
            lines.append(f"axes {k} {ax.get_title()!r}: {ax.get_ylabel()!r} {lo:.3g}..{hi:.3g} "
                         f"({ax.get_yscale()}), {len(ax.get_lines())} lines, {len(ax.patches)} patches, "
                         f"{len(ax.collections)} collections, sha1 {digest.hexdigest()[:12]}")
    head = (f"figure: {len(fig.axes)} axes, {sum(len(ax.images) for ax in fig.axes)} images, "
            f"sha1 {whole.hexdigest()[:12]}")
    return "\n".join([head, *lines])
