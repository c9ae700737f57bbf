"""Widget logic, tested as plain functions across their range (a notebook replay never moves a slider).

References are independent: a float64 NumPy softmax-regression stand-in model, hand-built expected
28x28 images for simple drawings, block means for integer rescaling, and a float64 NumPy conv1.
"""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.image import imread

import microcnn
from microcnn import widgets as W
from microcnn.datasets import load_mnist
from microcnn.errors import InputError, MicrocnnError


# ------------------------------------------------------------------------------------ fixtures
class SoftmaxRegression:
    """Stand-in model computed in float64 NumPy: probabilities = softmax(flat pixels @ w + b)."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.w, self.b = rng.normal(0, 0.3, (784, 10)), rng.normal(0, 1, 10)

    def predict(self, x):
        z = np.asarray(x, np.float64).reshape(len(x), -1) @ self.w + self.b
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def mnist():
    images, labels = load_mnist("test")
    return images[:200], labels[:200]


@pytest.fixture(scope="module")
def net():
    return microcnn.lenet(seed=3)


@pytest.fixture(scope="module")
def trained():
    return microcnn.lenet(weights="bundled")


def png_shape(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(data)).shape


# ------------------------------------------------------------------------------------ predictions
def test_prediction_panel_matches_each_model(mnist, net):
    images, _ = mnist
    a, b = SoftmaxRegression(1), SoftmaxRegression(2)
    panel = W.prediction_panel({"A": a, "FP32": net, "B": b}, images[5])
    assert list(panel.columns) == ["A", "FP32", "B"]
    assert panel.index.name == "Class" and list(panel.index) == list(range(10))
    np.testing.assert_allclose(panel["A"], a.predict(images[5:6])[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(panel["B"], b.predict(images[5:6])[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(panel["FP32"], net.predict(images[5:6])[0], rtol=0, atol=1e-7)
    np.testing.assert_allclose(panel.sum(), 1.0, atol=1e-5)
    # Every accepted image shape gives the same panel.
    for shaped in (images[5, 0], images[5], images[5:6]):
        pd.testing.assert_frame_equal(W.prediction_panel({"A": a, "FP32": net, "B": b}, shaped), panel)


def test_prediction_panel_refuses_bad_input(mnist):
    images, _ = mnist
    model = {"A": SoftmaxRegression(0)}
    with pytest.raises(InputError, match="one image"):
        W.prediction_panel(model, images[:2])
    with pytest.raises(InputError, match=r"\(N, 1, 28, 28\)"):
        W.prediction_panel(model, np.zeros((27, 28), np.float32))
    with pytest.raises(InputError, match="non-empty dict"):
        W.prediction_panel({}, images[0])
    with pytest.raises(InputError, match=r"models\['x'\].*predict"):
        W.prediction_panel({"x": object()}, images[0])

    class Wrong:
        def predict(self, x):
            return np.ones((len(x), 9)) / 9

    with pytest.raises(InputError, match=r"expected probabilities of shape \(1, 10\), found \(1, 9\)"):
        W.prediction_panel({"wrong": Wrong()}, images[0])


def test_prediction_summary_text():
    probs = np.full((10, 2), 0.02)
    probs[7, 0], probs[1, 1] = 0.82, 0.82
    panel = pd.DataFrame(probs, columns=["FP32", "INT4"], index=pd.RangeIndex(10, name="Class"))
    assert W.prediction_summary(panel, 7) == "label 7 | FP32: 7 (82.0%) | INT4: 1 (82.0%)"
    assert W.prediction_summary(panel) == "FP32: 7 (82.0%) | INT4: 1 (82.0%)"


def test_probability_figure_draws_every_probability(mnist):
    panel = W.prediction_panel({"A": SoftmaxRegression(1), "B": SoftmaxRegression(2)}, mnist[0][0])
    fig = W.probability_figure(panel, label=4)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "class" and ax.get_ylabel() == "probability"
    assert len(ax.containers) == 2
    for container, name in zip(ax.containers, panel.columns, strict=True):
        np.testing.assert_allclose([bar.get_height() for bar in container], panel[name])
        centres = [bar.get_x() + bar.get_width() / 2 for bar in container]
        np.testing.assert_allclose(np.round(centres), np.arange(10))  # grouped around each class
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"]
    assert ax.get_xticklabels()[4].get_fontweight() == "bold"
    assert len(png_shape(W.figure_png(fig))) == 3


# ------------------------------------------------------------------------------------ feature maps
@pytest.mark.parametrize("layer, max_maps", [("conv1", 16), ("conv2", 16), ("pool2", 3)])
def test_feature_map_axis_labels_clear_every_panel(mnist, net, layer, max_maps):
    """The maps' "x (px)" / "y (px)" labels, drawn, overlap no panel: the input image and the other
    maps (issue 16: "y (px)" ran into the input image)."""
    import io

    fig = W.feature_maps_figure(net, mnist[0][3], layer, max_maps=max_maps)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).print_png(io.BytesIO())  # lays the text out
    labelled = [ax for ax in fig.axes if ax.get_ylabel() == "y (px)"]  # (the colour bar's is "activation")
    assert len(labelled) == 1 and labelled[0].get_xlabel() == "x (px)"
    renderer = fig.canvas.get_renderer()
    for text in (labelled[0].yaxis.label, labelled[0].xaxis.label):
        box = text.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (text.get_text(), ax.get_title())


def test_feature_maps_show_the_layer_outputs(mnist, net):
    image = mnist[0][3]
    records = net.trace(image[None])
    # conv1 against an independent float64 reference (cross-correlation, padding 2).
    w = net[0].weight.data.astype(np.float64)
    b = net[0].bias.data.astype(np.float64)
    padded = np.pad(image[0].astype(np.float64), 2)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
    conv1 = np.einsum("ijkl,okl->oij", windows, w[:, 0]) + b[:, None, None]
    np.testing.assert_allclose(records[0].output[0], conv1, atol=1e-4)

    assert W.layer_choices(net) == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3",
                                    "relu3", "flatten", "fc1", "relu4", "fc2", "softmax"]
    for rec in records:
        fig = W.feature_maps_figure(net, image, rec.name, max_maps=8)
        out = rec.output[0]
        # the input image first, beside the maps
        assert fig.axes[0].get_title() == "input"
        np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(), image[0])
        if out.ndim == 3 and out.shape[1:] != (1, 1):
            maps = [im for ax in fig.axes[1:] for im in ax.get_images()]
            assert len(maps) == min(8, out.shape[0])
            for k, im in enumerate(maps):
                np.testing.assert_array_equal(np.asarray(im.get_array()), out[k])
            assert fig.axes[[ax.get_title() for ax in fig.axes].index("ch 0")].get_images()
            shown = out[:8]
            lo, hi = maps[0].get_clim()
            if shown.min() < 0 < shown.max():  # signed (conv outputs): diverging, centred at 0
                assert maps[0].get_cmap().name == "RdBu_r" and lo == -hi == -np.abs(shown).max()
            else:  # ReLU / pooling outputs: one-sided
                assert maps[0].get_cmap().name == "viridis" and (lo, hi) == (shown.min(), shown.max())
        else:
            ax = fig.axes[1]
            np.testing.assert_allclose([bar.get_height() for bar in ax.containers[0]], out.reshape(-1))
            assert ax.get_xlabel() == "unit" and ax.get_ylabel() == "activation"
        heading = fig.texts[0].get_text() if fig.texts else fig.axes[1].get_title()
        assert heading.startswith(f"{rec.name} ({rec.type}) output, shape {out.shape}")
    # A layer can be named by index too; unknown layers list the choices.
    by_index = W.feature_maps_figure(net, image, 3, max_maps=16)
    assert len([im for ax in by_index.axes for im in ax.get_images()]) == 16 + 1  # + the input
    with pytest.raises(InputError, match=r"expected one of \['conv1'.*found 'conv9'"):
        W.feature_maps_figure(net, image, "conv9")
    with pytest.raises(InputError, match="max_maps"):
        W.feature_maps_figure(net, image, "conv1", max_maps=0)


# ------------------------------------------------------------------------------------ misclassified
def test_misclassified_indices(mnist, net):
    images, labels = mnist
    model = SoftmaxRegression(4)
    expected = np.flatnonzero(model.predict(images).argmax(1) != labels)
    got = W.misclassified(model, images, labels)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(W.misclassified(net, images, labels),
                                  np.flatnonzero(net.predict(images).argmax(1) != labels))
    predicted = labels.copy()
    predicted[[0, 17, 199]] = (labels[[0, 17, 199]] + 1) % 10
    np.testing.assert_array_equal(W.misclassified(None, images, labels, predicted=predicted), [0, 17, 199])
    np.testing.assert_array_equal(W.misclassified(None, images, labels, predicted=labels), [])
    with pytest.raises(InputError, match="labels"):
        W.misclassified(model, images, labels[:-1])


def test_misclassified_figure_pages(mnist):
    images, labels = mnist
    predicted = (labels + 1) % 10
    indices = np.arange(0, 30, 2)  # 15 mistakes: pages of 12 and 3
    fig = W.misclassified_figure(images, labels, predicted, indices, page=1, per_page=12)
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == [f"#{i} {labels[i]}→{predicted[i]}" for i in (24, 26, 28)]
    np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(), images[24, 0])
    assert "page 2/2" in fig.texts[0].get_text()
    with pytest.raises(InputError, match=r"page: expected 0\.\.1, found 2"):
        W.misclassified_figure(images, labels, predicted, indices, page=2)
    empty = W.misclassified_figure(images, labels, predicted, [], page=0)
    assert not any(ax.get_images() for ax in empty.axes)


# ------------------------------------------------------------------------------------ drawings
def blank(size=200, dtype=np.uint8):
    return np.zeros((size, size), dtype)


def com(image):
    img = image.reshape(28, 28).astype(np.float64)
    ys, xs = np.mgrid[:28, :28]
    return (img * ys).sum() / img.sum(), (img * xs).sum() / img.sum()


def expected_field(block, top, left):
    out = np.zeros((28, 28), np.float32)
    out[top:top + block.shape[0], left:left + block.shape[1]] = block
    return out


@pytest.mark.parametrize("canvas", [
    blank(), blank(140) + 255, np.full((280, 280), 0.5), np.full((10, 10, 4), 0, np.uint8),
    np.random.default_rng(0).integers(0, 20, (200, 200)).astype(np.uint8),  # faint noise only
], ids=["black", "white", "grey", "transparent-rgba", "faint-noise"])
def test_empty_canvas_gives_none(canvas):
    assert W.preprocess_drawing(canvas) is None


def test_single_pixel_dot_becomes_centred_20px_square():
    canvas = blank()
    canvas[50, 120] = 255
    out = W.preprocess_drawing(canvas)
    assert out.shape == (1, 1, 28, 28) and out.dtype == np.float32 and out.flags.c_contiguous
    # 1x1 box -> 20x20 of full ink, centre of mass 9.5 -> offset floor(14 - 9.5 + 0.5) = 5.
    np.testing.assert_array_equal(out[0, 0], expected_field(np.ones((20, 20)), 5, 5))


def test_round_dot_is_a_centred_disc():
    ys, xs = np.mgrid[:280, :280]
    canvas = (((ys - 40) ** 2 + (xs - 230) ** 2) <= 12 ** 2).astype(np.uint8) * 255
    out = W.preprocess_drawing(canvas)[0, 0]
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert len(rows) == len(cols) == 20
    np.testing.assert_allclose(com(out), (14, 14), atol=0.5)
    np.testing.assert_allclose(out, out.T, atol=1e-6)  # a disc stays symmetric
    assert out.max() == pytest.approx(1.0)


def test_rectangle_keeps_aspect_ratio_and_position_exactly():
    canvas = blank(200)
    canvas[30:130, 70:110] = 255  # 100 tall, 40 wide -> 20 x 8
    out = W.preprocess_drawing(canvas)[0, 0]
    # centre of mass (9.5, 3.5) -> top floor(14 - 9.5 + 0.5) = 5, left floor(14 - 3.5 + 0.5) = 11.
    np.testing.assert_array_equal(out, expected_field(np.ones((20, 8)), 5, 11))


def test_full_canvas_drawing_is_block_averaged():
    canvas = blank(200)
    canvas[:20], canvas[-20:], canvas[:, :20], canvas[:, -20:] = 255, 255, 255, 255  # a frame edge to edge
    canvas[90:110, :] = 255
    out = W.preprocess_drawing(canvas)[0, 0]
    reference = canvas.reshape(20, 10, 20, 10).mean(axis=(1, 3)) / 255.0  # 200 -> 20 by block means
    np.testing.assert_allclose(out, expected_field(reference, 5, 5), atol=1e-6)


def test_strokes_at_the_corners_span_the_box():
    canvas = blank(280)
    canvas[:30, :30] = 255  # touching the top-left corner
    canvas[-30:, -30:] = 255  # and the bottom-right one
    out = W.preprocess_drawing(canvas)[0, 0]
    ink = canvas.reshape(20, 14, 20, 14).mean(axis=(1, 3)) / 255.0
    np.testing.assert_allclose(out, expected_field(ink, 5, 5), atol=1e-6)
    # A lone blob in a corner ends up where the same blob drawn mid-canvas does.
    corner, middle = blank(280), blank(280)
    corner[-25:, :35] = 255
    middle[120:145, 100:135] = 255
    np.testing.assert_array_equal(W.preprocess_drawing(corner), W.preprocess_drawing(middle))


def seven(size):
    """A thick '7' drawn on a 140 px grid, scaled to ``size`` px by whole pixels (nearest)."""
    base = blank(140)
    base[20:34, 30:110] = 255
    for y in range(34, 125):
        x = int(110 - (y - 34) * 0.45)
        base[y, x - 7:x + 7] = 255
    idx = np.arange(size) * 140 // size
    return base[np.ix_(idx, idx)]


@pytest.mark.parametrize("size", [140, 200, 280])
def test_canvas_size_does_not_matter(size):
    ref = W.preprocess_drawing(seven(140))
    out = W.preprocess_drawing(seven(size))
    # 140 and 280 are exact (2x pixel replication averages back); 200 resamples by 10/7 and may move
    # stroke edges by a fraction of a pixel.
    np.testing.assert_allclose(out, ref, atol=1e-6 if size != 200 else 0.35)
    np.testing.assert_allclose(com(out), com(ref), atol=0.15)


def test_polarities_and_colour_formats_agree():
    light = seven(200)
    ref = W.preprocess_drawing(light)
    dark = 255 - light  # black ink on white paper
    rgb = np.repeat(dark[..., None], 3, axis=2)
    opaque = np.dstack([rgb, np.full_like(dark, 255)])
    ink_alpha = np.dstack([np.zeros((200, 200, 3), np.uint8), light])  # black strokes, transparent paper
    white_alpha = np.dstack([np.full((200, 200, 3), 255, np.uint8), light])  # white strokes, transparent
    for variant in (dark, rgb, opaque, ink_alpha, white_alpha, light[..., None], light / 255.0,
                    (dark / 255.0).astype(np.float32)):
        np.testing.assert_allclose(W.preprocess_drawing(variant), ref, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(60, 240), st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.integers(1, 30)),
                                      min_size=1, max_size=6), st.booleans())
def test_random_drawings_have_mnist_geometry(size, dots, invert):
    ys, xs = np.mgrid[:size, :size]
    canvas = np.zeros((size, size))
    for fy, fx, r in dots:
        canvas = np.maximum(canvas, ((ys - fy * (size - 1)) ** 2 + (xs - fx * (size - 1)) ** 2 <= r * r))
    canvas = (canvas * 255).astype(np.uint8)
    if invert:
        canvas = 255 - canvas
    if canvas.mean() > 127 if not invert else canvas.mean() < 128:
        return  # ink covers most of the canvas: outside the documented assumption
    out = W.preprocess_drawing(canvas)
    assert out.dtype == np.float32 and out.shape == (1, 1, 28, 28)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.0
    img = out[0, 0]
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20  # the ink box's longer side is 20 px
    cy, cx = com(img)
    # Centred to within half a pixel (plus float32 rounding), unless the shift was clamped at the edge.
    assert abs(cy - 14) <= 0.5 + 1e-5 or rows[0] == 0 or rows[-1] == 27
    assert abs(cx - 14) <= 0.5 + 1e-5 or cols[0] == 0 or cols[-1] == 27


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 28, 28, 1), np.uint8), "expected"),
    (np.zeros((28, 28, 2), np.uint8), r"\(H, W, 4\) RGBA, found shape \(28, 28, 2\)"),
    (np.zeros((0, 5)), "found shape"),
    (np.zeros((28, 28), np.int32), "dtype int32"),
    (np.full((28, 28), 1.5), r"\[0, 1\]"),
    (np.full((28, 28), np.nan), "finite"),
])
def test_bad_canvases_are_refused(bad, match):
    with pytest.raises(InputError, match=match):
        W.preprocess_drawing(bad)


def test_pixels_to_canvas():
    data = bytes(range(6))
    np.testing.assert_array_equal(W.pixels_to_canvas(data, 3, 2), [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(InputError, match="expected 3x3 = 9 bytes, found 6"):
        W.pixels_to_canvas(data, 3, 3)


def upscale(image, size):
    idx = np.arange(size) * 28 // size  # nearest-neighbour, independent of the module's resampling
    return (image[0][np.ix_(idx, idx)] * 255).round().astype(np.uint8)


def test_mnist_digits_survive_canvas_round_trip(trained):
    images, labels = load_mnist("test")
    images = images[:100]
    before = trained.predict(images).argmax(1)
    for size in (140, 200, 280):
        for polarity in ("light", "dark"):
            canvases = [upscale(im, size) for im in images]
            if polarity == "dark":
                canvases = [255 - c for c in canvases]
            back = np.concatenate([W.preprocess_drawing(c) for c in canvases])
            after = trained.predict(back).argmax(1)
            error = np.abs(back - images).mean(axis=(1, 2, 3))
            if size % 28 == 0:
                # MNIST was made by this very procedure: whole-pixel enlargements come back unchanged
                # (up to the uint8 rounding of the canvas).
                assert error.max() < 2e-3
                np.testing.assert_array_equal(after, before)
            else:
                # 200 px is 7.14x: resampling moves stroke edges by fractions of a pixel.
                assert np.median(error) < 0.01
                assert (after == before).mean() >= 0.98, f"{size} px {polarity}: {(after != before).sum()}"


def test_hand_drawn_shapes_are_read_as_digits(trained):
    ys, xs = np.mgrid[:280, :280]
    one = ((abs(xs - 150) <= 11) & (ys >= 40) & (ys <= 240)).astype(np.uint8) * 255
    ring = np.abs(np.hypot(ys - 140, (xs - 140) * 1.3) - 85)
    zero = (ring <= 11).astype(np.uint8) * 255
    for canvas, digit in ((one, 1), (zero, 0), (seven(280), 7)):
        assert trained.predict(W.preprocess_drawing(canvas)).argmax() == digit


# ------------------------------------------------------------------------------------ callbacks
@pytest.fixture(scope="module")
def state(mnist, net):
    images, labels = mnist
    return W.explorer_state({"FP32": net, "REG": SoftmaxRegression(7)}, images, labels)


def test_explorer_state_predicts_once(state, mnist, net):
    images, labels = mnist
    np.testing.assert_array_equal(state.predicted["FP32"], net.predict(images).argmax(1))
    np.testing.assert_array_equal(state.wrong["REG"],
                                  np.flatnonzero(SoftmaxRegression(7).predict(images).argmax(1) != labels))
    assert state.net is net and state.layer == "conv1"
    with pytest.raises(InputError, match="trace"):
        W.explorer_state({"REG": SoftmaxRegression(7)}, images, labels)
    with pytest.raises(InputError, match=r"labels: expected shape \(200,\)"):
        W.explorer_state({"FP32": net}, images, labels[:10])


@pytest.mark.parametrize("index", [0, 117, 199])
def test_on_index_change(state, mnist, index):
    images, labels = mnist
    out = W.on_index_change(state, index)
    pd.testing.assert_frame_equal(out["panel"], W.prediction_panel(state.models, images[index]))
    assert out["summary"] == f"test image {index}: " + W.prediction_summary(out["panel"], labels[index])
    assert out["summary"].startswith(f"test image {index}: label {labels[index]} | FP32: ")
    assert png_shape(out["probabilities_png"])[:2] == (208, 512)  # 6.4 x 2.6 in at 80 dpi
    assert len(png_shape(out["feature_maps_png"])) == 3


@pytest.mark.parametrize("index", [-1, 200, 3.0, None])
def test_on_index_change_refuses_out_of_range(state, index):
    with pytest.raises(InputError, match=r"index: expected an int in 0\.\.199"):
        W.on_index_change(state, index)


def test_on_layer_change_covers_every_layer(state):
    try:
        for layer in W.layer_choices(state.net):
            assert len(png_shape(W.on_layer_change(state, 10, layer))) == 3
            assert state.layer == layer
        with pytest.raises(InputError, match="layer"):
            W.on_layer_change(state, 10, "nope")
        assert state.layer == "softmax"  # a refused layer leaves the choice alone
    finally:
        state.layer = "conv1"


def test_on_misclassified_change_every_page(state, mnist):
    images, labels = mnist
    wrong = np.sort(np.random.default_rng(0).choice(len(labels), 27, replace=False))
    predicted = labels.copy()
    predicted[wrong] = (labels[wrong] + 3) % 10
    mistakes = W.ExplorerState(state.models, images, labels, state.net, predicted={"P": predicted},
                               wrong={"P": W.misclassified(None, images, labels, predicted=predicted)})
    for page in range(3):  # 12 + 12 + 3
        out = W.on_misclassified_change(mistakes, "P", page)
        assert (out["pages"], out["count"], out["first_index"]) == (3, 27, wrong[page * 12])
        assert len(png_shape(out["png"])) == 3
    with pytest.raises(InputError, match=r"page: expected 0\.\.2, found 3"):
        W.on_misclassified_change(mistakes, "P", 3)
    with pytest.raises(InputError, match=r"model: expected one of \['FP32', 'REG'\]"):
        W.on_misclassified_change(state, "INT2", 0)


def test_page_count():
    assert [W.page_count(n, 12) for n in (0, 1, 12, 13, 24, 25)] == [1, 1, 1, 2, 2, 3]
    with pytest.raises(InputError, match="per_page"):
        W.page_count(5, 0)


def test_on_misclassified_change_without_mistakes(mnist, net):
    images, labels = mnist
    perfect = W.ExplorerState({"P": net}, images, labels, net, predicted={"P": labels},
                              wrong={"P": np.array([], np.int64)})
    out = W.on_misclassified_change(perfect, "P", 0)
    assert (out["pages"], out["count"], out["first_index"]) == (1, 0, None)


def test_on_drawing_change(mnist):
    models = {"A": SoftmaxRegression(1), "B": SoftmaxRegression(2)}
    for pixels in (b"", bytes(280 * 280)):
        out = W.on_drawing_change(models, pixels, 280, 280)
        assert out["text"] == "Prediction: none (draw a digit)" and out["panel"] is None
    canvas = seven(280)
    out = W.on_drawing_change(models, canvas.tobytes(), 280, 280)
    np.testing.assert_array_equal(out["image"], W.preprocess_drawing(canvas))
    expected = W.prediction_panel(models, out["image"])
    pd.testing.assert_frame_equal(out["panel"], expected)
    k = int(expected["A"].to_numpy().argmax())
    assert out["text"] == f"Prediction: {k} ({W.prediction_summary(expected)})"
    assert len(png_shape(out["input_png"])) == 3 and len(png_shape(out["probabilities_png"])) == 3
    with pytest.raises(InputError, match="bytes"):
        W.on_drawing_change(models, bytes(10), 280, 280)


# ------------------------------------------------------------------------------------ widget glue
class Oracle:
    """Knows the label of every image it was given: never wrong on them."""

    def __init__(self, images, labels):
        self.known = {im.tobytes(): int(k) for im, k in zip(images, labels, strict=True)}

    def predict(self, x):
        return np.eye(10)[[self.known[im.tobytes()] for im in np.asarray(x, np.float32)]]


def test_explorer_widgets_follow_the_slider(mnist, net):
    images, labels = mnist
    ui = W.explorer({"FP32": net, "ORACLE": Oracle(images[:50], labels[:50])}, images[:50], labels[:50])
    slider, summary, (bars, table), tabs = ui.children[0], ui.children[1], ui.children[2].children, \
        ui.children[3]
    assert (slider.min, slider.max) == (0, 49)
    assert "test image 0:" in summary.value
    slider.value = 42
    assert f"test image 42: label {labels[42]}" in summary.value
    assert "<table" in table.value
    assert int(bars.width) == png_shape(bars.value)[1]  # shown at its own pixel width
    layer = tabs.children[0].children[0]
    before = tabs.children[0].children[1].value
    layer.value = "pool2"
    assert tabs.children[0].children[1].value != before
    model, page, count = tabs.children[1].children[0].children
    wrong = W.misclassified(net, images[:50], labels[:50])
    assert count.value.startswith(f"{len(wrong)} of 50 misclassified")
    assert len(wrong) > 24 and page.max == W.page_count(len(wrong), 12) - 1
    page.value = 2
    assert slider.value == wrong[24]  # a page jumps the slider to its first digit
    model.value = "ORACLE"  # no mistakes: one empty page, and the page slider follows
    assert (page.max, page.value) == (0, 0) and count.value.startswith("0 of 50")
    assert slider.value == wrong[24]


def test_drawing_pad_predicts_when_pixels_change():
    model = SoftmaxRegression(5)
    pad = W.drawing_pad({"A": model}, size=140)
    canvas, (text, bars, seen) = pad.children[0], pad.children[1].children
    assert (canvas.width, canvas.height) == (140, 140)
    assert text.value == "Prediction: none (draw a digit)"
    canvas.pixels = seven(140).tobytes()
    k = int(model.predict(W.preprocess_drawing(seven(140))).argmax())
    assert text.value.startswith(f"Prediction: {k} (A: {k} ")
    assert png_shape(bars.value) and png_shape(seen.value)
    canvas.pixels = bytes(140 * 140)
    assert text.value == "Prediction: none (draw a digit)" and bars.value == b""


# ------------------------------------------------------------------------------------ static previews
def _display_bundle(widget):
    """What Jupyter stores for the widget's output: IPython's own formatter, as the kernel runs it."""
    import base64

    from IPython.core.formatters import DisplayFormatter

    data, _ = DisplayFormatter().format(widget)
    return data, imread(io.BytesIO(base64.b64decode(data["image/png"])))


def _rgba(data: bytes) -> np.ndarray:
    a = imread(io.BytesIO(data))
    return a if a.shape[2] == 4 else np.concatenate([a, np.ones(a.shape[:2] + (1,), a.dtype)], axis=2)


def test_stack_pngs_places_images_top_down_on_white():
    from matplotlib.image import imsave

    def png(array):
        buf = io.BytesIO()
        imsave(buf, array, format="png")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    top = rng.random((3, 5, 4)).astype(np.float32)
    top[..., 3] = 1.0
    bottom = rng.random((4, 2, 3)).astype(np.float32)  # RGB, narrower
    out = imread(io.BytesIO(W.stack_pngs([png(top), b"", png(bottom), None])))
    assert out.shape == (7, 5, 4)
    np.testing.assert_allclose(out[:3], top, atol=1 / 255)
    np.testing.assert_allclose(out[3:, :2, :3], bottom, atol=1 / 255)
    assert (out[3:, 2:] == 1.0).all()  # padding is opaque white
    with pytest.raises(InputError, match="at least one PNG"):
        W.stack_pngs([b"", None])


def test_explorer_output_carries_a_preview_of_the_current_view(mnist, net):
    images, labels = mnist
    ui = W.explorer({"FP32": net}, images[:50], labels[:50])
    data, preview = _display_bundle(ui)
    assert "application/vnd.jupyter.widget-view+json" in data  # still the live widget in Jupyter
    assert data["text/plain"].startswith("Explorer (static preview")
    text = data["text/plain"]
    assert f"test image 0: label {labels[0]}" in text and "feature maps of conv1" in text
    slider, bars = ui.children[0], ui.children[2].children[0]
    maps_tab = ui.children[3].children[0]
    slider.value = 42
    maps_tab.children[0].value = "pool2"
    data, preview = _display_bundle(ui)  # taken when displayed: the view as it is now
    assert f"test image 42: label {labels[42]}" in data["text/plain"] and "of pool2" in data["text/plain"]
    shown_bars, shown_maps = _rgba(bars.value), _rgba(maps_tab.children[1].value)
    assert preview.shape[0] == shown_bars.shape[0] + shown_maps.shape[0]
    np.testing.assert_allclose(preview[:shown_bars.shape[0], :shown_bars.shape[1]], shown_bars, atol=1 / 255)
    np.testing.assert_allclose(preview[shown_bars.shape[0]:, :shown_maps.shape[1]], shown_maps, atol=1 / 255)


def test_drawing_pad_output_carries_a_preview_of_the_canvas_and_prediction():
    model = SoftmaxRegression(5)
    pad = W.drawing_pad({"A": model}, size=140)
    data, preview = _display_bundle(pad)
    assert data["text/plain"] == "Drawing pad (static preview; draw a digit in Jupyter): Prediction: none " \
                                 "(draw a digit)"
    assert preview.shape[:2] == (140, 140) and (preview[..., :3] == 0).all()  # the empty black canvas
    canvas, (text, bars, seen) = pad.children[0], pad.children[1].children
    canvas.pixels = seven(140).tobytes()
    data, preview = _display_bundle(pad)
    assert data["text/plain"].endswith(text.value) and text.value.startswith("Prediction: ")
    assert preview.shape[0] == 140 + _rgba(bars.value).shape[0] + _rgba(seen.value).shape[0]
    np.testing.assert_allclose(preview[:140, :140, 0], seven(140) / 255, atol=1 / 255)


# ------------------------------------------------------------------------------------ logits, saliency
@pytest.fixture(scope="module")
def int8(trained):
    from microcnn.bench import build_precision
    from microcnn.quant import calibrate

    train, _ = load_mnist("train")
    return build_precision(trained, "int8", calibrate(trained, train[:100], method="mse", progress=False))


def test_logits_panel_beside_probabilities(mnist, trained, int8):
    image = mnist[0][5]
    models = {"FP32": trained, "INT8": int8}
    logits = W.prediction_panel(models, image, scores="logits")
    for name, model in models.items():
        np.testing.assert_array_equal(logits[name], model.logits(image[None])[0].astype(np.float64))
    # softmax of the logits is the probability panel (independent float64 softmax)
    z = logits.to_numpy()
    e = np.exp(z - z.max(axis=0))
    np.testing.assert_allclose(e / e.sum(axis=0), W.prediction_panel(models, image).to_numpy(), atol=1e-6)
    fig = W.probability_figure(W.prediction_panel(models, image), label=3, logits=logits)
    ax_p, ax_l = fig.axes
    assert ax_p.get_ylabel() == "probability" and ax_l.get_ylabel() == "logit (before softmax)"
    heights = [b.get_height() for c in ax_l.containers for b in c]
    np.testing.assert_array_equal(heights, np.concatenate([logits["FP32"], logits["INT8"]]))
    with pytest.raises(InputError, match="scores"):
        W.prediction_panel(models, image, scores="odds")
    with pytest.raises(InputError, match=r"\.logits"):
        W.prediction_panel({"LR": SoftmaxRegression(0)}, image, scores="logits")


def test_gradient_saliency_matches_finite_differences(mnist, trained):
    x = mnist[0][:1]
    before = [None if p.grad is None else p.grad.copy() for p in trained.parameters()]
    sal, method = W.saliency(trained, x, target=7)
    assert method == "gradient" and sal.shape == (28, 28)
    # directional derivative of logit 7 along a random direction, central differences (float32 network:
    # h = 1e-2 keeps rounding noise ~1e-4 below the 5 % tolerance)
    d = np.random.default_rng(0).normal(size=(28, 28)).astype(np.float32)
    h = 1e-2
    fd = (trained.logits(x + h * d)[0, 7].astype(np.float64) - trained.logits(x - h * d)[0, 7]) / (2 * h)
    assert (sal * d).sum() == pytest.approx(fd, rel=0.05)
    after = [p.grad for p in trained.parameters()]
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    fig = W.saliency_figure(x, sal, method)
    art = fig.axes[1].get_images()[0]
    lo, hi = art.get_clim()
    assert art.get_cmap().name == "RdBu_r" and lo == -hi == -np.abs(sal).max()  # centred at zero
    with pytest.raises(InputError, match="target"):
        W.saliency(trained, x, target=10)


def test_occlusion_saliency_of_a_quantized_model(mnist, int8):
    x = mnist[0][:1]
    sal, method = W.saliency(int8, x)
    target = int(int8.predict(x).argmax())
    assert method == "occlusion" and sal.shape == (28, 28)
    p = W.OCCLUSION_PATCH
    base = int8.logits(x)[0, target]
    for i, j in ((0, 0), (3, 4), (6, 6)):  # patches: each pixel holds its patch's drop / patch area
        occluded = x.copy()
        occluded[0, 0, i * p:(i + 1) * p, j * p:(j + 1) * p] = 0
        drop = (base - int8.logits(occluded)[0, target]) / p ** 2
        np.testing.assert_allclose(sal[i * p:(i + 1) * p, j * p:(j + 1) * p], drop, rtol=1e-12)
    assert sal[:p, :p].max() == 0  # a blank corner: occluding it changes nothing


# ------------------------------------------------------------------------------------ uploads
DATA = Path(microcnn.__file__).resolve().parent.parent / "data"


@pytest.mark.parametrize("name", ["lenet.safetensors", "lenet.raw"])
def test_uploaded_model_bytes_load_like_the_file(mnist, trained, name):
    model = W.load_model_bytes(name, (DATA / name).read_bytes())
    np.testing.assert_array_equal(model.predict(mnist[0][:20]), trained.predict(mnist[0][:20]))


@pytest.mark.parametrize("name, data", [("lenet.raw", b"\0" * 100), ("lenet.safetensors", b"PK\3\4junk"),
                                        ("lenet.safetensors", b"")])
def test_bad_uploaded_model_gets_the_files_error_message(tmp_path, name, data):
    from microcnn.resolve import load_model_spec

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(MicrocnnError) as on_disk:
        load_model_spec(str(path))
    with pytest.raises(MicrocnnError) as uploaded:
        W.load_model_bytes(name, data)
    assert type(uploaded.value) is type(on_disk.value)
    assert str(uploaded.value) == str(on_disk.value).replace(str(path), name)
    with pytest.raises(InputError, match=r"weights.txt: expected a model file ending in \.safetensors"):
        W.load_model_bytes("weights.txt", b"1")


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_uploaded_dataset(mnist):
    pixels = (mnist[0][:30, 0] * 255).round().astype(np.uint8)
    images, labels = W.load_dataset_bytes("d.npz", npz_bytes(images=pixels, labels=mnist[1][:30]))
    np.testing.assert_array_equal(images, pixels[:, None] / np.float32(255))
    np.testing.assert_array_equal(labels, mnist[1][:30])
    for data, match in [
        (b"not a zip", r"d.npz: expected an .npz archive"),
        (npz_bytes(images=pixels), r"expected arrays 'images' and 'labels', found \['images'\]"),
        (npz_bytes(images=pixels, labels=np.arange(30) % 12), "labels: expected 30 integer classes 0..9"),
        (npz_bytes(images=pixels[:, :20], labels=mnist[1][:30]), "d.npz: images"),
        (npz_bytes(images=np.array([object()] * 2), labels=np.zeros(2, int)), "could not read|pickle"),
    ]:
        with pytest.raises(InputError, match=match):
            W.load_dataset_bytes("d.npz", data)


STAMP = __import__("datetime").datetime(2026, 12, 7, tzinfo=__import__("datetime").timezone.utc)


def test_explorer_loads_an_uploaded_model_and_dataset(mnist, net, trained):
    images, labels = mnist
    ui = W.explorer({"FP32": net}, images[:50], labels[:50])
    slider, summary, tabs = ui.children[0], ui.children[1], ui.children[3]
    (model_upload, data_upload), status = tabs.children[3].children[0].children, tabs.children[3].children[1]
    salient_model, salient = tabs.children[2].children
    assert png_shape(salient.value)
    model_upload.value = ({"name": "lenet.safetensors", "type": "", "size": 0, "last_modified": STAMP,
                           "content": memoryview((DATA / "lenet.safetensors").read_bytes())},)
    wrong = W.misclassified(trained, images[:50], labels[:50])
    assert status.value == f"loaded model lenet.safetensors: {len(wrong)} of 50 images misclassified"
    assert "lenet.safetensors: " in summary.value
    assert list(salient_model.options) == ["FP32", "lenet.safetensors"]
    before = salient.value
    salient_model.value = "lenet.safetensors"
    assert salient.value != before
    pixels = (images[100:130, 0] * 255).round().astype(np.uint8)
    data_upload.value = ({"name": "mine.npz", "type": "", "size": 0, "last_modified": STAMP,
                          "content": memoryview(npz_bytes(images=pixels, labels=labels[100:130]))},)
    assert status.value == "loaded data set mine.npz: 30 images" and slider.max == 29
    slider.value = 29
    assert f"test image 29: label {labels[129]}" in summary.value
    data_upload.value = ({"name": "bad.npz", "type": "", "size": 0, "last_modified": STAMP,
                          "content": memoryview(b"junk")},)
    assert "bad.npz: expected an .npz archive" in status.value and slider.max == 29  # unchanged
