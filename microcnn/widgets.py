"""Interactive exploration of predictions: plain functions, and ipywidgets glue over them.

Everything a widget shows is computed by a plain function of its inputs (``prediction_panel``,
``probability_figure``, ``feature_maps_figure``, ``misclassified``, ``preprocess_drawing``, and the
callbacks ``on_index_change``, ``on_layer_change``, ``on_misclassified_change``,
``on_drawing_change``). Tests call those directly, because a notebook replay never moves a slider.
``explorer`` and ``drawing_pad`` only wire widgets to them; ipywidgets and anywidget are imported
there, so importing this module needs neither.

A "model" is anything with ``predict(x) -> (N, 10)`` class probabilities: an FP32 ``Sequential`` or
a quantized network. Feature maps need ``trace(x)`` (``Sequential`` has it).
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .checks import as_image_batch
from .datasets import box_weights
from .errors import InputError, MicrocnnError
from .kernels.linalg import matmul
from .model import Model

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10

# MNIST's own preprocessing (LeCun et al.): the digit's bounding box is scaled so its longer side is
# 20 px, then placed in a 28x28 field with its centre of mass at the centre. Measured on the MNIST
# test set, the mean centre of mass sits at pixel index (14.0, 14.0).
DIGIT_BOX = 20
FIELD = 28
FIELD_CENTRE = 14.0
# A canvas whose strongest stroke differs from the background by less than this (on a 0..1 scale,
# ~25/255) holds no drawing: preprocess_drawing returns None rather than magnifying noise.
EMPTY_CONTRAST = 0.1
# Pixels below this fraction of the peak ink are anti-aliasing haze and do not widen the bounding box.
BOX_INK = 0.05


# ------------------------------------------------------------------------------------ predictions
def _one_image(image) -> np.ndarray:
    x = as_image_batch(image, IMAGE_SHAPE, name="image")
    if len(x) != 1:
        raise InputError(f"image: expected one image, found a batch of {len(x)}")
    return x


def _check_models(models) -> dict:
    if not isinstance(models, dict) or not models:
        found = "an empty dict" if isinstance(models, dict) else type(models).__name__
        raise InputError(f"models: expected a non-empty dict name -> model, found {found}")
    for name, model in models.items():
        if not callable(getattr(model, "predict", None)):
            raise InputError(f"models[{name!r}]: expected an object with .predict(x), "
                             f"found {type(model).__name__}")
    return models


def _probabilities(name, model, x) -> np.ndarray:
    probs = np.asarray(model.predict(x), dtype=np.float64)
    if probs.shape != (len(x), NUM_CLASSES):
        raise InputError(f"models[{name!r}].predict: expected probabilities of shape "
                         f"({len(x)}, {NUM_CLASSES}), found {probs.shape}")
    return probs


def _logits(name, model, x) -> np.ndarray:
    if not callable(getattr(model, "logits", None)):
        raise InputError(f"models[{name!r}]: expected an object with .logits(x) for the logits view, "
                         f"found {type(model).__name__}")
    out = np.asarray(model.logits(x), dtype=np.float64)
    if out.shape != (len(x), NUM_CLASSES):
        raise InputError(f"models[{name!r}].logits: expected shape ({len(x)}, {NUM_CLASSES}), "
                         f"found {out.shape}")
    return out


def prediction_panel(models: dict, image, scores: str = "probabilities") -> pd.DataFrame:
    """Class probabilities (or, ``scores="logits"``, the scores before the softmax) of one image under
    every model: rows are classes 0-9 (index ``Class``), columns the model names in the dict's order.
    ``image``: (28, 28), (1, 28, 28) or (1, 1, 28, 28)."""
    if scores not in ("probabilities", "logits"):
        raise InputError(f"scores: expected 'probabilities' or 'logits', found {scores!r}")
    x = _one_image(image)
    score = _probabilities if scores == "probabilities" else _logits
    columns = {name: score(name, model, x)[0] for name, model in _check_models(models).items()}
    panel = pd.DataFrame(columns, index=pd.RangeIndex(NUM_CLASSES, name="Class"))
    panel.columns.name = "Model"
    panel.attrs["scores"] = scores
    return panel


def prediction_summary(panel: pd.DataFrame, label: int | None = None) -> str:
    """One line per panel: each model's predicted class and its probability, e.g.
    ``label 7 | FP32: 7 (99.8%) | INT8: 7 (99.7%)``."""
    parts = [] if label is None else [f"label {int(label)}"]
    for name in panel.columns:
        k = int(panel[name].to_numpy().argmax())
        parts.append(f"{name}: {k} ({100 * panel[name].iloc[k]:.1f}%)")
    return " | ".join(parts)


def probability_figure(panel: pd.DataFrame, label: int | None = None, title: str | None = None,
                       figsize=(6.4, 2.6), logits: pd.DataFrame | None = None) -> Figure:
    """Grouped bars: for each class, one bar per model (the panel's columns); the true ``label`` is
    shaded. ``logits`` (``prediction_panel(..., scores="logits")``) adds a logits panel beside it."""
    panels = [panel] if logits is None else [panel, logits]
    fig = Figure(figsize=(figsize[0] * len(panels), figsize[1]), layout="constrained")
    for ax, part in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        classes = part.index.to_numpy()
        width = 0.8 / max(1, part.shape[1])
        for j, name in enumerate(part.columns):
            ax.bar(classes + (j - (part.shape[1] - 1) / 2) * width, part[name].to_numpy(), width,
                   label=str(name))
        ax.set_xticks(classes)
        ax.set_xlabel("class")
        if part.attrs.get("scores") == "logits":
            ax.set_ylabel("logit (before softmax)")
            ax.axhline(0, color="black", linewidth=0.6)
        else:
            ax.set_ylabel("probability")
            ax.set_ylim(0, 1.05)
        if label is not None:
            ax.get_xticklabels()[int(label)].set_fontweight("bold")
            ax.axvspan(label - 0.45, label + 0.45, color="0.9", zorder=0)
        ax.set_title(title if title is not None else
                     ("" if label is None else f"true label {int(label)} (shaded)"), fontsize="medium")
    # Outside the axes: inside, it would hide the tall bars of the low classes.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of a figure, for ``ipywidgets.Image`` (no pyplot state, nothing left open)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def stack_pngs(pngs) -> bytes:
    """PNG images (bytes) one below the other, left-aligned on white, as one PNG: the static preview of
    a widget's view. Empty entries (``b""`` or None) are skipped."""
    from matplotlib.image import imread, imsave

    def rgba(data):
        a = imread(io.BytesIO(data))
        if a.ndim == 2:  # grey
            a = np.repeat(a[..., None], 3, axis=2)
        if a.shape[2] == 3:
            a = np.concatenate([a, np.ones(a.shape[:2] + (1,), a.dtype)], axis=2)
        return a.astype(np.float32)

    images = [rgba(p) for p in pngs if p]
    if not images:
        raise InputError("pngs: expected at least one PNG image, found none")
    width = max(a.shape[1] for a in images)
    rows = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=1.0) for a in images]
    buf = io.BytesIO()
    imsave(buf, np.clip(np.concatenate(rows), 0.0, 1.0), format="png")
    return buf.getvalue()


