"""Calibration files (``Calibration.save`` / ``Calibration.load``, ``quant/serialize.py``) on a tiny
non-square network: the exact file layout, round trips of every observer kind, and every check of the
reader at its boundary with its own field, expectation and finding (a later check answering instead
means the first one is missing). Files are rewritten field by field with ``io.write_safetensors``."""

import json

import numpy as np
import pytest

from microcnn import io
from microcnn.errors import FileFormatError
from microcnn.layers import Conv2d, Flatten, Linear, ReLU
from microcnn.network import Sequential
from microcnn.quant import Calibration, calibrate, load_calibration
from microcnn.quant.serialize import MAX_SEED, observer_state_layout

NAMES = ["input", "conv1", "relu1", "flatten", "fc1"]
OPTIONS = {"minmax": {}, "ema": {"averaging_constant": 0.25}, "percentile": {"bins": 64, "percentile": 99.0},
           "mse": {"bins": 64, "candidates": 5}, "entropy": {"bins": 64, "max_candidates": 8}}
I64, F64 = np.dtype(np.int64), np.dtype(np.float64)


def tiny():
    return Sequential(Conv2d(1, 2, (2, 1), rng=np.random.default_rng(0)), ReLU(), Flatten(),
                      Linear(12, 3, rng=np.random.default_rng(1)), input_shape=(1, 3, 3))


@pytest.fixture(scope="module")
def cals():
    net = tiny()
    images = np.random.default_rng(5).normal(size=(30, 1, 3, 3)).astype(np.float32)
    return net, {m: calibrate(net, images, method=m, samples=20, progress=False, seed=7, **o)
                 for m, o in OPTIONS.items()}


def saved(tmp_path, cal, name="c.safetensors"):
    path = tmp_path / name
    cal.save(path)
    return path


def rewrite(path, meta=None, tensors=None):
    """The file at ``path`` with metadata fields replaced (``None`` removes one) and tensors changed."""
    data, metadata = io.read_safetensors(path)
    for k, v in (meta or {}).items():
        if v is None:
            metadata.pop(k)
        else:
            metadata[k] = v if k == "architecture" else json.dumps(v)  # the others are stored as JSON
    if tensors:
        tensors(data)
    io.write_safetensors(path, data, metadata)
    return path


def refusal(path, net=None):
    with pytest.raises(FileFormatError) as info:
        Calibration.load(path, net)
    err = info.value
    assert err.path == str(path)
    return err.what, err.expected, err.found


# -- layout and round trips -----------------------------------------------------------------------------
def test_state_layout_per_kind():
    assert observer_state_layout("minmax", {}) == {"minmax": (F64, (2,)), "count": (I64, (1,))}
    assert observer_state_layout("ema", {"averaging_constant": 0.5}) == {"minmax": (F64, (2,)),
                                                                         "count": (I64, (1,))}
    for kind in ("percentile", "mse", "entropy"):
        assert observer_state_layout(kind, {"bins": 68}) == {"pos": (I64, (68,)), "neg": (I64, (68,)),
                                                             "scalars": (F64, (3,)), "count": (I64, (1,))}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_the_file_holds_images_states_and_settings(cals, tmp_path, method):
    net, cal = cals[0], cals[1][method]
    tensors, metadata = io.read_safetensors(saved(tmp_path, cal))
    assert metadata == {"format": "microcnn", "format_version": "1", "kind": "calibration",
                        "architecture": json.dumps(net.config()), "method": json.dumps(method),
                        "observers": json.dumps([{"tensor": t, "kind": method, "params": OPTIONS[method]}
                                                 for t in NAMES]),
                        "seed": "7"}
    np.testing.assert_array_equal(tensors.pop("images"), cal.images)
    assert cal.images.shape == (20, 1, 3, 3)
    layout = observer_state_layout(method, OPTIONS[method])
    assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {f"{t}.{k}": v for t in NAMES
                                                                   for k, v in layout.items()}
    for t in NAMES:
        for k, v in cal.observer(t).state().items():
            np.testing.assert_array_equal(tensors[f"{t}.{k}"], v)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_a_saved_calibration_loads_back_the_same(cals, tmp_path, method):
    net, cal = cals[0], cals[1][method]
    path = saved(tmp_path, cal)
    for against in (net, None):
        back = Calibration.load(path, against)
        assert (back.method, back.names, back.seed, back.architecture) == (method, NAMES, 7, net.config())
        np.testing.assert_array_equal(back.images, cal.images)
        assert back.images.dtype == np.float32
        for t in NAMES:
            a, b = back.observer(t), cal.observer(t)
            assert (a.kind, a.tensor, a.params()) == (b.kind, b.tensor, b.params())
            assert a.state().keys() == b.state().keys()
            for k, v in b.state().items():
                np.testing.assert_array_equal(a.state()[k], v)
            assert a.range(4) == b.range(4)


