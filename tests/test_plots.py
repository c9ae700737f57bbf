"""microcnn.plots: every figure draws exactly its table's data, with labelled axes.

The references are the tables themselves (and, for histograms, np.histogram of the raw values): the
tests read the data back out of the matplotlib artists and compare.
"""

import numpy as np
import pandas as pd
import pytest
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle, StepPatch

import microcnn
from microcnn import analysis as A
from microcnn import plots as P
from microcnn.errors import InputError
from microcnn.quant import MinMaxObserver, MSEObserver, calibrate, layer_error_table, quantize


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]


def assert_labelled(fig):
    for ax in visible_axes(fig):
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), ax.get_title()


def bar_heights(ax):
    return np.array([p.get_height() for p in ax.patches if isinstance(p, Rectangle)], float)


def vertical_lines(ax):
    """x of every axvline (a Line2D whose two x values are equal, spanning the axes)."""
    return [line.get_xdata()[0] for line in ax.get_lines()
            if isinstance(line, Line2D) and len(line.get_xdata()) == 2
            and line.get_xdata()[0] == line.get_xdata()[1]]


# ------------------------------------------------------------------------------ digits
def test_digit_grid_shows_each_image_with_its_title():
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 28, 28), dtype=np.float32)
    labels, predicted = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 0, 4, 9])
    fig = P.digit_grid(images, labels, predicted, ncols=3, title="five digits")
    axes = fig.axes
    assert len(axes) == 6  # 2 x 3 grid, last cell empty
    for i, ax in enumerate(axes[:5]):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), images[i, 0])
        assert ax.get_title() == f"{labels[i]} → {predicted[i]}"
        assert ax.title.get_color() == ("black" if labels[i] == predicted[i] else "red")
    assert not axes[5].get_images()
    assert fig._suptitle.get_text() == "five digits"
    only_pred = P.digit_grid(images[:2, 0], predicted=predicted[:2])
    assert [ax.get_title() for ax in only_pred.axes] == ["pred 1", "pred 2"]
    assert [ax.get_title() for ax in P.digit_grid(images[:2]).axes] == ["", ""]


def test_digit_grid_refuses_bad_input():
    with pytest.raises(InputError, match="images"):
        P.digit_grid(np.zeros((28, 28)))
    with pytest.raises(InputError, match="labels"):
        P.digit_grid(np.zeros((3, 28, 28)), labels=[1, 2])


# ------------------------------------------------------------------------------ histograms
def test_histogram_counts_rebins_the_observers_histogram():
    rng = np.random.default_rng(1)
    values = np.concatenate([np.zeros(500), rng.gamma(2.0, 1.5, 5000)]).astype(np.float32)
    obs = MSEObserver("t", bins=1024)
    for chunk in np.array_split(values, 7):
        obs.observe(chunk)
    edges, counts = P.histogram_counts(obs, bins=30)
    np.testing.assert_allclose(edges, np.linspace(values.min(), values.max(), 31))
    assert counts.sum() == values.size
    reference, _ = np.histogram(values, edges)
    # The observer only knows values to within one of its fine bins: counts may move across a display
    # edge only for values that close to it.
    near_edge = sum(int((np.abs(values - e) <= 2 * obs.bin_width).sum()) for e in edges[1:-1])
    assert np.abs(counts - reference).sum() <= 2 * near_edge
    assert counts[0] >= 500  # the zeros
    with pytest.raises(InputError, match="no histogram"):
        mm = MinMaxObserver("t")
        mm.observe(values)
        P.histogram_counts(mm)


@pytest.fixture(scope="module")
def calibrations(mnist_train):
    net = microcnn.lenet(weights="bundled")
    return A.calibrate_methods(net, mnist_train[0][:200], methods=("minmax", "mse", "entropy"), samples=30)


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_histograms_mark_every_methods_range(calibrations, bits):
    tensors = ["input", "pool1", "pool2", "relu4"]
    fig = P.activation_histograms(calibrations, tensors, bits=bits, bins=40, ncols=3)
    ranges = A.calibration_ranges(calibrations, bits, tensors)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == tensors
    assert_labelled(fig)
    for ax, name in zip(axes, tensors, strict=True):
        assert ax.get_yscale() == "log"
        steps = [p for p in ax.patches if isinstance(p, StepPatch)]
        values, edges, _ = steps[0].get_data()
        ref_edges, ref_counts = P.histogram_counts(calibrations["mse"].observer(name), 40)
        np.testing.assert_array_equal(values, ref_counts)
        np.testing.assert_array_equal(edges, ref_edges)
        part = ranges[ranges["Tensor"] == name]
        expected = [v for lo, hi in zip(part["Range Lo"], part["Range Hi"], strict=True) for v in (lo, hi)]
        assert vertical_lines(ax) == expected
    assert not fig.axes[-1].axison  # 4 panels in a 2x3 grid: the rest are blank


