"""The ``.raw`` format and the checks every loaded model file goes through (``io.py``'s second part), on
tiny synthetic networks and files: exact bytes and loaded values, and each refusal with its own
``what``/``expected``/``found`` at its exact boundary (a later check raising instead means the first one
is missing). Expected numbers are computed here from the layer formulas, not read from the code.
Nothing here runs a kernel: every test takes milliseconds."""

import json

import numpy as np
import pytest

from microcnn import io
from microcnn.errors import FileFormatError, InputError
from microcnn.layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid, Softmax
from microcnn.network import Sequential

LIMIT = 2**26  # io.MAX_ACTIVATION_ELEMENTS, written out: the documented bound per image
F32_MAX = float(np.finfo(np.float32).max)


def refused(call, *args, **kwargs) -> FileFormatError:
    with pytest.raises(FileFormatError) as info:
        call(*args, **kwargs)
    return info.value


def small_net(bias=False):
    """Non-square everything: a (1, 2) kernel over 2 channels, a Linear without bias (27 parameters)."""
    net = Sequential(Conv2d(2, 3, (1, 2), rng=np.random.default_rng(1)), Flatten(),
                     Linear(6, 2, bias=bias, rng=np.random.default_rng(2)), input_shape=(2, 1, 3))
    return net


def numbered(net):
    """Give every parameter distinct values: 0.25, 0.5, ... in file order; returns the flat values."""
    flat = (np.arange(net.num_parameters, dtype=np.float32) + 1) / 4
    offset = 0
    for p in net.parameters():
        p.data[...] = flat[offset:offset + p.data.size].reshape(p.data.shape)
        offset += p.data.size
    return flat


# -- .raw ------------------------------------------------------------------------------------------------
def test_save_raw_writes_every_parameter_in_order_as_little_endian_float32(tmp_path):
    net = small_net()
    flat = numbered(net)
    assert flat.size == 3 * 2 * 1 * 2 + 3 + 2 * 6 == 27
    io.save_raw(net, tmp_path / "m.raw")
    assert (tmp_path / "m.raw").read_bytes() == flat.astype("<f4").tobytes()


def test_load_raw_fills_each_parameter_from_its_own_slice(tmp_path):
    values = (np.arange(27, dtype=np.float32) - 13) / 8
    (tmp_path / "m.raw").write_bytes(values.astype("<f4").tobytes())
    net = small_net()
    assert io.load_raw(net, tmp_path / "m.raw") is None
    np.testing.assert_array_equal(net[0].weight.data, values[:12].reshape(3, 2, 1, 2))
    np.testing.assert_array_equal(net[0].bias.data, values[12:15])
    np.testing.assert_array_equal(net[2].weight.data, values[15:].reshape(2, 6))
    assert net[2].bias is None


@pytest.mark.parametrize("size, found", [(104, "104 bytes (26 floats)"), (112, "112 bytes (28 floats)"),
                                         (107, "107 bytes"), (0, "0 bytes (0 floats)")])
def test_load_raw_names_both_sizes_and_loads_nothing(tmp_path, size, found):
    (tmp_path / "m.raw").write_bytes(b"\x00" * size)
    net = small_net()
    before = net.state_dict()
    err = refused(io.load_raw, net, tmp_path / "m.raw")
    assert (err.path, err.what) == (str(tmp_path / "m.raw"), "weight file size does not match the network")
    assert (err.expected, err.found) == ("108 bytes (27 float32 parameters)", found)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_raw_notices_a_file_that_shrank_after_its_size_was_read(tmp_path, monkeypatch):
    (tmp_path / "m.raw").write_bytes(b"\x00" * 100)
    monkeypatch.setattr(io, "_file_size", lambda path, what: 108)  # the size stat() saw a moment ago
    err = refused(io.load_raw, small_net(), tmp_path / "m.raw")
    assert (err.what, err.expected, err.found) == ("weight file changed while reading", "108 bytes",
                                                   "100 bytes")


