"""Quantized graphs (issue 13): BatchNorm folded inside ``quantize``, grouped/depthwise convolutions in
integers, residual Add and Concat as integer stages that rescale their inputs to the output scale.

References: a plain-NumPy integer model of the Add/Concat rule (Python integers, floor division), a dense
convolution with block-diagonal weights for the grouped one (bit-identical), and the FP32 network
(error bounded relative to the logits' range)."""

import json
import os
import tempfile

import numpy as np
import pytest

from microcnn import (
    Add,
    BatchNorm2d,
    Concat,
    Conv2d,
    FileFormatError,
    Flatten,
    GlobalAvgPool2d,
    Graph,
    InputError,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    load,
)
from microcnn.quant import ActQuant, QuantizedGraph, calibrate, layer_error_table, quantize
from microcnn.quant.params import fixed_point_multiplier
from microcnn.quant.qlayers import ADD_FRACTION_BITS, QAdd, QConcat, QConv2d


def _bn(c, rng):
    bn = BatchNorm2d(c)
    bn.running_mean[:], bn.running_var[:] = rng.normal(0, 0.2, c), rng.random(c) + 0.5
    bn.weight.data[:], bn.bias.data[:] = rng.random(c) + 0.5, rng.normal(0, 0.1, c)
    return bn


def _images(n=48, c=1, hw=12, seed=0):
    return np.random.default_rng(seed).random((n, c, hw, hw), dtype=np.float32)


def _residual_graph(seed=1) -> Graph:
    """conv-BN-ReLU stem; a residual block (Add then ReLU); a depthwise conv; Concat of two branches."""
    rng = np.random.default_rng(seed)
    nodes = [("stem", Conv2d(1, 8, 3, padding=1, bias=False, rng=rng), ["x"]),
             ("stem_bn", _bn(8, rng), ["stem"]),
             ("stem_relu", ReLU(), ["stem_bn"]),
             ("a", Conv2d(8, 8, 3, padding=1, bias=False, rng=rng), ["stem_relu"]),
             ("a_bn", _bn(8, rng), ["a"]),
             ("a_relu", ReLU(), ["a_bn"]),
             ("b", Conv2d(8, 8, 3, padding=1, bias=False, rng=rng), ["a_relu"]), ("b_bn", _bn(8, rng), ["b"]),
             ("sum", Add(), ["b_bn", "stem_relu"]), ("sum_relu", ReLU(), ["sum"]),
             ("dw", Conv2d(8, 8, 3, padding=1, groups=8, rng=rng), ["sum_relu"]), ("dw_relu", ReLU(), ["dw"]),
             ("pw", Conv2d(8, 4, 1, rng=rng), ["sum_relu"]),
             ("cat", Concat(1), ["dw_relu", "pw"]), ("pool", MaxPool2d(2), ["cat"]),
             ("gap", GlobalAvgPool2d(), ["pool"]), ("flat", Flatten(), ["gap"]),
             ("fc", Linear(12, 10, rng=rng), ["flat"])]
    return Graph(nodes, "x", "fc", input_shape=(1, 12, 12))


def _add_reference(xs, acts, out: ActQuant, relu: bool) -> np.ndarray:
    """The documented rule in Python integers: each input rescaled by its fixed-point multiplier
    (round half up) with ADD_FRACTION_BITS fractional bits, summed, rounded once more, clamped."""
    m0, shift = fixed_point_multiplier([a.scale / out.scale * 2.0 ** ADD_FRACTION_BITS for a in acts])
    total = np.zeros(xs[0].shape, object)
    for x, a, m, s in zip(xs, acts, m0, shift, strict=True):
        total += ((x.astype(object) - a.zero_point) * int(m) + (1 << (int(s) - 1))) // (1 << int(s))
    y = (total + (1 << (ADD_FRACTION_BITS - 1))) // (1 << ADD_FRACTION_BITS) + out.zero_point
    return np.clip(y, out.zero_point if relu else 0, out.qmax).astype(np.uint8)