def gray_png(pixels: np.ndarray) -> bytes:
    """A (H, W) uint8 grey image as PNG bytes, pixel for pixel."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, np.asarray(pixels, np.uint8), cmap="gray", vmin=0, vmax=255, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ feature maps
def layer_choices(net) -> list[str]:
    """Layer names ``feature_maps_figure`` accepts, in network order (conv1, relu1, pool1, ...)."""
    return list(net.names)


def _find_record(records, layer):
    for rec in records:
        if layer == rec.name or (isinstance(layer, int | np.integer) and layer == rec.index):
            return rec
    raise InputError(f"layer: expected one of {[r.name for r in records]} or an index "
                     f"0..{len(records) - 1}, found {layer!r}")


def _map_colours(values) -> dict:
    """imshow colours: diverging (red +, blue -, white 0) centred at 0 for signed maps, else viridis."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if lo < 0 < hi:
        top = max(-lo, hi)
        return {"cmap": "RdBu_r", "vmin": -top, "vmax": top}
    return {"cmap": "viridis", "vmin": lo, "vmax": hi if hi > lo else lo + 1}


def _show_input(ax, x) -> None:  # the network's input, in the panel beside maps and saliency
    ax.imshow(np.asarray(x).reshape(FIELD, FIELD), cmap="gray", vmin=0, vmax=1)
    ax.set_title("input", fontsize="x-small")
    ax.set_xticks([])
    ax.set_yticks([])