def test_load_raw_names_the_non_finite_tensor_and_loads_nothing(tmp_path):
    values = np.ones(27, np.float32)
    values[13] = np.nan  # 0.bias[1]
    (tmp_path / "m.raw").write_bytes(values.tobytes())
    net = small_net()
    before = net.state_dict()
    err = refused(io.load_raw, net, tmp_path / "m.raw")
    assert (err.path, err.what) == (str(tmp_path / "m.raw"), "tensor 0.bias holds 1 NaN/Inf values")
    assert (err.expected, err.found) == ("finite weights", "1 non-finite")
    np.testing.assert_array_equal(net[0].weight.data, before["0.weight"])


def test_weight_files_are_bounded_at_exactly_max_file_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "MAX_FILE_BYTES", 110)
    (tmp_path / "m.raw").write_bytes(b"\x00" * 110)  # at the bound: only the size check refuses it
    assert refused(io.load_raw, small_net(), tmp_path / "m.raw").what == ("weight file size does not "
                                                                         "match the network")
    (tmp_path / "m.raw").write_bytes(b"\x00" * 111)
    err = refused(io.load_raw, small_net(), tmp_path / "m.raw")
    assert (err.what, err.expected, err.found) == ("weight file is implausibly large", "<= 110 bytes",
                                                   "111 bytes")


@pytest.mark.parametrize("save", [io.save_raw, io.save_model])
def test_non_finite_parameters_are_never_saved(tmp_path, save):
    net = small_net()
    net[2].weight.data[1, 4] = np.inf  # one bad value among finite ones, in the last tensor
    path = tmp_path / "m.out"
    with pytest.raises(InputError, match=r"m.out: not saved: parameter 2.weight holds 1 NaN/Inf values"):
        save(net, path)
    assert not path.exists()


# -- check_finite and check_weights ----------------------------------------------------------------------
def test_check_finite_counts_the_non_finite_values_and_ignores_non_float_arrays():
    assert io.check_finite("f", "t", np.array([1.0, 2.0], np.float32)) is None
    assert io.check_finite("f", "t", np.array([1, 2], np.int64)) is None
    assert io.check_finite("f", "t", np.array(["nan"])) is None  # only float arrays hold NaN/Inf
    err = refused(io.check_finite, "f.bin", "w", np.array([1.0, np.nan, -np.inf, 3.0], np.float64))
    assert (err.path, err.what, err.expected, err.found) == ("f.bin", "tensor w holds 2 NaN/Inf values",
                                                             "finite weights", "2 non-finite")


def test_check_weights_refuses_f64_values_beyond_float32_and_admits_its_largest():
    ok = np.array([F32_MAX, -F32_MAX, 0.0], np.float64)
    assert io.check_weights("f", "t", ok) is None
    assert io.check_weights("f", "t", np.zeros((0, 3), np.float64)) is None
    err = refused(io.check_weights, "f.bin", "w", np.array([1.0, -1e39, 2.0]))
    assert (err.path, err.what) == ("f.bin", "tensor w holds 1 values beyond float32's range")
    assert err.expected == f"|w| <= {F32_MAX:.4g} (weights run in float32)"
    assert err.found == "largest |w| 1e+39"
    err = refused(io.check_weights, "f.bin", "w", np.array([np.nan, 1e39]))
    assert err.what == "tensor w holds 1 NaN/Inf values"  # finiteness first


# -- save_model and read_model_state ---------------------------------------------------------------------
def test_save_model_stores_weights_architecture_and_extra_metadata(tmp_path):
    net = small_net(bias=False)
    numbered(net)
    io.save_model(net, tmp_path / "a.safetensors")
    tensors, metadata = io.read_safetensors(tmp_path / "a.safetensors")
    assert metadata == {"format": "microcnn", "format_version": "1", "kind": "fp32",
                        "architecture": json.dumps(net.config())}
    assert list(tensors) == ["0.weight", "0.bias", "2.weight"]
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(tensors[k], v)
    io.save_model(net, tmp_path / "b.safetensors", {"note": 7, "kind": "fp32"})
    assert io.read_safetensors(tmp_path / "b.safetensors")[1]["note"] == "7"


def test_read_model_state_returns_the_checked_tensors(tmp_path):
    net = small_net(bias=True)
    flat = numbered(net)
    io.save_model(net, tmp_path / "m.safetensors")
    for expected in (None, net.config()):
        tensors = io.read_model_state(tmp_path / "m.safetensors", expected=expected)
        assert list(tensors) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        np.testing.assert_array_equal(np.concatenate([t.reshape(-1) for t in tensors.values()]), flat)