@pytest.mark.parametrize("relu", [False, True])
def test_qadd_matches_the_integer_reference_and_the_real_sum(relu):
    rng = np.random.default_rng(0)
    acts = [ActQuant(0.031, 17, 8), ActQuant(0.007, 128, 8), ActQuant(0.05, 0, 8)]
    out = ActQuant(0.04, 90, 8)
    xs = [rng.integers(0, 256, (5, 3, 7, 6), dtype=np.uint8) for _ in acts]
    got = QAdd((0,), acts, out, relu).run(*xs)
    np.testing.assert_array_equal(got, _add_reference(xs, acts, out, relu))
    views = [xs[0][:, :, :, ::-1][:, :, :, ::-1], np.broadcast_to(xs[1], xs[1].shape), xs[2]]  # odd layouts
    assert not views[1].flags.writeable
    np.testing.assert_array_equal(QAdd((0,), acts, out, relu).run(*views), got)
    real = sum(a.scale * (x.astype(np.float64) - a.zero_point) for x, a in zip(xs, acts, strict=True))
    exact = real / out.scale
    want = np.clip(np.floor(exact + 0.5) + out.zero_point, out.zero_point if relu else 0, 255)
    # one rounding of the exact sum, each input within 2**-16 of a step: codes differ by at most one,
    # and only where the exact sum is within that of a half-way point (exact ties are common here)
    differ = got != want
    assert np.abs(got.astype(int) - want).max() <= 1 and differ.mean() < 0.01
    assert (np.abs(exact[differ] - np.floor(exact[differ]) - 0.5) <= len(acts) * 2.0 ** -16).all()