def test_a_file_without_seed_has_seed_0_and_any_seed_up_to_the_limit_loads(cals, tmp_path):
    path = saved(tmp_path, cals[1]["minmax"])
    assert Calibration.load(rewrite(path, {"seed": None})).seed == 0
    assert Calibration.load(rewrite(path, {"seed": MAX_SEED})).seed == 2**63 - 1


def test_without_an_input_shape_images_of_any_size_load(cals, tmp_path):
    net, cal = cals[0], cals[1]["minmax"]
    arch = {**net.config(), "input_shape": None}
    path = rewrite(saved(tmp_path, cal), {"architecture": json.dumps(arch)},
                   lambda t: t.__setitem__("images", np.zeros((2, 1, 5, 4), np.float32)))
    assert Calibration.load(path).images.shape == (2, 1, 5, 4)


# -- refusals of the metadata -----------------------------------------------------------------------------
def test_a_calibration_of_one_image_saves_and_loads(tmp_path):
    net = tiny()
    one = np.random.default_rng(6).normal(size=(1, 1, 3, 3)).astype(np.float32)
    cal = calibrate(net, one, method="minmax", progress=False)
    back = Calibration.load(saved(tmp_path, cal), net)
    assert back.images.shape == (1, 1, 3, 3) and back.range(NAMES[0], 8) == cal.range(NAMES[0], 8)


def test_load_calibration_is_calibration_load(cals, tmp_path):
    net, cal = cals[0], cals[1]["mse"]
    path = saved(tmp_path, cal)
    back = load_calibration(path, net)
    assert isinstance(back, Calibration) and (back.method, back.names) == ("mse", NAMES)
    np.testing.assert_array_equal(back.images, cal.images)
    assert load_calibration(path).range(NAMES[1], 4) == cal.range(NAMES[1], 4)
    other = Sequential(Conv2d(1, 2, (2, 1)), ReLU(), Flatten(), Linear(12, 4))
    with pytest.raises(FileFormatError):  # the network is passed on: a mismatch is refused
        load_calibration(path, other)


def test_a_model_file_is_not_a_calibration(cals, tmp_path):
    io.save_model(cals[0], tmp_path / "m.safetensors")
    assert refusal(tmp_path / "m.safetensors") == ("not a calibration file", "kind=calibration", "kind=fp32")


def test_the_architecture_must_name_its_layers_and_match_the_network(cals, tmp_path):
    net, cal = cals[0], cals[1]["minmax"]
    arch = net.config()
    arch["layers"][1] = {"type": 7}
    path = rewrite(saved(tmp_path, cal), {"architecture": json.dumps(arch)})
    assert refusal(path) == ("calibration field architecture.layers", "a type name per layer",
                             "['Conv2d', 7, 'Flatten', 'Linear']")
    other = Sequential(Conv2d(1, 2, (2, 1)), ReLU(), Flatten(), Linear(12, 4))
    assert refusal(saved(tmp_path, cal, "d.safetensors"), other) == (
        "calibration statistics belong to another architecture", ["Conv2d", "ReLU", "Flatten", "Linear"],
        ["Conv2d", "ReLU", "Flatten", "Linear"])