def feature_maps_figure(net, image, layer, max_maps: int = 16) -> Figure:
    """The output of ``layer`` (name like ``"conv1"`` or index) for one image, from ``net.trace``, with
    the input image in the first panel.

    Spatial outputs (C, H, W) show up to ``max_maps`` channels as a grid of images sharing one
    colour scale (diverging, centred at 0, for signed maps); flat outputs (F,) and 1x1 maps (F, 1, 1)
    show as bars, one per unit.
    """
    if max_maps < 1:
        raise InputError(f"max_maps: expected >= 1, found {max_maps}")
    x = _one_image(image)
    record = _find_record(net.trace(x), layer)
    out = record.output[0]
    heading = f"{record.name} ({record.type}) output, shape {tuple(out.shape)}"
    if out.ndim == 3 and out.shape[1:] == (1, 1):  # 1x1 maps read better as one bar per channel
        out = out.reshape(-1)
    if out.ndim == 1:
        fig = Figure(figsize=(7.6, 2.4), layout="constrained")
        ax_in, ax = fig.subplots(1, 2, width_ratios=(1, 5))
        _show_input(ax_in, x)
        ax.bar(np.arange(out.size), out, width=0.9)
        ax.set_xlabel("unit")
        ax.set_ylabel("activation")
        ax.set_title(heading, fontsize="medium")
        return fig
    shown = min(max_maps, out.shape[0])
    cols = min(shown, 8)
    rows = -(-shown // cols)
    # A fixed layout: constrained layout would more than double the render time of a slider step. An
    # empty gap column between the input and the maps holds the maps' "y (px)" label, which the narrow
    # space between two panels cannot (it ran into the input image).
    gap = 0.35
    width, height = 1.1 * (cols + 1 + gap) + 1.0, 1.1 * rows + 0.7
    fig = Figure(figsize=(width, height))
    spec = fig.add_gridspec(rows, cols + 2, width_ratios=(1, gap, *[1] * cols), left=0.35 / width,
                            right=1 - 0.95 / width, bottom=0.3 / height, top=1 - 0.55 / height,
                            wspace=0.1, hspace=0.3)
    _show_input(fig.add_subplot(spec[0, 0]), x)
    axes = np.array([[fig.add_subplot(spec[r, c + 2]) for c in range(cols)] for r in range(rows)])
    colours = _map_colours(out[:shown])
    image_artist = None
    for k, ax in enumerate(axes.flat):
        if k >= shown:
            ax.set_axis_off()
            continue
        image_artist = ax.imshow(out[k], **colours)
        ax.set_title(f"ch {k}", fontsize="x-small")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1, 0].set_xlabel("x (px)", fontsize="small")
    axes[-1, 0].set_ylabel("y (px)", fontsize="small")
    bar_axes = fig.add_axes((1 - 0.8 / width, 0.3 / height, 0.12 / width, 1 - 0.85 / height))
    assert image_artist is not None  # shown >= 1: the loop drew at least one map
    fig.colorbar(image_artist, cax=bar_axes, label="activation")
    more = f", first {shown} of {out.shape[0]} channels" if shown < out.shape[0] else ""
    fig.suptitle(heading + more, fontsize="medium")
    return fig


# ------------------------------------------------------------------------------------ saliency
OCCLUSION_PATCH = 4  # px: 7x7 patches cover a 28x28 digit; one batch of 49 occluded copies


def saliency(model, image, target: int | None = None) -> tuple[np.ndarray, str]:
    """(map (28, 28) float64, method): how the logit of class ``target`` (default: the predicted one)
    depends on each pixel. An FP32 ``Sequential``: d logit / d pixel by autograd ("gradient"; its
    parameter gradients are left as they were). Other models (integer kernels have no gradient): the
    logit's drop when each ``OCCLUSION_PATCH`` square is set to 0, per pixel ("occlusion")."""
    from .autograd import Tensor
    from .network import Sequential

    x = _one_image(image)
    if target is None:
        target = int(_probabilities("model", model, x)[0].argmax())
    if not isinstance(target, int | np.integer) or not 0 <= target < NUM_CLASSES:
        raise InputError(f"target: expected a class 0..{NUM_CLASSES - 1}, found {target!r}")
    if isinstance(model, Sequential):
        params = model.parameters()
        kept = [p.grad for p in params]
        t = Tensor(x, requires_grad=True)
        out = model.logits(t)
        seed = np.zeros(out.shape, np.float32)
        seed[0, target] = 1.0
        out.backward(seed)
        for param, g in zip(params, kept, strict=True):
            param.grad = g
        assert t.grad is not None  # backward() just set it: t is a leaf that requires grad
        return t.grad[0, 0].astype(np.float64), "gradient"
    p = OCCLUSION_PATCH
    n = FIELD // p
    batch = np.repeat(x, n * n, axis=0)
    for k in range(n * n):
        i, j = divmod(k, n)
        batch[k, 0, i * p:(i + 1) * p, j * p:(j + 1) * p] = 0
    base = _logits("model", model, x)[0, target]
    drops = (base - _logits("model", model, batch)[:, target]).reshape(n, n) / p ** 2
    return np.kron(drops, np.ones((p, p))), "occlusion"