def test_read_model_state_of_a_file_without_metadata_checks_the_tensors_against_the_network(tmp_path):
    net = small_net(bias=True)
    state = net.state_dict()
    io.write_safetensors(tmp_path / "plain.safetensors", state)
    tensors = io.read_model_state(tmp_path / "plain.safetensors", expected=net.config())
    assert set(tensors) == set(state)
    del state["2.bias"]
    io.write_safetensors(tmp_path / "short.safetensors", state)
    err = refused(io.read_model_state, tmp_path / "short.safetensors", expected=net.config())
    assert (err.path, err.what) == (str(tmp_path / "short.safetensors"),
                                    "tensors do not match the architecture (first: 2.bias)")
    assert (err.expected, err.found) == ((2,), "missing")


def test_read_model_state_refuses_other_kinds_and_other_architectures(tmp_path):
    net = small_net()
    io.save_model(net, tmp_path / "q.safetensors", {"kind": "int8"})
    err = refused(io.read_model_state, tmp_path / "q.safetensors")
    assert (err.what, err.expected, err.found) == ("expected FP32 weights", "kind=fp32", "kind=int8")
    # the same tensors, another activation: only the layer list tells them apart
    other = Sequential(Conv2d(2, 3, (1, 2)), Sigmoid(), Flatten(), Linear(6, 2))
    mine = Sequential(Conv2d(2, 3, (1, 2)), ReLU(), Flatten(), Linear(6, 2))
    io.save_model(other, tmp_path / "o.safetensors")
    err = refused(io.read_model_state, tmp_path / "o.safetensors", expected=mine.config())
    assert err.what == "architecture differs from the network being loaded"
    assert (err.expected, err.found) == (["Conv2d", "ReLU", "Flatten", "Linear"],
                                         ["Conv2d", "Sigmoid", "Flatten", "Linear"])


def test_read_model_state_refuses_non_finite_and_out_of_range_weights(tmp_path):
    state = small_net().state_dict()
    state["0.bias"][2] = np.nan
    io.write_safetensors(tmp_path / "nan.safetensors", state)
    err = refused(io.read_model_state, tmp_path / "nan.safetensors")
    assert (err.path, err.what) == (str(tmp_path / "nan.safetensors"), "tensor 0.bias holds 1 NaN/Inf values")
    state = {k: v.astype(np.float64) for k, v in small_net().state_dict().items()}
    state["2.weight"][1, 5] = 4e38
    io.write_safetensors(tmp_path / "big.safetensors", state)
    err = refused(io.read_model_state, tmp_path / "big.safetensors")
    assert err.what == "tensor 2.weight holds 1 values beyond float32's range"


# -- architecture_of --------------------------------------------------------------------------------------
ARCH = json.dumps({"layers": [{"type": "ReLU"}]})


def test_architecture_of_returns_the_parsed_architecture():
    relu = {"format": "microcnn", "architecture": ARCH}
    assert io.architecture_of("f", relu) == {"layers": [{"type": "ReLU"}]}
    assert io.architecture_of("f", {"format": "microcnn", "architecture": '{"layers": []}'}) == {"layers": []}


@pytest.mark.parametrize("metadata, what, expected, found", [
    ({"architecture": ARCH}, "not a microcnn model (no architecture in __metadata__)", "format=microcnn",
     None),
    ({"format": "other", "architecture": ARCH}, "not a microcnn model (no architecture in __metadata__)",
     "format=microcnn", "other"),
    ({"format": "microcnn"}, "architecture metadata missing or invalid (no 'architecture' key)", None, None),
    ({"format": "microcnn", "architecture": '{"layers": [], "layers": []}'},
     "architecture metadata missing or invalid (architecture refused: duplicate key 'layers')", None, None),
    ({"format": "microcnn", "architecture": "["}, "architecture metadata missing or invalid (architecture is "
     "not valid JSON (JSONDecodeError: Expecting value: line 1 column 2 (char 1)))", None, None),
    ({"format": "microcnn", "architecture": "[1]"}, "architecture metadata malformed",
     '{"layers": [{...}, ...]}', "[1]"),
    ({"format": "microcnn", "architecture": '{"layers": {}}'}, "architecture metadata malformed",
     '{"layers": [{...}, ...]}', '{"layers": {}}'),
    ({"format": "microcnn", "architecture": '{"layers": [1]}'}, "architecture metadata malformed",
     '{"layers": [{...}, ...]}', '{"layers": [1]}'),
    ({"format": "microcnn", "architecture": '{"layers": [{"type": "ReLU"}, 2]}'},
     "architecture metadata malformed", '{"layers": [{...}, ...]}', '{"layers": [{"type": "ReLU"}, 2]}'),
])
def test_architecture_of_refusals(metadata, what, expected, found):
    err = refused(io.architecture_of, "m.safetensors", metadata)
    assert (err.path, err.what, err.expected, err.found) == ("m.safetensors", what, expected, found)