def test_activation_histograms_need_a_histogram_observer(mnist_train):
    net = microcnn.lenet(weights="bundled")
    cals = A.calibrate_methods(net, mnist_train[0][:50], methods=("minmax",), samples=20)
    with pytest.raises(InputError, match="histograms"):
        P.activation_histograms(cals, ["pool1"])


# ------------------------------------------------------------------------------ calibration sweep
@pytest.fixture
def sweep():
    """Three seeds per (method, size, precision), errors out of 10,000; entropy fails once at 10 images."""
    rows = []
    for i, m in enumerate(("minmax", "mse", "entropy")):
        for n in (10, 100, 1000):
            for p in ("INT8", "INT4"):
                for seed in (0, 1, 2):
                    errors = 70 + 5 * i + (10 if p == "INT4" else 0) + 3 * seed + n // 100
                    if (m, n, p, seed) == ("entropy", 10, "INT4", 1):
                        errors = 8990
                    rows.append((m, n, p, seed, 100 * (1 - errors / 10000), errors, 10000))
    return pd.DataFrame(rows, columns=A.SWEEP_COLUMNS)


def spread(sweep, **where):
    part = sweep
    for column, value in where.items():
        part = part[part[column] == value]
    return np.median(part["Errors"]), part["Errors"].min(), part["Errors"].max()


def test_calibration_sweep_figure_draws_error_counts_with_seed_spread(sweep):
    fig = P.calibration_sweep_figure(sweep, fp32_accuracy=0.993, limit=200)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["INT8", "INT4"]
    assert_labelled(fig)
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
        assert "misclassified" in ax.get_ylabel()
        fp32 = [line for line in ax.get_lines() if line.get_label() == "FP32"]
        assert fp32[0].get_ydata()[0] == 70  # 10,000 x (1 - 0.993)
        for container in ax.containers:  # one errorbar per method: median, min-max
            method = container.get_label()
            line, (bars,) = container.lines[0], container.lines[2]
            x = line.get_xdata()
            for k, n in enumerate((10, 100, 1000)):
                med, lo, hi = spread(sweep, Method=method, Precision=ax.get_title(),
                                     **{"Calibration Images": n})
                assert x[k] == pytest.approx(n, rel=0.1)  # methods side by side around n
                assert line.get_ydata()[k] == med
                np.testing.assert_allclose(bars.get_segments()[k][:, 1], [lo, hi])
    # the failed run is off the axis: written at the top edge with its count
    (note,) = axes[1].texts
    assert note.get_text() == "entropy: 8990" and axes[1].get_ylim() == (0, 200)
    assert not axes[0].texts and axes[0].get_ylim()[1] < 200  # nothing off scale: the axis fits the data
    with pytest.raises(InputError, match="columns"):
        P.calibration_sweep_figure(sweep.drop(columns="Errors"))