@pytest.mark.parametrize("meta, expected", [
    ({"method": None}, ("metadata 'method' missing", None, None)),
    ({"method": "kmeans"}, ("calibration field method",
                            "one of ['ema', 'entropy', 'minmax', 'mse', 'percentile']", "kmeans")),
    ({"method": 3}, ("calibration field method", "one of ['ema', 'entropy', 'minmax', 'mse', 'percentile']",
                     "3")),
    ({"seed": -1}, ("calibration field seed", f"an integer in 0..{MAX_SEED}", "-1")),
    ({"seed": MAX_SEED + 1}, ("calibration field seed", f"an integer in 0..{MAX_SEED}", str(2**63))),
    ({"seed": True}, ("calibration field seed", f"an integer in 0..{MAX_SEED}", "True")),
    ({"seed": 1.0}, ("calibration field seed", f"an integer in 0..{MAX_SEED}", "1.0")),
    ({"observers": None}, ("metadata 'observers' missing", None, None)),
    ({"method": "m" * 300}, ("calibration field method",  # a long value is cut at 120 characters
                             "one of ['ema', 'entropy', 'minmax', 'mse', 'percentile']", "m" * 120)),
])
def test_metadata_refusals(cals, tmp_path, meta, expected):
    path = rewrite(saved(tmp_path, cals[1]["minmax"]), meta)
    for against in (cals[0], None):
        assert refusal(path, against) == expected


def observers_with(method, change):
    specs = [{"tensor": t, "kind": method, "params": dict(OPTIONS[method])} for t in NAMES]
    change(specs)
    return {"observers": specs}


def _set(i, key, value):
    return lambda specs: specs[i].__setitem__(key, value)


def _param(i, key, value):
    return lambda specs: specs[i]["params"].__setitem__(key, value)


