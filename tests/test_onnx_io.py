"""ONNX import and export (microcnn.onnx_io) on files built with onnx.helper: no torch needed.

References: ONNX Runtime on the same file (probabilities within PROB_ATOL = 1e-4, the issue's target;
float32 logits within LOGIT_ATOL), plain NumPy for the layers, and our own model for round trips
(identical bits). Every hostile file gets its own specific error, raised before anything large is made.
"""

import sys

import numpy as np
import pytest

import microcnn
from microcnn import InputError, Sequential, lenet
from microcnn.layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid, Softmax
from microcnn.resolve import load_model_spec

from . import reference as ref

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from microcnn.onnx_io import MAX_DIM, MissingDependencyError, export_onnx, load_onnx, to_model_proto  # noqa: E402

PROB_ATOL = 1e-4  # probabilities, ours vs ONNX Runtime (the target)
LOGIT_ATOL = 1e-5  # float32 engines on O(1) logits: a few ulps of different summation orders


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")


def ort_run(ort, path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def images(n=6, chw=(1, 28, 28), seed=0):
    return np.random.default_rng(seed).random((n, *chw), dtype=np.float32)


def write(tmp_path, nodes, inits=(), in_dims=("N", 1, 8, 8), out_dims=None, opset=17, name="m.onnx",
          inputs=None):
    """An ONNX file of ``nodes`` reading "x" and writing "y" (no checker: hostile files are the point)."""
    inits = [numpy_helper.from_array(np.asarray(v), k) if isinstance(v, np.ndarray) else v
             for k, v in dict(inits).items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)
    graph = helper.make_graph(nodes, "g", inputs or [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- import on well-formed files ------------------------------------------------------------------------
def test_lenet_round_trip_is_bit_identical_and_agrees_with_onnx_runtime(ort, tmp_path, bundled):
    path = tmp_path / "lenet.onnx"
    export_onnx(bundled, path)
    back = load_onnx(path)
    assert isinstance(back, Sequential) and back.config() == bundled.config()
    for (k, a), (k2, b) in zip(back.state_dict().items(), bundled.state_dict().items(), strict=True):
        assert k == k2 and np.array_equal(a, b)
    x = images(40)
    np.testing.assert_array_equal(back.predict(x), bundled.predict(x))
    np.testing.assert_allclose(ort_run(ort, path, x), bundled.predict(x), atol=PROB_ATOL, rtol=0)
    np.testing.assert_allclose(bundled.predict(x), ref.lenet_forward(bundled.state_dict(), x),
                               atol=PROB_ATOL, rtol=0)
    # the command line's model specs and microcnn.load take the file too (any case of the suffix)
    np.testing.assert_array_equal(load_model_spec(str(path)).predict(x), bundled.predict(x))
    upper = path.rename(tmp_path / "LENET.ONNX")
    loaded = microcnn.load(upper)
    assert isinstance(loaded, Sequential) and loaded.config() == bundled.config()
    np.testing.assert_array_equal(loaded.predict(x), bundled.predict(x))


def test_matmul_add_gemm_variants_and_shape_arithmetic_reshape(ort, tmp_path):
    """What exporters write for an MLP: Reshape whose target comes from Shape/Gather/Unsqueeze/Concat,
    MatMul + Add bias, Gemm with transB=0 and a (1, N) bias, Sigmoid, Softmax(axis=-1)."""
    w1, b1, w2, b2 = rand(64, 16), rand(16), rand(16, 5, seed=2), rand(1, 5, seed=3)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Sigmoid", ["h1"], ["h2"]),
             helper.make_node("Gemm", ["h2", "w2", "b2"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
             "minus1": np.array([-1], np.int64), "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    path = write(tmp_path, nodes, inits, in_dims=("N", 1, 8, 8))
    net = load_onnx(path)
    assert [layer.type for layer in net] == ["Flatten", "Linear", "Sigmoid", "Linear", "Softmax"]
    x = images(7, (1, 8, 8))
    h = 1 / (1 + np.exp(-(x.reshape(7, -1).astype(np.float64) @ w1 + b1)))
    np.testing.assert_allclose(net.predict(x), ref.softmax(h @ w2 + b2), atol=PROB_ATOL, rtol=0)
    np.testing.assert_allclose(net.predict(x), ort_run(ort, path, x), atol=PROB_ATOL, rtol=0)


def test_conv_pool_variants_agree_with_onnx_runtime(ort, tmp_path):
    """Conv without bias and with stride/padding, AveragePool, MaxPool with ONNX's default stride 1,
    Identity, Dropout (inference: the identity), Flatten and Clip(0, inf) as ReLU; a fixed batch of 1
    declared in the file does not limit ours."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 1],
                              pads=[1, 0, 1, 0]),
             helper.make_node("Clip", ["c", "lo"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2]),
             helper.make_node("Identity", ["m"], ["i"]),
             helper.make_node("Dropout", ["i"], ["d"]),
             helper.make_node("Flatten", ["d"], ["y"])]
    path = write(tmp_path, nodes, {"w": rand(3, 2, 3, 3), "lo": np.array(0, np.float32)},
                 in_dims=(1, 2, 12, 10))
    net = load_onnx(path)
    assert [layer.type for layer in net] == ["Conv2d", "ReLU", "AvgPool2d", "MaxPool2d", "Flatten"]
    assert net[0].bias is None and net[0].stride == (2, 1) and net[3].stride == (1, 1)
    x = images(1, (2, 12, 10))
    np.testing.assert_allclose(net.forward(x), ort_run(ort, path, x), atol=LOGIT_ATOL, rtol=0)
    assert net.forward(images(5, (2, 12, 10))).shape == (5, 3 * 2 * 3)


def test_every_exportable_layer_round_trips(ort, tmp_path):
    net = Sequential(Conv2d(2, 4, 3, stride=2, padding=1, bias=False), Sigmoid(), AvgPool2d(2),
                     Conv2d(4, 4, (1, 2)), ReLU(), MaxPool2d((2, 1), (1, 1)), Flatten(), Linear(4 * 1 * 2, 3),
                     ReLU(), Linear(3, 2, bias=False), Softmax(), input_shape=(2, 9, 11))
    x = images(4, (2, 9, 11))
    for linear_as in ("gemm", "matmul"):
        path = tmp_path / f"{linear_as}.onnx"
        export_onnx(net, path, linear_as=linear_as)
        back = load_onnx(path)
        assert back.config() == net.config()
        np.testing.assert_array_equal(back.forward(x), net.forward(x))
        np.testing.assert_allclose(ort_run(ort, path, x), net.forward(x), atol=PROB_ATOL, rtol=0)
    logits = to_model_proto(net, softmax=False)
    assert logits.graph.node[-1].op_type == "Gemm"


def test_export_refuses_to_overwrite_and_writes_nothing_on_failure(tmp_path, bundled):
    path = tmp_path / "lenet.onnx"
    export_onnx(bundled, path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        export_onnx(lenet(seed=1), path)
    assert path.read_bytes() == before
    export_onnx(lenet(seed=1), path, overwrite=True)
    assert path.read_bytes() != before
    with pytest.raises(InputError, match="expected a microcnn Sequential or Graph, found dict"):
        export_onnx({}, tmp_path / "x.onnx")
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    with pytest.raises(InputError, match="symbolic link"):
        export_onnx(bundled, link, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx", "link.onnx"]


# -- hostile files: one specific error each -------------------------------------------------------------
def relu(x="x", y="y"):
    return helper.make_node("Relu", [x], [y], name="act")


def test_unsupported_operator_names_node_op_and_file(tmp_path):
    path = write(tmp_path, [helper.make_node("Erf", ["x"], ["y"], name="mystery")])
    with pytest.raises(InputError, match=r"m\.onnx: node 'mystery' \(Erf\): unsupported operator"):
        load_onnx(path)
    path = write(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="ms", domain="com.microsoft")],
                 name="d.onnx")
    with pytest.raises(InputError, match=r"node 'ms' \(Relu\): unsupported operator domain"):
        load_onnx(path)


@pytest.mark.parametrize("dims, match", [
    (("N", 1, "h", "w"), r"only the batch axis may be symbolic"),
    (("N", 1, 1 << 20, 1 << 20), rf"expected fixed C, H, W in 1\.\.{MAX_DIM}"),
    (("N", 2, 8, 8, 1), r"expected images \(batch, C, H, W\) or features \(batch, F\)"),
    (("N", "f"), r"input 'x': expected a fixed feature count"),
    (("N", 64, 4096, 4096), r"input 'x' holds 1073741824 values per image; expected at most"),
])
def test_unresolvable_or_absurd_input_dims(tmp_path, dims, match):
    with pytest.raises(InputError, match=match):
        load_onnx(write(tmp_path, [relu()], in_dims=dims))


def test_flat_feature_inputs_get_a_leading_flatten_and_an_image_shape(ort, tmp_path):
    """An MLP exported from (batch, F): fed images whose C·H·W = F; 784 reads as 1×28×28, a non-square F
    as (F, 1, 1), and ``image_shape`` chooses another layout of the same F."""
    w, b = rand(10, 784), rand(10, seed=2)
    path = write(tmp_path, [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], {"w": w, "b": b},
                 in_dims=("N", 784))
    net = load_onnx(path)
    assert net.input_shape == (1, 28, 28) and [layer.type for layer in net] == ["Flatten", "Linear"]
    x = images(3, (1, 28, 28))
    expected = ort_run(ort, path, x.reshape(3, 784))
    # logits of O(20) here (784 unit-normal weights): a few ulps relative
    np.testing.assert_allclose(net.logits(x), expected, atol=LOGIT_ATOL, rtol=1e-5)
    wide = load_onnx(path, image_shape=(4, 7, 28))
    assert wide.input_shape == (4, 7, 28)
    np.testing.assert_allclose(wide.logits(x.reshape(3, 4, 7, 28)), expected, atol=LOGIT_ATOL, rtol=1e-5)
    with pytest.raises(InputError, match=r"takes 784 features; expected an image_shape .* \(3, 16, 16\)"):
        load_onnx(path, image_shape=(3, 16, 16))
    odd = write(tmp_path, [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
                {"w": rand(10, 30), "b": b}, in_dims=("N", 30), name="odd.onnx")
    assert load_onnx(odd).input_shape == (30, 1, 1)


def test_numbered_kinds_ending_in_a_digit_keep_their_numbers_apart(tmp_path):
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["a"]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["y"])]
    path = write(tmp_path, nodes, {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
    assert load_onnx(path).names == ["relu6_1", "relu6_2"]


def test_external_data_is_refused_without_opening_the_named_path(tmp_path):
    w = numpy_helper.from_array(rand(2, 1, 3, 3), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="/etc/passwd")
    path = write(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"])], {"w": w})
    with pytest.raises(InputError, match=r"initializer 'w' is stored in an external data file"):
        load_onnx(path)


def test_cycles_dangling_inputs_and_duplicate_outputs(tmp_path):
    cycle = [helper.make_node("Relu", ["b"], ["a"], name="n1"),
             helper.make_node("Relu", ["a"], ["b"], name="n2"),
             helper.make_node("Add", ["x", "b"], ["y"], name="n3")]
    with pytest.raises(InputError, match=r"\(Relu\): the graph has a cycle"):
        load_onnx(write(tmp_path, cycle))
    dangling = [helper.make_node("Add", ["x", "ghost"], ["y"], name="n3")]
    with pytest.raises(InputError, match=r"node 'n3' \(Add\): input 'ghost' is produced by no node"):
        load_onnx(write(tmp_path, dangling))
    twice = [relu("x", "y"), helper.make_node("Sigmoid", ["x"], ["y"], name="again")]
    with pytest.raises(InputError, match=r"node 'again' \(Sigmoid\): output 'y' is produced twice"):
        load_onnx(write(tmp_path, twice))
    with pytest.raises(InputError, match=r"graph output 'y' is produced by no node"):
        load_onnx(write(tmp_path, [relu("x", "z")]))


def test_shape_mismatches_name_the_node(tmp_path):
    flat = helper.make_node("Flatten", ["x"], ["f"])
    gemm = [flat, helper.make_node("Gemm", ["f", "w"], ["y"], name="fc", transB=1)]
    with pytest.raises(InputError, match=r"node 'fc' \(Gemm\): weight takes 63 features, found an input "
                                         r"with 64"):
        load_onnx(write(tmp_path, gemm, {"w": rand(5, 63)}))
    conv = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    with pytest.raises(InputError, match=r"node 'conv' \(Conv\): weight \[4, 3, 3, 3\] with group=1 takes 3 "
                                         r"channels, found an input with 1"):
        load_onnx(write(tmp_path, conv, {"w": rand(4, 3, 3, 3)}))
    add = [flat, helper.make_node("Add", ["x", "f"], ["y"], name="sum")]
    with pytest.raises(InputError, match=r"node 'sum' \(Add\): inputs of shapes .* expected equal shapes"):
        load_onnx(write(tmp_path, add))
    big_kernel = [helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[9, 9])]
    with pytest.raises(InputError, match=r"node 'pool' \(MaxPool\): kernel \[9, 9\] is larger"):
        load_onnx(write(tmp_path, big_kernel))
    with pytest.raises(InputError, match=r"output 'y' is declared as \['\?', 64\], the nodes compute "
                                         r"\(batch, 1, 8, 8\)"):
        load_onnx(write(tmp_path, [relu()], out_dims=["N", 64]))
    # other sizes: a warning, as ONNX Runtime gives (exporters declare ONNX's ceil-mode sizes, not torch's)
    path = write(tmp_path, [relu()], out_dims=["N", 1, 8, 9])
    with pytest.warns(RuntimeWarning, match=r"output 'y' is declared as \['\?', 1, 8, 9\], the nodes"):
        assert load_onnx(path).forward(images(1, (1, 8, 8))).shape == (1, 1, 8, 8)


def test_declared_sizes_are_checked_before_anything_large_is_made(tmp_path):
    """A tensor declaring 10^12 values but storing 4, and a convolution whose output would take 4 GiB per
    image: both refused by arithmetic on the declarations, with a small peak allocation."""
    huge = numpy_helper.from_array(rand(2, 2), "w")
    del huge.dims[:]
    huge.dims.extend([1_000_000, 1_000_000])
    path = write(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": huge})
    with pytest.raises(InputError, match=r"initializer 'w' declares the absurd shape \[1000000, 1000000\]"):
        load_onnx(path)
    short = numpy_helper.from_array(rand(2, 2), "w")
    short.dims[0] = 300
    with pytest.raises(InputError, match=r"declares shape \[300, 2\] \(600 values\) but stores 4"):
        load_onnx(write(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": short}))
    wide = [helper.make_node("Conv", ["x", "w"], ["y"], name="wide")]
    path = write(tmp_path, wide, {"w": rand(64, 1, 1, 1)}, in_dims=("N", 1, 4096, 4096))
    error = []
    peak = ref.peak_bytes(lambda: error.append(pytest.raises(InputError, load_onnx, path)))
    assert "node 'wide' (Conv): computes 'y' of the absurd shape (batch, 64, 4096, 4096)" in str(
        error[0].value)
    assert peak < 10 << 20


@pytest.mark.parametrize("opset", [12, 21])
def test_opsets_outside_13_to_20_are_refused(tmp_path, opset):
    with pytest.raises(InputError, match=rf"expected opset 13\.\.20 of the default domain, found {opset}"):
        load_onnx(write(tmp_path, [relu()], opset=opset))


def test_corrupt_missing_and_non_finite_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not protobuf" * 10)
    with pytest.raises(InputError, match=r"bad\.onnx: not an ONNX model"):
        load_onnx(bad)
    with pytest.raises(InputError, match=r"bad\.onnx: not an ONNX model"):  # not a safetensors header error
        microcnn.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_onnx(tmp_path / "missing.onnx")
    w = rand(4, 64)
    w[1, 2] = np.nan
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    with pytest.raises(InputError, match=r"initializer 'w' holds 1 NaN/Inf values"):
        load_onnx(write(tmp_path, nodes, {"w": w}))


@pytest.mark.parametrize("node, inits, match", [
    (helper.make_node("Reshape", ["x", "s"], ["y"], name="r"), {"s": np.array([-1, 1, 8, 8], np.int64)},
     r"node 'r' \(Reshape\): target shape \[-1, 1, 8, 8\].*only a reshape to \(batch, features\)"),
    (helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="c"),
     {"lo": np.array(-1, np.float32), "hi": np.array(1, np.float32)},
     r"Clip\(-1\.0, 1\.0\): expected Clip\(0, 6\)"),
    (helper.make_node("Conv", ["x", "w"], ["y"], name="c", auto_pad="SAME_UPPER"), {"w": rand(1, 1, 3, 3)},
     r"auto_pad=SAME_UPPER; expected explicit pads"),
    (helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 0, 0]), {"w": rand(1, 1, 3, 3)},
     r"pads \[1, 1, 0, 0\]: expected the same padding at both ends"),
    (helper.make_node("MaxPool", ["x"], ["y", "idx"], name="p", kernel_shape=[2, 2]), {},
     r"node 'p' \(MaxPool\): expected one output"),
    (helper.make_node("Conv", ["x"], ["y"], name="c"), {}, r"node 'c' \(Conv\): expected 2\.\.3 inputs"),
    (helper.make_node("Conv", ["x", "x"], ["y"], name="c"), {},
     r"node 'c' \(Conv\): weight 'x': expected a constant"),
    (helper.make_node("Softmax", ["x"], ["y"], name="s"), {}, r"node 's' \(Softmax\): input 'x' has shape "
     r"\(batch, 1, 8, 8\); expected 2 dimensions"),
    (helper.make_node("Add", ["x", "b"], ["y"], name="a"), {"b": rand(8)},
     r"node 'a' \(Add\): an Add of a constant is supported only as the bias right after a MatMul"),
    (helper.make_node("Flatten", ["x"], ["y"], name="f", axis=2), {},
     r"node 'f' \(Flatten\): axis=2: expected 1 \(keep the batch axis\)"),
])
def test_unsupported_forms_of_supported_ops(tmp_path, node, inits, match):
    with pytest.raises(InputError, match=match):
        load_onnx(write(tmp_path, [node], inits))


# -- command line ----------------------------------------------------------------------------------------
def test_command_line_takes_onnx_models(ort, tmp_path, capsys, bundled, mnist_test):
    """``eval`` scores the file as the bundled model it was exported from; ``compare`` gives ONNX Runtime
    the original file (its byte count is the file's) and microcnn the imported graph."""
    import json

    from microcnn import cli

    path = tmp_path / "lenet.onnx"
    export_onnx(bundled, path)
    assert cli.main(["eval", "--model", str(path), "--samples", "300", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == bundled.accuracy(*(a[:300] for a in mnist_test))
    assert cli.main(["compare", "--model", str(path), "--samples", "50", "--repeats", "1", "--systems",
                     "onnxruntime", "--precisions", "fp32", "--json"]) == 0
    rows = {r["system"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["ONNX Runtime"]["model_bytes"] == path.stat().st_size
    assert rows["ONNX Runtime"]["accuracy"] == rows["microcnn"]["accuracy"]


def test_missing_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"from_torch needs .* torch.*-e \"\.\[compare"):
        microcnn.from_torch(object())
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingDependencyError, match=r"ONNX import/export needs .* onnx.*-e \"\.\[onnx\]\""):
        load_onnx(tmp_path / "m.onnx")
    with pytest.raises(MissingDependencyError, match=r"\.\[onnx\]"):
        export_onnx(microcnn.lenet(), tmp_path / "m.onnx")


@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_mean_over_h_and_w_is_global_average_pooling(ort, tmp_path, opset):
    """``x.mean((2, 3))`` as exporters write it: axes an attribute before opset 18, an input from 18."""
    axes = {"axes": [-1, 2]} if opset == 17 else {}
    inputs = ["c"] if opset == 17 else ["c", "axes"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("ReduceMean", inputs, ["m"], keepdims=0, **axes),
             helper.make_node("Gemm", ["m", "fc"], ["y"], transB=1)]
    inits = {"w": rand(4, 1, 3, 3), "fc": rand(3, 4), "axes": np.array([2, 3], np.int64)}
    path = write(tmp_path, nodes, inits if opset == 18 else {k: v for k, v in inits.items() if k != "axes"},
                 opset=opset)
    net = load_onnx(path)
    assert [layer.type for layer in net] == ["Conv2d", "GlobalAvgPool2d", "Flatten", "Linear"]
    x = images(5, (1, 8, 8))
    np.testing.assert_allclose(net.forward(x), ort_run(ort, path, x), atol=LOGIT_ATOL, rtol=0)
    bad = write(tmp_path, [helper.make_node("ReduceMean", ["x"], ["y"], name="r", axes=[1])], name="bad.onnx")
    with pytest.raises(InputError, match=r"node 'r' \(ReduceMean\): axes \[1\]: expected the mean over H"):
        load_onnx(bad)


def test_widget_upload_takes_onnx_files_with_the_files_checks(tmp_path, bundled):
    from microcnn.widgets import load_model_bytes

    path = tmp_path / "l.onnx"
    export_onnx(bundled, path)
    x = np.random.default_rng(3).random((5, 1, 28, 28), dtype=np.float32)
    model = load_model_bytes("mine.onnx", path.read_bytes())
    assert np.array_equal(model.predict(x), bundled.predict(x)) and len(model.trace(x[:1])) == len(bundled)
    with pytest.raises(microcnn.MicrocnnError, match="mine.onnx") as info:
        load_model_bytes("mine.onnx", path.read_bytes()[:-40])  # truncated: the file's error, its name
    assert "microcnn-upload-" not in str(info.value)