def test_method_comparison_figure_bars(sweep):
    fig = P.method_comparison_figure(sweep, samples=100, fp32_accuracy=0.993)
    ax = visible_axes(fig)[0]
    assert_labelled(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["minmax", "mse", "entropy"]
    expected = [spread(sweep, Method=m, Precision=p, **{"Calibration Images": 100})
                for p in ("INT8", "INT4") for m in ("minmax", "mse", "entropy")]
    np.testing.assert_array_equal(bar_heights(ax), [e[0] for e in expected])
    segments = [seg for c in ax.containers if hasattr(c, "lines") and c.lines[2]
                for seg in c.lines[2][0].get_segments()]
    np.testing.assert_allclose([seg[:, 1] for seg in segments], [e[1:] for e in expected])
    assert ax.get_ylim()[0] == 0  # counts from zero: no truncated axis
    assert "1000" in P.method_comparison_figure(sweep).axes[0].get_title()  # default: the largest
    with pytest.raises(InputError, match="samples"):
        P.method_comparison_figure(sweep, samples=7)


# ------------------------------------------------------------------------------ per-layer error
def test_layer_error_figure_draws_real_tables(mnist_train, mnist_test):
    net = microcnn.lenet(weights="bundled")
    cal = calibrate(net, mnist_train[0][:200], samples=30, progress=False)
    images = mnist_test[0][:40]
    tables = {"INT8": layer_error_table(net, quantize(net, cal, 8, 8), images),
              "INT4": layer_error_table(net, quantize(net, cal, 4, 4), images)}
    fig = P.layer_error_figure(tables)
    ax_mse, ax_sqnr = visible_axes(fig)
    assert_labelled(fig)
    assert ax_mse.get_yscale() == "log" and ax_sqnr.get_yscale() == "linear"
    n = len(tables["INT8"])
    mse, sqnr = bar_heights(ax_mse), bar_heights(ax_sqnr)
    assert len(mse) == len(sqnr) == 4 * n
    series = [(p, c) for p in tables for c in ("MSE", "Local MSE")]
    for k, (precision, column) in enumerate(series):
        np.testing.assert_array_equal(mse[k * n:(k + 1) * n], tables[precision][column])
        reference = tables[precision][column.replace("MSE", "SQNR (dB)")].to_numpy()
        np.testing.assert_array_equal(sqnr[k * n:(k + 1) * n],
                                      np.where(np.isfinite(reference), reference, np.nan))
    labels = [t.get_text() for t in ax_mse.get_xticklabels()]
    assert [label.replace("\n", "") for label in labels] == list(tables["INT8"]["Layer"])
    assert [t.get_text() for t in ax_sqnr.get_legend().get_texts()] == [
        "INT8 cumulative", "INT8 local", "INT4 cumulative", "INT4 local"]


def test_layer_error_figure_refuses_mismatched_tables():
    a = pd.DataFrame({"Layer": ["conv1", "fc1"], "MSE": [1e-3, 1e-2], "SQNR (dB)": [30.0, 20.0],
                      "Local MSE": [1e-3, 5e-3], "Local SQNR (dB)": [30.0, 25.0]})
    with pytest.raises(InputError, match="expected layers"):
        P.layer_error_figure({"INT8": a, "INT4": a.iloc[::-1]})
    with pytest.raises(InputError, match="columns"):
        P.layer_error_figure({"INT8": a.drop(columns="Local MSE")})


# ------------------------------------------------------------------------------ convolution
def test_conv_algorithm_figure():
    table = pd.DataFrame({"Algorithm": ["naive", "im2col", "winograd (fallback: stride 2)", "fft"],
                          "Total Time (ms)": [300.0, 30.0, 80.0, 170.0],
                          "Per Image (us)": [600.0, 60.0, 160.0, 340.0], "Speedup": [1.0, 10.0, 3.75, 1.76],
                          "Max Error vs Naive": [0.0, 8e-6, 2.7e-5, 1e-5]})
    fig = P.conv_algorithm_figure(table)
    ax_t, ax_e = visible_axes(fig)
    assert_labelled(fig)
    np.testing.assert_array_equal(bar_heights(ax_t), table["Total Time (ms)"])
    np.testing.assert_array_equal(bar_heights(ax_e), [np.nan, 8e-6, 2.7e-5, 1e-5])
    assert ax_e.get_yscale() == "log"
    assert ax_e.get_title() == "max |logit error| vs naive"  # what it plots: not "accuracy"
    (note,) = ax_e.texts  # the reference's empty slot on the log axis says why
    assert note.get_text() == "0\n(reference)" and note.get_position()[0] == 0
    assert [t.get_text() for t in ax_t.get_xticklabels()] == ["naive", "im2col", "winograd", "fft"]


def test_conv_layer_time_figure():
    table = pd.DataFrame({"Layer": ["conv1", "conv2"], "Input": ["1x8x8", "2x4x4"],
                          "naive (ms)": [5.0, 4.0], "im2col (ms)": [1.0, 0.5], "winograd (ms)": [2.0, np.nan],
                          "Fastest": ["im2col", "im2col"], "Auto": ["im2col", "im2col"]})
    fig = P.conv_layer_time_figure(table)
    ax = visible_axes(fig)[0]
    assert_labelled(fig)
    assert ax.get_yscale() == "log"
    np.testing.assert_array_equal(bar_heights(ax), [5.0, 4.0, 1.0, 0.5, 2.0, np.nan])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["naive", "im2col", "winograd"]
    with pytest.raises(InputError, match="ms"):
        P.conv_layer_time_figure(table[["Layer", "Fastest"]])


# ------------------------------------------------------------------------------ results
def test_confusion_figure_shows_each_matrix():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 400)
    matrices = {name: A.confusion_matrix(labels, np.where(rng.random(400) < p, rng.integers(0, 10, 400),
                                                          labels))
                for name, p in (("FP32", 0.05), ("INT4", 0.2))}
    fig = P.confusion_figure(matrices)
    axes = [ax for ax in fig.axes if ax.get_images()]
    assert len(axes) == 2
    assert_labelled(fig)
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=True):
        counts = matrix.to_numpy()
        shown = ax.get_images()[0].get_array()
        np.testing.assert_array_equal(shown.filled(0), counts)
        assert (shown.mask == (counts == 0)).all()
        texts = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text())
                 for t in ax.texts}
        expected = {(i, j): v for (i, j), v in np.ndenumerate(counts) if v and i != j}
        assert texts == expected
        assert ax.get_title() == f"{name}: {np.trace(counts)} / 400 correct"
    assert any(ax.get_label() == "<colorbar>" and "log" in ax.get_ylabel() for ax in fig.axes)