ONE_PER_TENSOR = f"a list of 5 entries (one per tensor: {NAMES})"
OBSERVER_LIES = [
    ("minmax", lambda s: s.pop(), ("calibration field observers", ONE_PER_TENSOR, "4 entries")),
    ("minmax", lambda s: s.append(s[0]), ("calibration field observers", ONE_PER_TENSOR, "6 entries")),
    ("minmax", lambda s: s.__setitem__(slice(None), []), ("calibration field observers", ONE_PER_TENSOR,
                                                          "0 entries")),
    ("minmax", lambda s: s[2].pop("params"), ("calibration field observers[2]",
                                              '{"tensor", "kind", "params"}',
                                              "{'tensor': 'relu1', 'kind': 'minmax'}")),
    ("minmax", _set(3, "extra", 1), ("calibration field observers[3]", '{"tensor", "kind", "params"}',
                                     "{'tensor': 'flatten', 'kind': 'minmax', 'params': {}, 'extra': 1}")),
    ("minmax", _set(4, "tensor", "fc2"), ("calibration field observers[4].tensor", "'fc1'", "fc2")),
    ("minmax", _set(1, "kind", "histogram"), ("calibration field observers[1].kind",
                                              "one of ['ema', 'entropy', 'minmax', 'mse', 'percentile']",
                                              "histogram")),
    ("minmax", _set(1, "kind", ["minmax"]), ("calibration field observers[1].kind",
                                             "one of ['ema', 'entropy', 'minmax', 'mse', 'percentile']",
                                             "['minmax']")),
    ("minmax", _set(0, "params", {"bins": 64}), ("calibration field observers[0].params", "keys []",
                                                 "{'bins': 64}")),
    ("mse", _set(0, "params", {"bins": 64}), ("calibration field observers[0].params",
                                              "keys ['bins', 'candidates']", "{'bins': 64}")),
    ("mse", _set(0, "params", [64, 5]), ("calibration field observers[0].params",
                                         "keys ['bins', 'candidates']", "[64, 5]")),
    ("mse", _param(1, "bins", 63), ("calibration field observers[1].params.bins", "int in [64, 65536]",
                                    "63")),
    ("mse", _param(1, "bins", 65537), ("calibration field observers[1].params.bins", "int in [64, 65536]",
                                       "65537")),
    ("mse", _param(1, "bins", 64.0), ("calibration field observers[1].params.bins", "int in [64, 65536]",
                                      "64.0")),
    ("mse", _param(1, "candidates", True), ("calibration field observers[1].params.candidates",
                                            "int in [1, 1000]", "True")),
    ("mse", _param(1, "candidates", 0), ("calibration field observers[1].params.candidates",
                                         "int in [1, 1000]", "0")),
    ("mse", _param(1, "candidates", 1001), ("calibration field observers[1].params.candidates",
                                            "int in [1, 1000]", "1001")),
    ("entropy", _param(2, "max_candidates", 4097), ("calibration field observers[2].params.max_candidates",
                                                    "int in [1, 4096]", "4097")),
    ("percentile", _param(0, "percentile", 49.5), ("calibration field observers[0].params.percentile",
                                                   "float in [50, 100]", "49.5")),
    ("percentile", _param(0, "percentile", 100.5), ("calibration field observers[0].params.percentile",
                                                    "float in [50, 100]", "100.5")),
    ("percentile", _param(0, "percentile", "99"), ("calibration field observers[0].params.percentile",
                                                   "float in [50, 100]", "'99'")),
    ("ema", _param(3, "averaging_constant", 1.5), ("calibration field observers[3].params.averaging_constant",
                                                   "float in [0, 1]", "1.5")),
    ("ema", _param(3, "averaging_constant", -0.5),
     ("calibration field observers[3].params.averaging_constant", "float in [0, 1]", "-0.5")),
    # within the file's bounds, refused by the observer's own rule (named with the tensor)
    ("ema", _param(3, "averaging_constant", 0), ("calibration field observer flatten",
                                                 "averaging_constant: expected 0 < c <= 1, found 0",
                                                 "{'averaging_constant': 0}")),
    ("percentile", _param(0, "percentile", 50), ("calibration field observer input",
                                                 "percentile: expected 50 < p <= 100, found 50",
                                                 "{'bins': 64, 'percentile': 50}")),
]


@pytest.mark.parametrize("method, change, expected", OBSERVER_LIES)
def test_observer_entry_refusals(cals, tmp_path, method, change, expected):
    path = rewrite(saved(tmp_path, cals[1][method]), observers_with(method, change))
    assert refusal(path, cals[0]) == expected


def test_observer_settings_at_their_bounds_are_accepted(cals, tmp_path):
    path = saved(tmp_path, cals[1]["ema"])
    back = Calibration.load(rewrite(path, observers_with("ema", _param(2, "averaging_constant", 1))))
    assert back.observer("relu1").params() == {"averaging_constant": 1.0}
    path = saved(tmp_path, cals[1]["mse"], "mse.safetensors")
    back = Calibration.load(rewrite(path, observers_with("mse", _param(0, "candidates", 1))))
    assert back.observer("input").params() == {"bins": 64, "candidates": 1}
    path = saved(tmp_path, cals[1]["percentile"], "p.safetensors")
    back = Calibration.load(rewrite(path, observers_with("percentile", _param(0, "percentile", 100))))
    assert back.observer("input").params() == {"bins": 64, "percentile": 100.0}


# -- refusals of the tensors ------------------------------------------------------------------------------
def _put(name, index, value):
    def change(t):
        t[name] = t[name].copy()
        t[name][index] = value
    return change