def saliency_figure(image, saliency_map, method: str, title: str = "") -> Figure:
    """The input image beside its saliency map (diverging colours centred at 0, red: supports the class)."""
    fig = Figure(figsize=(5.2, 2.5), layout="constrained")
    ax_in, ax = fig.subplots(1, 2)
    _show_input(ax_in, image)
    art = ax.imshow(saliency_map, **_map_colours(np.append(saliency_map, [-1e-12, 1e-12])))
    ax.set_title(f"{method} saliency", fontsize="x-small")
    ax.set_xlabel("x (px)", fontsize="small")
    ax.set_ylabel("y (px)", fontsize="small")
    fig.colorbar(art, ax=ax, label="d logit / d pixel" if method == "gradient" else "logit drop per pixel")
    if title:
        fig.suptitle(title, fontsize="small")
    return fig


# ------------------------------------------------------------------------------------ uploads
MODEL_SUFFIXES = (".safetensors", ".raw", ".onnx")


def load_model_bytes(name: str, data: bytes):
    """A model from an uploaded file's name and bytes, through a temporary file of that name and
    ``microcnn.resolve.load_model_spec``: the same checks and error messages as a file on disk."""
    import tempfile
    from pathlib import Path

    from .resolve import load_model_spec

    name = Path(str(name)).name
    if Path(name).suffix.lower() not in MODEL_SUFFIXES:
        raise InputError(f"{name}: expected a model file ending in {', '.join(MODEL_SUFFIXES)}, "
                         f"found {Path(name).suffix or 'no suffix'}")
    with tempfile.TemporaryDirectory(prefix="microcnn-upload-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(bytes(data))
        try:
            return load_model_spec(str(path))
        except MicrocnnError as exc:  # the same error, naming the uploaded file, not the temporary copy
            exc.args = (str(exc).replace(str(path), name),)
            raise


def load_dataset_bytes(name: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, 28, 28) float32, labels int64) from an uploaded ``.npz`` with arrays ``images``
    ((N, [1,] 28, 28), uint8 or float 0..1) and ``labels`` (0..9); no pickles: an upload runs no code."""
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in ("images", "labels") if k in archive.files}
            found = archive.files
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{name}: expected an .npz archive (numpy.savez), could not read it "
                         f"({exc})") from None
    if len(arrays) < 2:
        raise InputError(f"{name}: expected arrays 'images' and 'labels', found {found}")
    images = arrays["images"]
    images = as_image_batch(images[:, None] if images.ndim == 3 else images, IMAGE_SHAPE,
                            name=f"{name}: images")
    labels = arrays["labels"]
    if (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)
            or labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise InputError(f"{name}: labels: expected {len(images)} integer classes 0..{NUM_CLASSES - 1}, "
                         f"found {labels.dtype} of shape {labels.shape}")
    return images, labels.astype(np.int64)


# ------------------------------------------------------------------------------------ misclassified
def misclassified(model, images, labels, predicted=None) -> np.ndarray:
    """Indices (ascending, int64) of the images whose predicted class differs from the label.
    ``predicted``: class predictions already at hand, to skip running the model again."""
    labels = np.asarray(labels)
    if predicted is None:
        predicted = _probabilities("model", model, as_image_batch(images, IMAGE_SHAPE)).argmax(1)
    predicted = np.asarray(predicted)
    if labels.shape != predicted.shape or labels.ndim != 1:
        raise InputError(f"labels: expected shape {predicted.shape}, found {labels.shape}")
    return np.flatnonzero(predicted != labels).astype(np.int64)


def page_count(n_items: int, per_page: int) -> int:
    """Pages needed to show ``n_items`` thumbnails ``per_page`` at a time (at least one, maybe empty)."""
    if per_page < 1:
        raise InputError(f"per_page: expected >= 1, found {per_page}")
    return max(1, -(-n_items // per_page))


def misclassified_figure(images, labels, predicted, indices, page: int = 0, per_page: int = 12) -> Figure:
    """A page of the misclassified-digit browser: thumbnails titled ``#index label→predicted``."""
    indices = np.asarray(indices, dtype=np.int64)
    pages = page_count(len(indices), per_page)
    if not 0 <= page < pages:
        raise InputError(f"page: expected 0..{pages - 1}, found {page}")
    chosen = indices[page * per_page:(page + 1) * per_page]
    cols = min(per_page, 6)
    rows = -(-per_page // cols)
    width, height = 1.2 * cols, 1.35 * rows + 0.4
    fig = Figure(figsize=(width, height))  # fixed layout, for speed (see feature_maps_figure)
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.05 / height, top=1 - 0.6 / height, hspace=0.35)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, chosen, strict=False):
        ax.imshow(np.asarray(images[i]).reshape(FIELD, FIELD), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"#{i} {labels[i]}→{predicted[i]}", fontsize="x-small")
    fig.suptitle(f"misclassified {len(indices)}: page {page + 1}/{pages} (label→predicted)",
                 fontsize="medium")
    return fig