def test_training_curves():
    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [1.2, 0.5, 0.3], "train_acc": [0.6, 0.85, 0.9],
                            "test_acc": [0.7, 0.88, 0.93], "lr": [1e-3] * 3, "seconds": [1.0] * 3})
    fig = P.training_curves(history)
    ax_loss, ax_acc = visible_axes(fig)
    assert_labelled(fig)
    np.testing.assert_array_equal(ax_loss.get_lines()[0].get_ydata(), history["loss"])
    train, test = ax_acc.get_lines()
    np.testing.assert_array_equal(train.get_xdata(), history["epoch"])
    np.testing.assert_allclose(train.get_ydata(), 100 * history["train_acc"])
    np.testing.assert_allclose(test.get_ydata(), 100 * history["test_acc"])
    no_test = P.training_curves(history.assign(test_acc=np.nan))
    assert len(visible_axes(no_test)[1].get_lines()) == 1
    with pytest.raises(InputError, match="loss"):
        P.training_curves(history.drop(columns="loss"))


def test_figures_are_not_left_open_in_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    P.digit_grid(np.zeros((2, 28, 28)))
    assert plt.get_fignums() == before


# ------------------------------------------------------------------------------ figure summary
def test_figure_summary_changes_with_the_plotted_data_only():
    def figure(heights, title="t"):
        table = pd.DataFrame({"Algorithm": ["naive", "im2col"], "Total Time (ms)": heights,
                              "Max Error vs Naive": [0.0, 1e-6]})
        fig = P.conv_algorithm_figure(table)
        fig.axes[0].set_title(title)
        return fig

    base = P.figure_summary(figure([3.0, 1.0]))
    lines = base.splitlines()
    assert len(lines) == 3 and lines[0].startswith("figure: 2 axes, 0 images, sha1 ")
    assert lines[1].startswith("axes 0 't': 'forward time (ms)' 0..3.15 (linear), 0 lines, 2 patches")
    assert P.figure_summary(figure([3.0, 1.0])) == base  # deterministic
    assert P.figure_summary(figure([3.0, 1.0 + 1e-9])) == base  # below the stated precision (6 digits)
    changed = P.figure_summary(figure([3.0, 1.001]))
    assert changed != base and changed.splitlines()[2] == lines[2]  # only the changed axes differs
    assert P.figure_summary(figure([3.0, 1.0], title="u")) != base
    with pytest.raises(InputError, match="Figure"):
        P.figure_summary("not a figure")


def test_figure_summary_sees_images_lines_and_errorbars():
    from matplotlib.figure import Figure

    def fig_of(image, y, err):
        fig = Figure()
        ax1, ax2 = fig.subplots(1, 2)
        ax1.imshow(image)
        ax2.errorbar([1, 2], y, yerr=err)
        return P.figure_summary(fig)

    image = np.arange(12.0).reshape(3, 4)
    base = fig_of(image, [1.0, 2.0], [0.1, 0.2]).splitlines()
    assert len(base) == 2 and base[0].startswith("figure: 2 axes, 1 images")  # image axes: in the total only
    bumped = image.copy()
    bumped[1, 1] += 0.01
    bumped_lines = fig_of(bumped, [1.0, 2.0], [0.1, 0.2]).splitlines()
    assert bumped_lines[0] != base[0] and bumped_lines[1] == base[1]  # the image changed, the plot did not
    assert fig_of(image, [1.0, 2.5], [0.1, 0.2]).splitlines()[1] != base[1]
    assert fig_of(image, [1.0, 2.0], [0.1, 0.3]).splitlines()[1] != base[1]


def test_notebook_style_sets_the_dpi_once():
    import matplotlib

    before = matplotlib.rcParams["figure.dpi"]
    try:
        P.notebook_style()
        assert matplotlib.rcParams["figure.dpi"] == P.NOTEBOOK_DPI
        assert pd.get_option("display.precision") == 4
    finally:
        matplotlib.rcParams["figure.dpi"] = before
        pd.reset_option("display.precision")
        pd.reset_option("display.width")