IMAGES = "float32 (N >= 1, C, H, W)"
TENSOR_LIES = [
    ("minmax", lambda t: t.pop("images"), ("calibration field images", IMAGES, "None")),
    ("minmax", lambda t: t.__setitem__("images", t["images"].astype(np.float64)),
     ("calibration field images", IMAGES, "(dtype('float64'), (20, 1, 3, 3))")),
    ("minmax", lambda t: t.__setitem__("images", t["images"][:, 0]),
     ("calibration field images", IMAGES, "(dtype('float32'), (20, 3, 3))")),
    ("minmax", lambda t: t.__setitem__("images", t["images"][:, :, :, :, None]),
     ("calibration field images", IMAGES, "(dtype('float32'), (20, 1, 3, 3, 1))")),
    ("minmax", lambda t: t.__setitem__("images", t["images"][:0]),
     ("calibration field images", IMAGES, "(dtype('float32'), (0, 1, 3, 3))")),
    ("minmax", lambda t: t.__setitem__("images", np.zeros((2, 1, 3, 4), np.float32)),
     ("calibration field images", "images of the architecture's input_shape [1, 3, 3]", "[2, 1, 3, 4]")),
    ("minmax", _put("images", (3, 0, 2, 1), np.inf),
     ("calibration field images", "finite values", "NaN/Inf")),
    ("minmax", lambda t: t.pop("relu1.count"), ("calibration field tensor relu1.count",
                                                "(dtype('int64'), (1,))", "missing")),
    ("minmax", lambda t: t.__setitem__("fc1.extra", np.zeros(1)), ("calibration field tensor fc1.extra",
                                                                   "none", "(dtype('float64'), (1,))")),
    ("minmax", lambda t: t.__setitem__("input.minmax", np.zeros(3)),
     ("calibration field tensor input.minmax", "(dtype('float64'), (2,))", "(dtype('float64'), (3,))")),
    ("mse", lambda t: t.__setitem__("fc1.pos", t["fc1.pos"][:60]),
     ("calibration field tensor fc1.pos", "(dtype('int64'), (64,))", "(dtype('int64'), (60,))")),
    ("minmax", _put("conv1.count", 0, 0), ("calibration field tensor conv1.count",
                                           "1 .. 2**62 observed values", "0")),
    ("minmax", _put("conv1.count", 0, 2**62 + 1), ("calibration field tensor conv1.count",
                                                   "1 .. 2**62 observed values", str(2**62 + 1))),
    ("minmax", _put("fc1.minmax", 0, np.nan), ("calibration field tensor fc1 min/max", "finite min <= max",
                                               None)),
    ("minmax", lambda t: t.__setitem__("fc1.minmax", np.array([2.0, 1.0])),
     ("calibration field tensor fc1 min/max", "finite min <= max", "[2.0, 1.0]")),
    ("minmax", lambda t: t.__setitem__("fc1.minmax", np.array([1.0, np.inf])),
     ("calibration field tensor fc1 min/max", "finite min <= max", "[1.0, inf]")),
    ("mse", _put("relu1.pos", 5, -1), ("calibration field tensor relu1 histogram", "counts >= 0",
                                       "negative counts")),
    ("mse", _put("relu1.neg", 0, -2), ("calibration field tensor relu1 histogram", "counts >= 0",
                                       "negative counts")),
    ("mse", _put("relu1.scalars", 1, np.nan), ("calibration field tensor relu1 min/max", "finite min <= max",
                                               None)),
]


@pytest.mark.parametrize("method, change, expected", TENSOR_LIES)
def test_tensor_refusals(cals, tmp_path, method, change, expected):
    path = rewrite(saved(tmp_path, cals[1][method]), tensors=change)
    for against in (cals[0], None):
        what, exp, found = refusal(path, against)
        assert (what, exp) == expected[:2]
        if expected[2] is not None:
            assert found == expected[2]
        else:
            assert "nan" in found