def test_qconcat_requantizes_each_input_and_keeps_a_matching_grid_unchanged():
    rng = np.random.default_rng(1)
    acts, out = [ActQuant(0.02, 10, 8), ActQuant(0.05, 0, 8)], ActQuant(0.05, 0, 8)
    xs = [rng.integers(0, 256, (4, c, 5, 5), dtype=np.uint8) for c in (2, 3)]
    got = QConcat((0,), acts, out).run(*xs)
    assert got.shape == (4, 5, 5, 5)
    np.testing.assert_array_equal(got[:, 2:], xs[1])  # same scale and zero point: the codes themselves
    real = acts[0].scale * (xs[0].astype(np.float64) - acts[0].zero_point)
    want = np.clip(np.floor(real / out.scale + 0.5), 0, 255)
    differ = got[:, :2] != want
    near_tie = np.abs(real / out.scale - np.floor(real / out.scale) - 0.5) <= 1e-6
    assert np.abs(got[:, :2].astype(int) - want).max() <= 1 and (~differ | near_tie).all()
    with pytest.raises(InputError, match="expected 2 uint8 arrays"):
        QConcat((0,), acts, out).run(xs[0])


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_equals_the_dense_conv_with_block_diagonal_weights(groups):
    rng = np.random.default_rng(2)
    c = o = 4
    w = rng.integers(-127, 128, (o, c // groups, 3, 3)).astype(np.int8)
    dense = np.zeros((o, c, 3, 3), np.int8)
    for g in range(groups):
        dense[g * (o // groups):(g + 1) * (o // groups), g * (c // groups):(g + 1) * (c // groups)] = \
            w[g * (o // groups):(g + 1) * (o // groups)]
    scale = (rng.random(o) * 0.01 + 0.001).astype(np.float32)
    bias = rng.integers(-500, 500, o).astype(np.int32)
    act_in, act_out = ActQuant(0.02, 3, 8), ActQuant(0.1, 7, 8)
    x = rng.integers(0, 256, (3, c, 9, 9), dtype=np.uint8)
    for out, pool in ((act_out, None), (None, ((2, 2), (2, 2)))):
        args = ((0,), 8, scale, bias, act_in, out, True)
        grouped = QConv2d((0,), w, *args[1:], stride=(2, 1), padding=(1, 1), pool=pool, groups=groups)
        ref = QConv2d((0,), dense, *args[1:], stride=(2, 1), padding=(1, 1), pool=pool)
        np.testing.assert_array_equal(grouped.run(x), ref.run(x))
        np.testing.assert_array_equal(grouped.preactivation(x), ref.preactivation(x))
    with pytest.raises(InputError, match="groups must be a positive integer dividing"):
        QConv2d((0,), w, 8, scale, bias, act_in, act_out, True, groups=3)


def test_batchnorm_is_folded_inside_quantize_and_the_stages_keep_the_conv_names():
    rng = np.random.default_rng(3)
    net = Sequential(Conv2d(1, 4, 3, rng=rng), _bn(4, rng), ReLU(), MaxPool2d(2),
                     Conv2d(4, 8, 3, padding=1, groups=4, rng=rng), _bn(8, rng), ReLU(), Flatten(),
                     Linear(200, 10, rng=rng), input_shape=(1, 12, 12))
    x = _images()
    cal = calibrate(net, x, progress=False)
    q = quantize(net, cal)
    assert [s.kind for s in q.stages] == ["quantize", "qconv2d", "qconv2d", "flatten", "qlinear"]
    assert q.layer_precisions() == {"conv1": "W8A8", "conv2": "W8A8", "fc1": "W8A8"}
    table = layer_error_table(net, q, x)
    assert list(table["Layer"][:2]) == ["conv1+batchnorm2d1+relu1+pool1", "conv2+batchnorm2d2+relu2"]
    assert (table["SQNR (dB)"] > 30).all()
    ref = net.logits(x)
    assert np.abs(q.logits(x) - ref).max() <= 0.01 * np.ptp(ref)
    # the same as folding by hand first, bit for bit; a kept FP32 conv carries its BN too; files read back
    folded = net.fold_batchnorm()
    by_hand = quantize(folded, calibrate(folded, x, progress=False))
    assert np.array_equal(by_hand.logits(x), q.logits(x))
    mixed = quantize(net, cal, layer_bits={"conv2": 32})
    assert [s.layers for s in mixed.stages if s.kind == "float"][0] == (4, 5)
    with tempfile.TemporaryDirectory() as folder:
        for model in (q, mixed):
            path = os.path.join(folder, f"{len(model.stages)}.safetensors")
            model.save(path)
            assert np.array_equal(load(path).logits(x), model.logits(x))


def test_a_bn_that_cannot_be_folded_is_refused():
    rng = np.random.default_rng(4)
    net = Sequential(Conv2d(1, 4, 3, rng=rng), ReLU(), _bn(4, rng), Flatten(), Linear(400, 10, rng=rng),
                     input_shape=(1, 12, 12))
    with pytest.raises(InputError, match="batchnorm2d1 is a BatchNorm2d that does not follow a Conv2d"):
        quantize(net, calibrate(net, _images(), progress=False))
    # the conv's output is read by the BN and by the residual Add: folding would change the Add's input
    g = Graph([("c", Conv2d(1, 1, 3, padding=1, rng=rng), ["x"]), ("bn", _bn(1, rng), ["c"]),
               ("sum", Add(), ["bn", "c"]), ("flat", Flatten(), ["sum"]),
               ("fc", Linear(144, 10, rng=rng), ["flat"])],
              "x", "fc", input_shape=(1, 12, 12))
    with pytest.raises(InputError, match=r"bn is a BatchNorm2d .*\(as that layer's only reader\)"):
        quantize(g, calibrate(g, _images(), progress=False))


@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_residual_graph_with_concat_quantizes_close_to_fp32(bits):
    g, x = _residual_graph(), _images(64)
    q = quantize(g, calibrate(g, x, progress=False), *bits)
    assert isinstance(q, QuantizedGraph)
    kinds = [s.kind for s in q.stages]
    assert kinds.count("qadd") == 1 and kinds.count("qconcat") == 1 and "float" in kinds  # GAP in FP32
    add = next(s for s in q.stages if s.kind == "qadd")
    assert add.relu and [q.names[i] for i in add.layers] == ["sum", "sum_relu"]
    assert [s.groups for s in q.stages if s.kind == "qconv2d"] == [1, 1, 1, 8, 1]
    assert [r.name for r in q.trace(x[:2])] == g.names
    ref, out = g.logits(x), q.logits(x)
    tol = 0.02 if bits[0] == 8 else 0.06  # of the logits' range: INT8 / W4A8 on random weights
    assert np.abs(out - ref).max() <= tol * np.ptp(ref)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert q.predict(x).shape == (64, 10) and q.nbytes < g.nbytes
    table = layer_error_table(g, q, x[:16])  # a row per stage with layers; local: fed the FP32 inputs
    assert list(table["Layer"]) == ["stem+stem_bn+stem_relu", "a+a_bn+a_relu", "b+b_bn", "sum+sum_relu",
                                    "dw+dw_relu", "pw", "cat", "pool", "gap", "flat", "fc"]
    assert (table["Local SQNR (dB)"][:7] > (30 if bits[0] == 8 else 15)).all()


def test_graph_add_stage_agrees_with_the_reference_on_the_graphs_own_tensors():
    g, x = _residual_graph(), _images(16)
    q = quantize(g, calibrate(g, x, progress=False))
    env = {}
    # rerun the steps, checking the Add stage against the integer reference on its real inputs
    env[q.input_name] = x
    for stage, ins, out in q.steps:
        env[out] = stage.run(*(env[i] for i in ins))
        if stage.kind == "qadd":
            want = _add_reference([env[i] for i in ins], list(stage.in_acts), stage.out_act, stage.relu)
            np.testing.assert_array_equal(env[out], want)
    with tempfile.TemporaryDirectory() as folder:  # the file reads back to the same bits
        path = os.path.join(folder, "graph-int8.safetensors")
        q.save(path)
        back = load(path)
        assert isinstance(back, QuantizedGraph) and np.array_equal(back.logits(x), q.logits(x))
        assert back.layer_precisions() == q.layer_precisions() and back.nbytes == q.nbytes


def _tampered(path, out, change):
    from microcnn.io import SafetensorsFile, write_safetensors

    with SafetensorsFile(path) as st:
        metadata, tensors = dict(st.metadata), st.read()
    specs = json.loads(metadata["stages"])
    change(specs)
    metadata["stages"] = json.dumps(specs)
    write_safetensors(out, tensors, metadata)
    return out


def test_a_quantized_graph_file_whose_steps_do_not_fit_the_graph_is_refused():
    g, x = _residual_graph(), _images(16)
    q = quantize(g, calibrate(g, x, progress=False), 4, 8, layer_bits={"pw": 32})
    add = next(k for k, s in enumerate(q.stages) if s.kind == "qadd")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "g.safetensors")
        q.save(path)
        assert np.array_equal(load(path).logits(x), q.logits(x))  # mixed W4A8 + an FP32 node reads back

        def rewire(specs):
            specs[add]["inputs"] = specs[add]["inputs"][::-1] + ["b_bn"]

        def float_input(specs):
            specs[add]["inputs"] = [k + ":f" if k == "b_bn" else k for k in specs[add]["inputs"]]

        def unknown(specs):
            specs[add]["kind"] = "qmul"

        for change, message in ((rewire, "reads or writes other tensors than its nodes"),
                                (float_input, "layers, inputs or output do not fit the graph"),
                                (unknown, "unknown stage kind")):
            with pytest.raises(FileFormatError, match=message):
                load(_tampered(path, os.path.join(folder, f"{change.__name__}.safetensors"), change))


def test_gptq_rounds_each_group_of_a_grouped_conv_and_adaround_refuses_them():
    g, x = _residual_graph(), _images(64)
    cal = calibrate(g, x, progress=False)
    ref = g.logits(x)
    errors = {r: np.abs(quantize(g, cal, 4, 8, rounding=r).logits(x) - ref).max()
              for r in ("nearest", "gptq")}
    assert errors["gptq"] <= 0.06 * np.ptp(ref) and errors["gptq"] < 1.5 * errors["nearest"]
    with pytest.raises(InputError, match="dw is a grouped convolution .*use 'gptq' or 'nearest'"):
        quantize(g, cal, 4, 8, rounding="adaround", rounding_options={"iterations": 10})
