"""Quantized networks end to end: an independent NumPy simulation of the integer pipeline, the
Sequential-compatible API, memory accounting, files, calibration errors, analysis tables."""

import json

import numpy as np
import pytest

import microcnn
from microcnn import io
from microcnn.errors import FileFormatError, InputError
from microcnn.quant import (
    Calibration,
    calibrate,
    compress,
    layer_error_table,
    mixed_precision,
    per_layer_table,
    quantize,
    sqnr_db,
)
from microcnn.quant.qlayers import (
    DequantizeStage,
    FlattenStage,
    FloatStage,
    QConv2d,
    QLinear,
    QMaxPool2d,
    QReLU,
    QuantizeStage,
)
from tests.reference import softmax
from tests.test_quant_kernels import conv_acc_ref, finish_ref


@pytest.fixture(scope="module")
def setup(mnist_train):
    images, labels = mnist_train
    net = microcnn.lenet(seed=3)
    cal = calibrate(net, images[:400], samples=100, progress=False, seed=1)
    return net, cal, images[1000:1300], labels[1000:1300]


def simulate(stages, x):
    """Quantized stages recomputed from their stored parameters with NumPy int64 arithmetic."""
    a = x
    for st in stages:
        if isinstance(st, QuantizeStage):
            q = st.out_act
            a = np.clip(np.rint(a / np.float32(q.scale)) + q.zero_point, 0, q.qmax).astype(np.uint8)
        elif isinstance(st, QConv2d):
            acc = conv_acc_ref(a, st.in_act.zero_point, st.weight_values, st.bias_q, st.stride, st.padding,
                               st.pool)
            a = finish_ref(acc, st.mode, st.m0, st.shift, st.fmult, st.zp, st.lo, st.hi, axis=1)
        elif isinstance(st, QLinear):
            centred = a.astype(np.int64) - st.in_act.zero_point
            acc = centred @ st.weight_values.T.astype(np.int64) + st.bias_q
            a = finish_ref(acc, st.mode, st.m0, st.shift, st.fmult, st.zp, st.lo, st.hi, axis=1)
        elif isinstance(st, QMaxPool2d):
            (kh, kw), (sh, sw) = st.kernel_size, st.stride
            win = np.lib.stride_tricks.sliding_window_view(a, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
            a = win.max(axis=(4, 5))
        elif isinstance(st, FlattenStage):
            a = a.reshape(len(a), -1)
        elif isinstance(st, QReLU):
            a = np.maximum(a, st.in_act.zero_point).astype(np.uint8)
        elif isinstance(st, DequantizeStage):
            a = (a.astype(np.float32) - st.in_act.zero_point) * np.float32(st.in_act.scale)
        elif isinstance(st, FloatStage) and st.layer.type == "Softmax":
            a = softmax(a)
        else:
            a = st.layer.forward(a)
    return a


CONFIGS = [dict(weight_bits=8, act_bits=8), dict(weight_bits=4, act_bits=8),
           dict(weight_bits=4, act_bits=4, requant="float"),
           dict(weight_bits=8, act_bits=8, per_channel=False, weight_clipping="minmax",
                bias_correction=False, rounding="nearest"),
           dict(weight_bits=8, act_bits=4, layer_bits={"conv2": 32, "fc2": 4})]


@pytest.mark.parametrize("config", CONFIGS)
def test_integer_pipeline_matches_numpy_simulation(setup, config):
    net, cal, x, _ = setup
    qnet = quantize(net, cal, **config)
    p = qnet.predict(x)
    np.testing.assert_allclose(p, simulate(qnet.stages, x), rtol=1e-6, atol=1e-7)
    # and the integers still compute the FP32 network: a lost ReLU or scale costs > 10 dB here
    least = 40 if config["weight_bits"] == 8 and config["act_bits"] == 8 else 25
    assert sqnr_db(net.logits(x), qnet.logits(x)) > least


def test_integer_logits_are_exact_and_close_to_fp32(setup):
    net, cal, x, _ = setup
    qnet = quantize(net, cal, 8, 8)
    logits = qnet.logits(x)
    np.testing.assert_array_equal(logits, simulate(qnet.stages[:-1], x))  # integers up to float logits
    assert sqnr_db(net.logits(x), logits) > 30  # INT8 keeps the logits to ~3 % noise
    # fused stages: conv+relu+pool, conv3+relu3, fc1+relu4, fc2 with float (dequantized) logits
    assert [s.kind for s in qnet.stages] == ["quantize", "qconv2d", "qconv2d", "qconv2d", "flatten",
                                             "qlinear", "qlinear", "float"]
    assert qnet.stages[-2].out_act is None


def test_weights_and_bias_quantization(setup):
    net, cal, _, _ = setup
    qnet = quantize(net, cal, 8, 8, weight_clipping="minmax", bias_correction=False, rounding="nearest")
    conv1 = qnet.stages[1]
    w = net[0].weight.data
    scale = conv1.weight_scale
    np.testing.assert_allclose(scale, np.abs(w).reshape(6, -1).max(1) / 127, rtol=1e-6)
    np.testing.assert_allclose(conv1.weight_values * scale[:, None, None, None], w,
                               atol=scale.max() / 2 + 1e-7)
    expected_bias = np.rint(net[0].bias.data / (np.float64(conv1.in_act.scale) * scale))
    np.testing.assert_array_equal(conv1.bias_q, expected_bias)
    m = conv1.in_act.scale * scale.astype(np.float64) / conv1.out_act.scale
    np.testing.assert_allclose(conv1.m0 * 2.0 ** -conv1.shift.astype(np.float64), m, rtol=2**-29)


def test_bias_correction_removes_the_mean_logit_error(setup):
    net, cal, _, _ = setup
    fp32 = net.logits(cal.images).astype(np.float64)
    gaps = {}
    for bc in (False, True):
        q = quantize(net, cal, 4, 4, bias_correction=bc, rounding="nearest")
        gaps[bc] = np.abs((fp32 - q.logits(cal.images)).mean(axis=0)).mean()
    assert gaps[True] < 0.5 * gaps[False]


def test_api_matches_sequential(setup):
    net, cal, x, labels = setup
    qnet = quantize(net, cal, 8, 8)
    records = qnet.trace(x[:20])
    assert [r.name for r in records] == net.names
    assert [r.type for r in records] == [r.type for r in net.trace(x[:2])]
    assert all(r.seconds >= 0 for r in records)
    p = qnet.predict(x, batch_size=64)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(qnet.predict_classes(x), p.argmax(1))
    assert qnet.accuracy(x, labels) == pytest.approx(float((p.argmax(1) == labels).mean()))
    np.testing.assert_array_equal(qnet.predict((x[:5] * 255).round().astype(np.uint8)),
                                  qnet.predict(np.round(x[:5] * 255) / np.float32(255)))
    with pytest.raises(InputError, match="NaN"):
        qnet.predict(np.full((2, 1, 28, 28), np.nan, np.float32))
    with pytest.raises(InputError, match="shape"):
        qnet.predict(np.zeros((2, 3, 28, 28), np.float32))


def test_nbytes_counts_what_is_stored(setup, tmp_path):
    net, cal, _, _ = setup
    assert net.nbytes == 246_824
    weights = sum(p.data.size for n, p in net.named_parameters() if n.endswith("weight"))
    channels = sum(p.data.size for n, p in net.named_parameters() if n.endswith("bias"))
    acts = 5 * (4 + 1)  # input + 4 requantized outputs: float32 scale + uint8 zero point
    for (wb, ab), limit in [((8, 8), 0.26), ((4, 8), 0.14), ((4, 4), 0.14)]:
        qnet = quantize(net, cal, wb, ab)
        per_layer = [150, 2400, 48000, 10080, 840]
        data = weights if wb == 8 else sum((n + 1) // 2 for n in per_layer)
        assert qnet.nbytes == data + channels * (4 + 4) + acts  # + float32 scales + int32 biases
        assert qnet.nbytes <= limit * net.nbytes
        qnet.save(tmp_path / "q.safetensors")
        tensors, _ = io.read_safetensors(tmp_path / "q.safetensors")
        assert sum(a.nbytes for a in tensors.values()) == qnet.nbytes


def test_kernel_nbytes_counts_the_derived_copies_apart_from_nbytes(setup):
    net, cal, _, _ = setup
    weights = sum(p.data.size for n, p in net.named_parameters() if n.endswith("weight"))
    channels = sum(p.data.size for n, p in net.named_parameters() if n.endswith("bias"))
    sizes = {}
    for wb in (8, 4, 2):
        qnet = quantize(net, cal, wb, 8)
        sizes[wb] = qnet.kernel_nbytes
        assert qnet.kernel_nbytes == sum(s.kernel_nbytes for s in qnet.stages)
        assert qnet.nbytes < qnet.kernel_nbytes  # stored at wb bits, run from int8 codes and repacked words
    assert len(set(sizes.values())) == 1, sizes  # the kernels' copies do not depend on the stored width
    # at least the int8 codes, one repacked copy of them and the corrected int32 biases
    assert sizes[8] >= 2 * weights + 4 * channels


@pytest.mark.parametrize("config", CONFIGS)
def test_save_load_round_trip(setup, tmp_path, config):
    net, cal, x, _ = setup
    qnet = quantize(net, cal, **config)
    path = tmp_path / "q.safetensors"
    qnet.save(path)
    loaded = microcnn.load(path)
    np.testing.assert_array_equal(loaded.predict(x), qnet.predict(x))
    assert loaded.nbytes == qnet.nbytes
    assert loaded.summary().equals(qnet.summary())
    assert loaded.settings["weight_bits"] == config["weight_bits"]


def _rewrite(path, out, tensors=None, metadata=None):
    t, m = io.read_safetensors(path)
    io.write_safetensors(out, tensors(t) if tensors else t, metadata(m) if metadata else m)
    return out


def test_load_refuses_mismatched_files(setup, tmp_path):
    net, cal, _, _ = setup
    good = tmp_path / "q.safetensors"
    quantize(net, cal, 4, 8).save(good)

    def other_arch(m):
        arch = json.loads(m["architecture"])
        arch["layers"][0]["out_channels"] = 8
        return {**m, "architecture": json.dumps(arch)}

    cases = {
        "architecture": dict(metadata=other_arch),
        "missing": dict(tensors=lambda t: {k: v for k, v in t.items() if k != "1.bias"}),
        "dtype": dict(tensors=lambda t: {**t, "1.bias": t["1.bias"].astype(np.int64)}),
        "extra": dict(tensors=lambda t: {**t, "stats": np.zeros(3, np.float32)}),
        "scale": dict(tensors=lambda t: {**t, "0.out_scale": np.array([-1.0], np.float32)}),
        "stages": dict(metadata=lambda m: {
            **m, "stages": m["stages"].replace('"weight_bits": 4', '"weight_bits": 5')}),
    }
    for name, change in cases.items():
        bad = _rewrite(good, tmp_path / f"{name}.safetensors", **change)
        with pytest.raises(FileFormatError):
            microcnn.load(bad)
    # statistics of another network: refused when loading against this one, and by quantize()
    cal_path = tmp_path / "cal.safetensors"
    cal.save(cal_path)
    other = microcnn.Sequential(*[microcnn.Conv2d(1, 2, 3), microcnn.Flatten(), microcnn.Linear(1352, 10)],
                                input_shape=(1, 28, 28))
    with pytest.raises(FileFormatError, match="another architecture"):
        Calibration.load(cal_path, other)
    with pytest.raises(FileFormatError, match="calibration file"):
        microcnn.load(cal_path)
    with pytest.raises(InputError, match="another architecture"):
        quantize(other, cal)


def test_calibration_round_trip(setup, tmp_path):
    net, cal, x, _ = setup
    cal.save(tmp_path / "c.safetensors")
    back = Calibration.load(tmp_path / "c.safetensors", net)
    assert back.names == cal.names and back.method == cal.method
    for name in cal.names:
        assert back.range(name, 4) == cal.range(name, 4)
    np.testing.assert_array_equal(quantize(net, back, 4, 4).predict(x), quantize(net, cal, 4, 4).predict(x))


def test_bad_calibration_data_and_settings(setup):
    net, cal, x, _ = setup
    for bad, match in [(np.zeros((0, 1, 28, 28), np.float32), "empty"),
                       (np.full((5, 1, 28, 28), 0.25, np.float32), "constant"),
                       (np.where(np.arange(784).reshape(1, 1, 28, 28) == 3, np.nan, x[:4]), "NaN")]:
        with pytest.raises(InputError, match=match):
            calibrate(net, bad, progress=False)
    for kwargs in (dict(method="kmeans"), dict(samples=0)):
        with pytest.raises(InputError):
            calibrate(net, x, progress=False, **kwargs)
    for bits in (1, 9, 16, 0):
        with pytest.raises(InputError, match="weight_bits: .*bits outside 2..8"):
            quantize(net, cal, weight_bits=bits)
        with pytest.raises(InputError, match="act_bits: .*bits outside 2..8"):
            quantize(net, cal, act_bits=bits)
    with pytest.raises(InputError):
        quantize(net, cal, layer_bits={"relu1": 8})
    with pytest.raises(InputError):
        quantize(net, cal, requant="magic")
    with pytest.raises(InputError):
        quantize(net, cal, rounding="stochastic")


def test_dead_layer_range_is_refused(setup):
    net, cal, x, _ = setup
    dead = microcnn.lenet(seed=3)
    dead[0].bias.data[...] = -100.0  # relu1 is 0 everywhere: no range for pool1
    dead_cal = calibrate(dead, x, samples=20, progress=False)
    with pytest.raises(InputError, match="zero range"):
        quantize(dead, dead_cal)


def test_compress_round_trip_and_size(setup, tmp_path):
    net, _, x, _ = setup
    weights = sum(p.data.size for n, p in net.named_parameters() if n.endswith("weight"))
    for fmt, size in [("int8", weights + 236 * 4 + 236 * 4), ("fp16", 61_706 * 2)]:
        c = compress(net, fmt, weight_clipping="minmax")
        assert c.nbytes == size
        for (name, p), (_, q) in zip(net.named_parameters(), c.network.named_parameters(), strict=True):
            tol = np.abs(p.data).max() / (127 if fmt == "int8" and name.endswith("weight") else 1000)
            np.testing.assert_allclose(q.data, p.data, atol=tol)
        path = tmp_path / f"{fmt}.safetensors"
        c.save(path)
        loaded = microcnn.load(path)
        assert loaded.nbytes == size and loaded.kind == f"compressed-{fmt}"
        np.testing.assert_array_equal(loaded.predict(x), c.predict(x))
    clipped = compress(net, "int8")  # the default MSE clipping trades the largest weights for resolution
    err = {name: sum(float(((a.data - b.data) ** 2).sum()) for a, b in
                     zip(net.parameters(), model.network.parameters(), strict=True))
           for name, model in [("mse", clipped), ("minmax", compress(net, "int8", weight_clipping="minmax"))]}
    assert err["mse"] < err["minmax"]
    with pytest.raises(InputError):
        compress(net, "int3")


def test_layer_error_table(setup):
    net, cal, x, _ = setup
    qnet = quantize(net, cal, 4, 4)
    table = layer_error_table(net, qnet, x[:100])
    assert list(table.columns) == ["Layer", "Type", "Precision", "MSE", "SQNR (dB)", "Local MSE",
                                   "Local SQNR (dB)"]
    assert table["Layer"].tolist()[:3] == ["conv1+relu1+pool1", "conv2+relu2+pool2", "conv3+relu3"]
    ref, q = net.trace(x[:100]), qnet.trace(x[:100])
    expected = np.mean((ref[5].output.astype(np.float64) - q[5].output) ** 2)
    assert table["MSE"][1] == pytest.approx(expected)
    signal = np.sum(ref[5].output.astype(np.float64) ** 2)
    assert table["SQNR (dB)"][1] == pytest.approx(10 * np.log10(signal / (expected * ref[5].output.size)))
    # the first stage sees the same (quantized) images either way; later stages accumulate error
    assert table["Local MSE"][0] == pytest.approx(table["MSE"][0])
    assert table["Local MSE"][4] < table["MSE"][4]


def test_per_layer_table(setup):
    net, cal, x, _ = setup
    table = per_layer_table(net, cal, x[:64], repeats=1)
    assert list(table.columns) == ["Layer", "Type", "FP32 Time (ms)", "INT8 Time (ms)", "INT4 Time (ms)",
                                   "INT8 MSE", "INT4 MSE"]
    assert table["Layer"].tolist() == net.names
    assert (table[["FP32 Time (ms)", "INT8 Time (ms)", "INT4 Time (ms)"]] >= 0).all().all()
    assert np.isnan(table["INT8 MSE"][0]) and not np.isnan(table["INT8 MSE"][2])  # conv1 fused into pool1
    assert (table["INT4 MSE"].dropna() >= table["INT8 MSE"].dropna()).iloc[:4].all()


def test_mixed_precision(setup):
    net, cal, x, _ = setup
    labels = net.predict_classes(x)  # FP32 is 100 % right on its own predictions
    fast = dict(rounding="nearest", bias_correction=False)
    loose = mixed_precision(net, cal, x, labels, budget_points=100, **fast)
    assert set(loose.table["Precision"]) == {"INT4"}
    assert loose.nbytes == quantize(net, cal, 4, 8).nbytes
    strict = mixed_precision(net, cal, x, labels, budget_points=0.0, **fast)
    assert strict.fp32_accuracy == 1.0 and strict.accuracy == 1.0
    assert strict.nbytes >= loose.nbytes and strict.saved_bytes == net.nbytes - strict.nbytes
    assert list(strict.table.columns) == ["Layer", "Type", "Parameters", "INT4 Drop (pts)", "INT8 Drop (pts)",
                                          "Precision", "Bytes", "FP32 Bytes", "Saved Bytes"]
    assert strict.network.accuracy(x, labels) == 1.0


def test_other_architectures(mnist_train, tmp_path):
    """Strided/padded convolutions, pooling without ReLU, an unfused ReLU, float-only layers (Sigmoid,
    AvgPool) in between and a network that ends on integers."""
    from microcnn import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, Sigmoid

    images = mnist_train[0][:120]
    rng = np.random.default_rng(2)
    nets = [
        Sequential(Conv2d(1, 5, 3, stride=2, padding=1, rng=rng), MaxPool2d(2), ReLU(),
                   Conv2d(5, 4, 3, rng=rng), Sigmoid(), AvgPool2d(2), Flatten(), Linear(16, 10, rng=rng),
                   input_shape=(1, 28, 28)),
        Sequential(Conv2d(1, 3, 5, rng=rng), ReLU(), Conv2d(3, 2, 3, stride=(1, 2), rng=rng), MaxPool2d(3, 2),
                   input_shape=(1, 28, 28)),
    ]
    for net in nets:
        cal = calibrate(net, images, samples=60, progress=False)
        x = images[60:]
        for bits in ((8, 8), (4, 4)):
            qnet = quantize(net, cal, *bits)
            out = qnet.predict(x)
            np.testing.assert_allclose(out, simulate(qnet.stages, x), rtol=1e-6, atol=1e-6)
            if bits == (8, 8):
                assert sqnr_db(net.predict(x), out) > 25
            qnet.save(tmp_path / "q.safetensors")
            np.testing.assert_array_equal(microcnn.load(tmp_path / "q.safetensors").predict(x), out)
    assert [s.kind for s in quantize(nets[0], calibrate(nets[0], images, progress=False)).stages] == [
        "quantize", "qconv2d", "qrelu", "qconv2d", "float", "float", "flatten", "quantize", "qlinear"]