# ------------------------------------------------------------------------------------ drawings
def _canvas_gray(canvas) -> np.ndarray:
    """A canvas as float64 (H, W) grey levels in [0, 1]; RGBA is composited over a background that
    contrasts with the strokes (white under dark strokes, black under light ones)."""
    a = np.asarray(canvas)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or min(a.shape[:2]) < 1:
        raise InputError(f"canvas: expected (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA, found shape "
                         f"{a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise InputError(f"canvas: float pixels must be finite, found {int((~np.isfinite(a)).sum())} "
                             "NaN/Inf")
        if a.min() < 0.0 or a.max() > 1.0:
            raise InputError(f"canvas: float pixels must lie in [0, 1], found range [{a.min()}, {a.max()}]")
    else:
        raise InputError(f"canvas: expected uint8 (0..255) or float (0..1) pixels, found dtype {a.dtype}")
    if a.ndim == 2:
        return a
    if a.shape[2] == 1:
        return a[..., 0]
    # ITU-R BT.601 weights, summed in this order (a BLAS product's order depends on the CPU)
    luma = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    if a.shape[2] == 3:
        return luma
    alpha = a[..., 3]
    if alpha.sum() == 0.0:
        return np.zeros_like(luma)
    stroke_luma = float((alpha * luma).sum() / alpha.sum())
    background = 1.0 if stroke_luma < 0.5 else 0.0
    return alpha * luma + (1.0 - alpha) * background