# -- check_declared_sizes ---------------------------------------------------------------------------------
def lin(i, o, bias=True):
    return {"type": "Linear", "in_features": i, "out_features": o, "bias": bias}


FP32_ARCH = {"layers": [lin(3, 2), {"type": "ReLU"}, lin(2, 4, bias=False)]}
F32 = np.dtype("<f4")
FP32_ENTRIES = {"0.weight": (F32, (2, 3)), "0.bias": (F32, (2,)), "2.weight": (F32, (4, 2))}


def test_fp32_tensors_must_be_exactly_the_declared_ones():
    assert io.check_declared_sizes("f", FP32_ARCH, FP32_ENTRIES, "fp32") is None
    cases = [  # (entries, first name, expected, found)
        ({**FP32_ENTRIES, "9.extra": (F32, (1,))}, "9.extra", "no such tensor", (1,)),
        ({k: v for k, v in FP32_ENTRIES.items() if k != "2.weight"}, "2.weight", (4, 2), "missing"),
        ({**FP32_ENTRIES, "0.bias": (F32, (3,))}, "0.bias", (2,), (3,)),  # not the first key
        ({**FP32_ENTRIES, "2.weight": (F32, (2, 4))}, "2.weight", (4, 2), (2, 4)),
    ]
    for entries, name, expected, found in cases:
        err = refused(io.check_declared_sizes, "m.safetensors", FP32_ARCH, entries, "fp32")
        assert err.path == "m.safetensors"
        assert err.what == f"tensors do not match the architecture (first: {name})"
        assert (err.expected, err.found) == (expected, found)


def test_an_invalid_layer_is_named_by_its_index():
    arch = {"layers": [lin(3, 2), lin(2, 0)]}
    err = refused(io.check_declared_sizes, "m.safetensors", arch, {}, "fp32")
    assert err.what.startswith("architecture layer 1 is invalid (") and "out_features" in err.what


def test_quantized_kinds_store_between_2_bits_and_16_bytes_per_parameter():
    # 2*3 + 2 + 4*2 = 16 parameters in 3 layers: at least 4 bytes, at most 16*16 + 64*(3+2) = 576 bytes
    arch, u8 = FP32_ARCH, np.dtype("u1")
    for entries in ({"a": (u8, (4,))}, {"a": (u8, (8,))}, {"a": (F32, (2,))}, {"a": (u8, (576,))},
                    {"a": (F32, (144,))},
                    {"a": (u8, (500,)), "b": (np.dtype("<i4"), (19,))}):
        assert io.check_declared_sizes("f", arch, entries, "int8") is None
    err = refused(io.check_declared_sizes, "m.safetensors", arch, {"a": (u8, (1,)), "b": (u8, (2,))}, "w2a2")
    assert (err.what, err.expected, err.found) == ("architecture declares more parameters than the file can "
                                                   "hold", "<= 12 (2 bits each in 3 bytes)", "16 parameters")
    err = refused(io.check_declared_sizes, "m.safetensors", arch, {"a": (F32, (144,)), "b": (u8, (1,))},
                  "compressed-int8")
    assert (err.what, err.expected, err.found) == ("tensors hold more data than the architecture can use",
                                                   "<= 576 bytes for 16 parameters", "577 bytes")