def test_counts_are_bounded_at_exactly_2_to_the_62(cals, tmp_path):
    path = rewrite(saved(tmp_path, cals[1]["minmax"]), tensors=_put("conv1.count", 0, 2**62))
    assert Calibration.load(path).observer("conv1").count == 2**62
    path = rewrite(saved(tmp_path, cals[1]["minmax"]), tensors=_put("conv1.count", 0, 1))
    assert Calibration.load(path).observer("conv1").count == 1


def test_min_equal_to_max_is_a_valid_range(cals, tmp_path):
    path = rewrite(saved(tmp_path, cals[1]["minmax"]),
                   tensors=lambda t: t.__setitem__("fc1.minmax", np.array([-0.5, -0.5])))
    back = Calibration.load(path)
    assert (back.observer("fc1").min_val, back.observer("fc1").max_val) == (-0.5, -0.5)


def histogram_file(tmp_path, cals, limit, lo, hi, pos_counts=None, neg_counts=None, count=None):
    """The mse calibration with tensor relu1's histogram state replaced."""
    def change(t):
        pos = np.zeros(64, np.int64) if pos_counts is None else np.asarray(pos_counts, np.int64)
        neg = np.zeros(64, np.int64) if neg_counts is None else np.asarray(neg_counts, np.int64)
        t["relu1.pos"], t["relu1.neg"] = pos, neg
        t["relu1.scalars"] = np.array([limit, lo, hi])
        t["relu1.count"] = np.array([int(pos.sum() + neg.sum()) if count is None else count])
    return rewrite(saved(tmp_path, cals[1]["mse"]), tensors=change)


def counts(**at):
    c = np.zeros(64, np.int64)
    for i, v in at.items():
        c[int(i[1:])] = v
    return c


@pytest.mark.parametrize("limit, lo, hi, ok", [
    (4.0, -1.0, 2.0, True),            # limit twice max |x|, within 2.00001
    (2.00001, -1.0, 1.0, True),        # exactly at the bound
    (2.00002, -1.0, 1.0, False),       # just beyond it
    (2.0, -2.0, 1.0, False),           # equal to max |x| (the negative side)
    (2.0000001, -2.0, 1.0, True),      # just above max |x|
    (0.0, 0.0, 0.0, True),             # every value 0
    (1.0, 0.0, 0.0, False),            # a limit for zeros
])
def test_the_histogram_limit_must_lie_above_max_abs_and_within_twice_it(cals, tmp_path, limit, lo, hi, ok):
    path = histogram_file(tmp_path, cals, limit, lo, hi, counts(b0=3, b7=2), counts(b1=4))
    if ok:
        back = Calibration.load(path).observer("relu1")
        assert (back.limit, back.min_val, back.max_val, back.count) == (limit, lo, hi, 9)
    else:
        top = max(abs(lo), abs(hi))
        assert refusal(path) == ("calibration field tensor relu1 histogram limit",
                                 f"above max |x| {top:g} and at most twice it (0 when every value is 0)",
                                 str(limit))


@pytest.mark.parametrize("count, ok", [(9, True), (8, False), (10, False)])
def test_histogram_counts_must_add_up_to_the_value_count(cals, tmp_path, count, ok):
    path = histogram_file(tmp_path, cals, 4.0, -1.0, 2.0, counts(b0=3, b63=2), counts(b1=4), count=count)
    if ok:
        assert Calibration.load(path).observer("relu1").count == 9
    else:
        assert refusal(path) == ("calibration field tensor relu1 histogram", f"counts adding up to {count}",
                                 "9")


def test_histogram_counts_are_added_as_python_integers(cals, tmp_path):
    # four bins of 2**61 add up to 2**63, one past int64: the sum must not wrap to a negative count
    path = histogram_file(tmp_path, cals, 4.0, -1.0, 2.0, counts(b0=2**61, b1=2**61, b2=2**61, b3=2**61),
                          count=2**62)
    assert refusal(path) == ("calibration field tensor relu1 histogram", f"counts adding up to {2**62}",
                             str(2**63))