def preprocess_drawing(canvas) -> np.ndarray | None:
    """A drawing on a canvas of any size turned into an MNIST-like input: float32 (1, 1, 28, 28).

    ``canvas``: (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; uint8 0..255 or float 0..1.
    Steps, as MNIST was made: grey levels; the background is the median grey (a digit covers less
    than half the canvas) and if it is light the image is inverted, since MNIST strokes are bright
    on black; ink = contrast to the background, scaled so the strongest stroke is 1; crop to the
    bounding box of the ink; area-average resize so the longer side is 20 px, keeping the aspect
    ratio; paste into a 28x28 field with the centre of mass at pixel (14, 14) (shifted by whole
    pixels, and clamped so no ink leaves the field). Values lie in [0, 1].

    Returns ``None`` for an empty canvas: one whose strongest stroke contrasts with the background
    by less than ``EMPTY_CONTRAST`` (a blank, uniformly filled or nearly blank canvas).
    """
    gray = _canvas_gray(canvas)
    background = float(np.median(gray))
    ink = (background - gray) if background > 0.5 else (gray - background)
    ink = np.clip(ink, 0.0, None)
    peak = float(ink.max())
    if peak < EMPTY_CONTRAST:
        return None
    ink /= peak
    rows = np.flatnonzero((ink >= BOX_INK).any(axis=1))
    cols = np.flatnonzero((ink >= BOX_INK).any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = DIGIT_BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    # fixed-order products, not BLAS's (whose summation order, so last bits, depend on the CPU)
    small = matmul(matmul(box_weights(new_h, h), np.ascontiguousarray(crop)),
                   np.ascontiguousarray(box_weights(new_w, w).T))
    mass = small.sum()
    cy = float((small.sum(axis=1) * np.arange(new_h)).sum() / mass)
    cx = float((small.sum(axis=0) * np.arange(new_w)).sum() / mass)
    top = int(np.clip(np.floor(FIELD_CENTRE - cy + 0.5), 0, FIELD - new_h))
    left = int(np.clip(np.floor(FIELD_CENTRE - cx + 0.5), 0, FIELD - new_w))
    out = np.zeros((1, 1, FIELD, FIELD), np.float32)
    out[0, 0, top:top + new_h, left:left + new_w] = np.clip(small, 0.0, 1.0)
    return out


def pixels_to_canvas(pixels: bytes, width: int, height: int) -> np.ndarray:
    """Grey uint8 bytes sent by the drawing canvas (row-major) as an (height, width) array."""
    data = np.frombuffer(bytes(pixels), dtype=np.uint8)
    if data.size != width * height:
        raise InputError(f"pixels: expected {width}x{height} = {width * height} bytes, found {data.size}")
    return data.reshape(height, width)


# ------------------------------------------------------------------------------------ callbacks
@dataclass
class ExplorerState:
    """What the explorer's callbacks read: models, the test images, and per-model predictions."""

    models: dict
    images: np.ndarray
    labels: np.ndarray
    net: object  # the model with .trace whose feature maps are shown
    predicted: dict = field(default_factory=dict)  # name -> predicted classes of every image
    wrong: dict = field(default_factory=dict)  # name -> misclassified indices
    layer: str = ""
    saliency_model: str = ""  # whose saliency the explorer shows


def explorer_state(models: dict, images, labels, net=None) -> ExplorerState:
    """Predict every image once with every model, so moving a slider only renders."""
    models = _check_models(models)
    images = as_image_batch(images, IMAGE_SHAPE)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise InputError(f"labels: expected shape ({len(images)},), found {labels.shape}")
    if net is None:
        net = next((m for m in models.values() if isinstance(m, Model)), None)
        if net is None:
            raise InputError("models: none is a microcnn model (with .trace(x) for feature maps); "
                             "pass net= explicitly")
    predicted = {name: _probabilities(name, m, images).argmax(1) for name, m in models.items()}
    wrong = {name: misclassified(None, images, labels, predicted=p) for name, p in predicted.items()}
    return ExplorerState(models, images, labels, net, predicted, wrong, layer=layer_choices(net)[0],
                         saliency_model=next(iter(models)))


def _check_index(state: ExplorerState, index) -> int:
    if not isinstance(index, int | np.integer) or not 0 <= index < len(state.images):
        raise InputError(f"index: expected an int in 0..{len(state.images) - 1}, found {index!r}")
    return int(index)


def on_index_change(state: ExplorerState, index: int) -> dict:
    """Slider moved to test image ``index``: its probability panel, a summary line, the bars and the
    feature maps of the current layer (both as PNG bytes)."""
    index = _check_index(state, index)
    image, label = state.images[index], int(state.labels[index])
    panel = prediction_panel(state.models, image)
    # the logits beside the probabilities, when every model exposes them
    logits = prediction_panel(state.models, image, "logits") if all(
        callable(getattr(m, "logits", None)) for m in state.models.values()) else None
    return {
        "index": index,
        "panel": panel,
        "logits": logits,
        "summary": f"test image {index}: " + prediction_summary(panel, label),
        "probabilities_png": figure_png(probability_figure(panel, label, logits=logits)),
        "feature_maps_png": figure_png(feature_maps_figure(state.net, image, state.layer)),
    }


def on_saliency_change(state: ExplorerState, index: int, model: str | None = None) -> bytes:
    """PNG of the saliency of image ``index``'s predicted class under ``model`` (default: the last one)."""
    index = _check_index(state, index)
    model = state.saliency_model if model is None else model
    if model not in state.models:
        raise InputError(f"model: expected one of {list(state.models)}, found {model!r}")
    state.saliency_model = model
    image, target = state.images[index], int(state.predicted[model][index])
    sal, method = saliency(state.models[model], image, target)
    return figure_png(saliency_figure(image, sal, method, f"{model}: class {target} (predicted)"))


def on_upload(state: ExplorerState, name: str, data: bytes) -> str:
    """An uploaded ``.npz`` replaces the images and labels; a model file joins the models under its
    name, feature maps showing its layers. A bad file raises and changes nothing. Returns a status line."""
    if str(name).lower().endswith(".npz"):
        images, labels = load_dataset_bytes(name, data)
        new = explorer_state(state.models, images, labels, net=state.net)
        what = f"data set {name}: {len(images):,} images"
    else:
        model = load_model_bytes(name, data)
        new = explorer_state({**state.models, name: model}, state.images, state.labels,
                             net=model)
        what = f"model {name}: {len(new.wrong[name])} of {len(new.images):,} images misclassified"
    state.__dict__.update(vars(new))
    return "loaded " + what


def on_layer_change(state: ExplorerState, index: int, layer: str) -> bytes:
    """Layer dropdown changed: remember the layer and return its feature maps as PNG bytes."""
    index = _check_index(state, index)
    png = figure_png(feature_maps_figure(state.net, state.images[index], layer))
    state.layer = layer
    return png


def on_misclassified_change(state: ExplorerState, model: str, page: int, per_page: int = 12) -> dict:
    """Misclassified browser: the page of ``model``'s mistakes as PNG bytes, how many pages there are,
    and the first index on the page (the explorer jumps its slider there)."""
    if model not in state.wrong:
        raise InputError(f"model: expected one of {list(state.wrong)}, found {model!r}")
    wrong = state.wrong[model]
    pages = page_count(len(wrong), per_page)
    fig = misclassified_figure(state.images, state.labels, state.predicted[model], wrong, page, per_page)
    first = int(wrong[page * per_page]) if len(wrong) else None
    return {"png": figure_png(fig), "pages": pages, "count": len(wrong), "first_index": first}


def on_drawing_change(models: dict, pixels: bytes, width: int, height: int) -> dict:
    """Canvas changed: preprocess the drawing and predict it. ``text`` says the prediction (or asks for
    a drawing when the canvas is empty); ``panel`` and the PNGs are None for an empty canvas."""
    image = preprocess_drawing(pixels_to_canvas(pixels, width, height)) if len(pixels) else None
    if image is None:
        return {"text": "Prediction: none (draw a digit)", "panel": None, "image": None,
                "probabilities_png": None, "input_png": None}
    panel = prediction_panel(models, image)
    first = panel.columns[0]
    k = int(panel[first].to_numpy().argmax())
    return {"text": f"Prediction: {k} ({prediction_summary(panel)})", "panel": panel, "image": image,
            "probabilities_png": figure_png(probability_figure(panel, figsize=(5.2, 2.4))),
            "input_png": figure_png(_input_figure(image))}


def _input_figure(image) -> Figure:
    fig = Figure(figsize=(1.8, 1.9), layout="constrained")
    _show_input(fig.add_subplot(), image)
    fig.axes[0].set_title("network input (28×28)", fontsize="x-small")
    return fig


# ------------------------------------------------------------------------------------ widget glue
_PREVIEW_CLASSES: dict = {}


def _previewed(box_class):
    """A subclass of the ipywidgets container ``box_class`` whose stored output also carries a static
    preview: besides the widget view, its display bundle holds ``image/png`` and ``text/plain`` from the
    instance's ``preview() -> (text, png bytes)``, taken when it is displayed. Jupyter shows the live
    view; a notebook viewer or ``microcnn report`` (no kernel, no widget manager) shows the preview
    instead of an empty output or a raw ``VBox(children=...)`` repr."""
    import base64

    if box_class not in _PREVIEW_CLASSES:
        class Previewed(box_class):
            preview = None  # set by the widget that builds the box

            def _repr_mimebundle_(self, **kwargs):
                bundle = dict(super()._repr_mimebundle_(**kwargs) or {})
                text, png = self.preview()
                bundle["text/plain"] = text
                bundle["image/png"] = base64.b64encode(png).decode("ascii")
                return bundle

        Previewed.__name__ = Previewed.__qualname__ = box_class.__name__
        _PREVIEW_CLASSES[box_class] = Previewed
    return _PREVIEW_CLASSES[box_class]


def _show_png(image_widget, data: bytes | None) -> None:
    """Show PNG bytes at their own pixel width (a flex box would otherwise stretch and blur them)."""
    image_widget.value = data or b""
    image_widget.width = str(int.from_bytes(data[16:20], "big")) if data else ""


def explorer(models: dict, images, labels, net=None):
    """The test-set explorer: a slider over ``images`` with every model's probabilities side by side,
    a layer dropdown for feature maps, and a misclassified-digit browser that jumps the slider."""
    import ipywidgets as w

    state = explorer_state(models, images, labels, net=net)
    slider = w.IntSlider(0, 0, len(state.images) - 1, description="test image",
                         continuous_update=False, layout=w.Layout(width="60%"))
    summary = w.HTML().add_class("microcnn-summary")
    table = w.HTML()
    bars, maps, grid = w.Image(format="png"), w.Image(format="png"), w.Image(format="png")
    layer = w.Dropdown(options=layer_choices(state.net), value=state.layer, description="layer")
    wrong_model = w.Dropdown(options=list(state.wrong), description="mistakes of")
    page = w.IntSlider(0, 0, 0, description="page")
    count = w.HTML()
    salient_model = w.Dropdown(options=list(state.models), description="saliency of")
    salient = w.Image(format="png")
    uploads = [w.FileUpload(accept=",".join(MODEL_SUFFIXES), description="model"),
               w.FileUpload(accept=".npz", description="data (.npz)")]
    status = w.HTML("A model (.safetensors, .raw, .onnx) or a data set (.npz with arrays images, labels)")

    shown: dict[str, Any] = {}  # what the view shows now, for the static preview

    def show_index(change=None):
        out = on_index_change(state, slider.value)
        summary.value = f"<b>{out['summary']}</b>"
        table.value = out["panel"].to_html(float_format="{:.4f}".format)
        _show_png(bars, out["probabilities_png"])
        _show_png(maps, out["feature_maps_png"])
        shown.update(summary=out["summary"], bars=out["probabilities_png"], maps=out["feature_maps_png"])
        _show_png(salient, on_saliency_change(state, slider.value, salient_model.value))

    def show_layer(change):
        shown["maps"] = on_layer_change(state, slider.value, change["new"])
        _show_png(maps, shown["maps"])

    # set while show_mistakes adjusts the page slider, whose change would re-enter it
    updating: list[bool] = []

    def show_mistakes(change=None):
        if updating:
            return
        updating.append(True)
        try:
            model = wrong_model.value
            last = page_count(len(state.wrong[model]), 12) - 1
            out = on_misclassified_change(state, model, min(page.value, last))
            page.max, page.value = last, min(page.value, last)
            _show_png(grid, out["png"])
            count.value = f"{out['count']} of {len(state.images)} misclassified"
            if out["first_index"] is not None and change is not None:
                slider.value = out["first_index"]
        finally:
            updating.clear()

    def show_upload(change):
        if not change["new"]:
            return
        file = change["new"][0]
        try:
            status.value = html.escape(on_upload(state, file["name"], file["content"]))
        except MicrocnnError as exc:  # the file's problem, said in the widget; the view stays as it was
            status.value = f"<span style='color:#b00020'>{html.escape(str(exc))}</span>"
            return
        slider.max = len(state.images) - 1
        layer.options, layer.value = layer_choices(state.net), state.layer
        wrong_model.options = salient_model.options = list(state.models)
        show_index()
        show_mistakes()

    slider.observe(show_index, "value")
    layer.observe(show_layer, "value")
    wrong_model.observe(show_mistakes, "value")
    page.observe(show_mistakes, "value")
    salient_model.observe(lambda change: show_index(), "value")
    for upload in uploads:
        upload.observe(show_upload, "value")
    show_index()
    show_mistakes()
    tabs = w.Tab([w.VBox([layer, maps]), w.VBox([w.HBox([wrong_model, page, count]), grid]),
                  w.VBox([salient_model, salient]), w.VBox([w.HBox(uploads), status])])
    for k, title in enumerate(("feature maps", "misclassified", "saliency", "load your own")):
        tabs.set_title(k, title)

    def preview():
        return (f"Explorer (static preview; interactive in Jupyter): {shown['summary']}; feature maps of "
                f"{state.layer}", stack_pngs([shown["bars"], shown["maps"]]))

    # flex-start: a stretched row would scale the bar chart to the table's height and blur it
    row = w.HBox([bars, table], layout=w.Layout(align_items="flex-start"))
    box = _previewed(w.VBox)([slider, summary, row, tabs])
    box.preview = preview
    return box


def asset(name: str) -> str:
    """A text file of microcnn/assets/: front-end code (canvas JavaScript, report CSS and HTML)."""
    from importlib.resources import files

    return files("microcnn").joinpath("assets", name).read_text(encoding="utf-8")


def _canvas_class():
    global _DrawingCanvas
    if _DrawingCanvas is None:
        import anywidget
        import traitlets

        class DrawingCanvas(anywidget.AnyWidget):
            """A mouse drawing surface; ``pixels`` holds its grey levels, row-major uint8."""

            _esm = asset("canvas.js")
            width = traitlets.Int(280).tag(sync=True)
            height = traitlets.Int(280).tag(sync=True)
            stroke_width = traitlets.Int(22).tag(sync=True)
            # The front end sends a DataView, which arrives as a memoryview: store plain bytes.
            pixels = traitlets.Bytes(b"").tag(sync=True, from_json=lambda v, _w: bytes(v or b""))

        _DrawingCanvas = DrawingCanvas
    return _DrawingCanvas


_DrawingCanvas = None


def drawing_pad(models: dict, size: int = 280, stroke_width: int = 22):
    """A canvas to draw a digit on with the mouse; every model's prediction updates while drawing.
    A 22 px pen on a 280 px canvas gives strokes as thick as MNIST's once scaled to 28x28."""
    import ipywidgets as w

    models = _check_models(models)
    canvas = _canvas_class()(width=size, height=size, stroke_width=stroke_width)
    text = w.HTML("Prediction: none (draw a digit)").add_class("microcnn-drawing-prediction")
    bars, seen = w.Image(format="png"), w.Image(format="png")

    def update(change):
        out = on_drawing_change(models, change["new"], canvas.width, canvas.height)
        text.value = out["text"]
        _show_png(bars, out["probabilities_png"])
        _show_png(seen, out["input_png"])

    def preview():
        pixels = canvas.pixels if len(canvas.pixels) == canvas.width * canvas.height else b""
        drawn = pixels_to_canvas(pixels, canvas.width, canvas.height) if pixels else \
            np.zeros((canvas.height, canvas.width), np.uint8)  # the canvas starts black
        return (f"Drawing pad (static preview; draw a digit in Jupyter): {text.value}",
                stack_pngs([gray_png(drawn), bars.value, seen.value]))

    canvas.observe(update, "pixels")
    box = _previewed(w.HBox)([canvas, w.VBox([text, bars, seen], layout=w.Layout(align_items="flex-start"))])
    box.preview = preview
    return box