# -- check_activation_sizes: declared input shape ---------------------------------------------------------
def test_declared_input_shapes_pass_at_the_bound_and_fail_one_over():
    assert io.check_activation_sizes("f", Sequential(ReLU(), input_shape=(1, 2**13, 2**13))) is None
    wide = Sequential(ReLU(), input_shape=(1, 2**13, 2**13 + 1))
    err = refused(io.check_activation_sizes, "m.safetensors", wide)
    assert (err.path, err.what) == ("m.safetensors", "architecture input_shape is implausibly large")
    assert (err.expected, err.found) == (f"<= {LIMIT} values per image", [1, 8192, 8193])


def test_a_declared_network_follows_its_own_shapes():
    net = Sequential(Conv2d(3, 4, (2, 3)), ReLU(), MaxPool2d((2, 1)), Conv2d(4, 2, 1), Flatten(),
                     Linear(2 * 2 * 3, 5), Softmax(), input_shape=(3, 5, 5))
    assert io.check_activation_sizes("f", net) is None  # (3,5,5) -> (4,4,3) -> (4,2,3) -> (2,2,3) -> 12


@pytest.mark.parametrize("net, layer, kind", [
    (Sequential(Conv2d(3, 1, 3), input_shape=(1, 8, 8)), 0, "Conv2d"),
    (Sequential(ReLU(), Conv2d(3, 1, 3), input_shape=(1, 8, 8)), 1, "Conv2d"),
    (Sequential(Conv2d(1, 2, 3), Conv2d(1, 1, 1), input_shape=(1, 8, 8)), 1, "Conv2d"),
    (Sequential(MaxPool2d((2, 9)), input_shape=(1, 8, 8)), 0, "MaxPool2d"),
    (Sequential(Flatten(), Linear(63, 2), input_shape=(1, 8, 8)), 1, "Linear"),
    (Sequential(Softmax(), input_shape=(1, 8, 8)), 0, "Softmax"),
])
def test_a_layer_that_does_not_fit_its_declared_input_is_named(net, layer, kind):
    err = refused(io.check_activation_sizes, "m.safetensors", net)
    assert err.what.startswith(f"architecture layer {layer} ({kind}) does not fit its input (")
    assert (err.expected, err.found) == (None, None)


def test_the_zero_padded_copy_counts_and_is_computed_per_axis():
    # input (3, 5, 7), padding (3000, 4000): the output is 6005 x 8007 (48 M values, under the bound),
    # the padded copy 3 x 6005 x 8007 (144 M, over it)
    net = Sequential(Conv2d(3, 1, 1, padding=(3000, 4000)), input_shape=(3, 5, 7))
    err = refused(io.check_activation_sizes, "m.safetensors", net)
    assert err.what == "architecture layer 0 (Conv2d) needs implausibly large activations"
    assert (err.expected, err.found) == (f"<= {LIMIT} values per image", 3 * (5 + 6000) * (7 + 8000))


def test_a_layer_output_is_bounded_at_exactly_the_limit():
    # a 1x1 convolution from 1 to 4 channels over 4096 x 4096: the output is exactly 2**26 values
    ok = Sequential(Conv2d(1, 4, 1), input_shape=(1, 4096, 4096))
    assert io.check_activation_sizes("f", ok) is None
    over = Sequential(Conv2d(1, 4, 1), input_shape=(1, 4096, 4097))
    err = refused(io.check_activation_sizes, "m.safetensors", over)
    assert err.found == 4 * 4096 * 4097


# -- check_activation_sizes without an input shape: the default input, fitted to each layer ---------------
def default_refusal(net):
    """The (layer, default input, found) of the guard's refusal of ``net`` (declared without input)."""
    err = refused(io.check_activation_sizes, "m.safetensors", net)
    note = "; the file declares no input_shape, checked from the default input "
    head, _, default = err.what.partition(note)
    assert head.startswith("architecture layer ") and head.endswith("needs implausibly large activations")
    assert err.expected == f"<= {LIMIT} values per image"
    return head.removeprefix("architecture layer ").split(" needs")[0], default, err.found


PAD = (4000, 5000)  # a forged padding: the padded copy of even a 1 x 1 map is 8001 x 10001 (80 M) values


def test_the_default_input_takes_the_first_convolutions_channels():
    assert default_refusal(Sequential(ReLU(), AvgPool2d(1), Conv2d(2, 1, 1, padding=PAD))) == \
        ("2 (Conv2d)", "[2, 28, 28]", 2 * (28 + 8000) * (28 + 10000))
    # a Linear or Flatten first: one channel, whatever convolution comes later
    assert default_refusal(Sequential(Linear(5, 4), Conv2d(3, 1, 1, padding=PAD))) == \
        ("1 (Conv2d)", "[1, 28, 28]", 3 * (1 + 8000) * (1 + 10000))
    assert default_refusal(Sequential(Flatten(), Conv2d(3, 1, 1, padding=PAD))) == \
        ("1 (Conv2d)", "[1, 28, 28]", 3 * (1 + 8000) * (1 + 10000))
    # no convolution at all: one channel
    assert default_refusal(Sequential(ReLU(), MaxPool2d((8192, 8193)))) == ("1 (MaxPool2d)", "[1, 28, 28]",
                                                                         8192 * 8193)


def test_the_default_input_is_fitted_to_every_layer_in_turn():
    # conv1 keeps 28 x 28 (its (5, 3) kernel fits): out (2, 26, 26); the (2, 3) pool: (2, 13, 8);
    # the forged conv2 pads that: 2 x (13 + 8000) x (8 + 10000)
    net = Sequential(Conv2d(1, 2, (5, 3), padding=(1, 0)), ReLU(), MaxPool2d((2, 3)),
                     Conv2d(2, 1, 1, padding=PAD))
    assert default_refusal(net) == ("3 (Conv2d)", "[1, 28, 28]", 2 * (13 + 8000) * (8 + 10000))


def test_a_kernel_larger_than_the_default_image_gets_an_input_it_fits():
    # kernel (40, 35), padding (2, 1): the nearest input is 36 x 33 (40 - 4, 35 - 2), giving a 1 x 1 output
    net = Sequential(Conv2d(1, 1, (40, 35), padding=(2, 1)), Conv2d(1, 1, 1, padding=PAD))
    assert default_refusal(net) == ("1 (Conv2d)", "[1, 28, 28]", (1 + 8000) * (1 + 10000))
    # pools have no padding: a (40, 30) window gets a 40 x 30 input and works
    fits = Sequential(MaxPool2d((40, 30)), Flatten(), Linear(1, 3), ReLU(), Linear(3, 2), Softmax())
    assert io.check_activation_sizes("f", fits) is None


def test_after_flattening_a_window_layer_gets_a_single_pixel():
    # Linear -> (6,), then a pool 1 x 2**27: its nearest input is (1, 1, 2**27) -- refused before it is used
    net = Sequential(Linear(4, 6), MaxPool2d((1, 2**27)))
    assert default_refusal(net) == ("1 (MaxPool2d)", "[1, 28, 28]", 2**27)


def test_a_fitted_input_is_bounded_at_exactly_the_limit_before_the_layer_runs():
    assert io.check_activation_sizes("f", Sequential(MaxPool2d((2**13, 2**13)))) is None
    # 82700 channels: the default input (82700, 28, 28) is within the bound, the input fitted to a
    # (31, 1) kernel with padding (1, 0), (82700, 29, 28), is not -- refused before the layer's own sizes
    # (its padded copy, 82700 x 31 x 28, is larger still)
    net = Sequential(Conv2d(82_700, 1, (31, 1), padding=(1, 0), bias=False))
    assert 82_700 * 28 * 28 <= LIMIT
    assert default_refusal(net) == ("0 (Conv2d)", "[82700, 28, 28]", 82_700 * 29 * 28)


def test_read_model_state_reads_a_graphs_file(tmp_path):
    from microcnn.graph import Add, Graph

    rng = np.random.default_rng(3)
    g = Graph([("conv", Conv2d(1, 2, (3, 2), padding=(1, 0), rng=rng), ["x"]), ("relu", ReLU(), ["conv"]),
               ("res", Add(), ["conv", "relu"]), ("flat", Flatten(), ["res"]),
               ("fc", Linear(2 * 5 * 3, 3, rng=rng), ["flat"])],
              inputs="x", outputs="fc", input_shape=(1, 5, 4))
    io.save_model(g, tmp_path / "g.safetensors")
    tensors = io.read_model_state(tmp_path / "g.safetensors")
    assert sorted(tensors) == ["conv.bias", "conv.weight", "fc.bias", "fc.weight"]
    np.testing.assert_array_equal(tensors["conv.weight"], g.state_dict()["conv.weight"])
