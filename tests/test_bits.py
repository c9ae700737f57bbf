"""Bit widths 2..8: packing against a NumPy bit-stream reference, quantized stages against an int64
NumPy reference at W3A3 / W2A4 (symmetric and asymmetric weights), exact file round trips for every
width, hostile files (declared bits vs bytes), and the errors for bits outside 2..8."""

import json

import numpy as np
import pytest

import microcnn
from microcnn import io
from microcnn.errors import FileFormatError, InputError
from microcnn.kernels.packing import pack_bits, packed_size, padding_is_zero, unpack_bits
from microcnn.quant import calibrate, load_model, parse_precision, quantize
from microcnn.quant.params import ActQuant
from microcnn.quant.qlayers import QConv2d, QLinear
from tests.test_quant_kernels import conv_acc_ref, finish_ref

RNG = np.random.default_rng(1414)
WIDTHS = range(2, 9)


def reference_pack(codes, bits):
    """Little-endian bit stream by NumPy: each code's ``bits`` low bits, least significant first."""
    u = codes.astype(np.int64) & ((1 << bits) - 1)
    stream = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 64, 1001])
def test_packing_round_trips_and_matches_the_bit_stream(bits, n):
    signed = RNG.integers(-(1 << (bits - 1)), 1 << (bits - 1), n).astype(np.int8)
    packed = pack_bits(signed, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(n, bits) == -(-n * bits // 8)
    np.testing.assert_array_equal(packed, reference_pack(signed, bits))
    np.testing.assert_array_equal(unpack_bits(packed, bits, n, True), signed)
    unsigned = RNG.integers(0, 1 << bits, n).astype(np.uint8)
    np.testing.assert_array_equal(unpack_bits(pack_bits(unsigned, bits), bits, n, False), unsigned)
    assert padding_is_zero(packed, n, bits)


def test_packing_layouts_by_hand():
    # 2 bits, four per byte, lowest pair first: 1 -> 01, -2 -> 10, 0 -> 00, -1 -> 11
    np.testing.assert_array_equal(pack_bits(np.array([1, -2, 0, -1], np.int8), 2), [0b11001001])
    # 3 bits straddle bytes: 3 = 011, -4 = 100, 1 = 001 -> stream 110 001 100 (LSB first) = 0b01_100_011, 0b0
    np.testing.assert_array_equal(pack_bits(np.array([3, -4, 1], np.int8), 3), [0b01100011, 0b0])
    # 4 bits: the historical int4 layout (low nibble first)
    np.testing.assert_array_equal(pack_bits(np.array([-8, 7, 7, -8, 0, -1], np.int8), 4), [0x78, 0x87, 0xF0])
    assert not padding_is_zero(np.array([0b10000000], np.uint8), 2, 3)  # bit 7 is after 2 x 3 bits


# -- stages against an int64 reference ---------------------------------------------------------------
def _stage_case(kind, wbits, abits, symmetric):
    lo, hi = -(1 << (wbits - 1)), (1 << (wbits - 1)) - 1
    shape = (5, 3, 3, 3) if kind == "conv" else (6, 40)
    wq = RNG.integers(lo, hi + 1, shape)
    wq.reshape(-1)[:2] = lo, hi  # the grid's extremes
    zp = None if symmetric else RNG.integers(lo, hi + 1, shape[0]).astype(np.int8)
    in_act = ActQuant(0.05, int(RNG.integers(0, 1 << abits)), abits)
    out_act = ActQuant(0.2, 1, abits)
    scale = RNG.uniform(0.01, 0.05, shape[0]).astype(np.float32)
    bias = RNG.integers(-300, 300, shape[0]).astype(np.int32)
    if kind == "conv":
        stage = QConv2d((0, 1), wq, wbits, scale, bias, in_act, out_act, True, stride=(1, 1), padding=(1, 1),
                        weight_zero_point=zp)
        x = RNG.integers(0, 1 << abits, (2, 3, 6, 5)).astype(np.uint8)
    else:
        stage = QLinear((0, 1), wq, wbits, scale, bias, in_act, out_act, True, weight_zero_point=zp)
        x = RNG.integers(0, 1 << abits, (7, 40)).astype(np.uint8)
    zp_rows = 0 if zp is None else zp.astype(np.int64).reshape(-1, *[1] * (wq.ndim - 1))
    centred = wq.astype(np.int64) - zp_rows
    return stage, x, centred


@pytest.mark.parametrize("wbits, abits", [(3, 3), (2, 4), (5, 2), (7, 6)])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_low_bit_stages_match_the_integer_reference(kind, wbits, abits, symmetric):
    stage, x, centred = _stage_case(kind, wbits, abits, symmetric)
    if kind == "conv":
        acc = conv_acc_ref(x, stage.in_act.zero_point, centred, stage.bias_q, (1, 1), (1, 1))
    else:
        acc = (x.astype(np.int64) - stage.in_act.zero_point) @ centred.T + stage.bias_q
    want = finish_ref(acc, stage.mode, stage.m0, stage.shift, stage.fmult, stage.zp, stage.lo, stage.hi,
                      axis=1)
    got = stage.run(x)
    np.testing.assert_array_equal(got, want)
    assert got.max() <= (1 << abits) - 1  # clamped to the activation grid
    assert stage.lo == max(0, stage.out_act.zero_point) and stage.hi == (1 << abits) - 1
    np.testing.assert_array_equal(stage.weight_values.reshape(len(centred), -1) -
                                  (0 if symmetric else stage.weight_zero_point[:, None]),
                                  centred.reshape(len(centred), -1))


def test_stage_refuses_bad_widths_and_codes():
    a4 = ActQuant(0.1, 0, 4)
    w = np.zeros((2, 3), np.int8)
    for bits in (1, 9):
        with pytest.raises(InputError, match="weight bits: expected an integer in 2..8 .*bits outside 2..8"):
            QLinear((0,), w, bits, np.ones(2, np.float32), np.zeros(2, np.int32), a4, None, False)
    with pytest.raises(InputError, match="input activation bits: .*found 9"):
        QLinear((0,), w, 4, np.ones(2, np.float32), np.zeros(2, np.int32), ActQuant(0.1, 0, 9), None, False)
    with pytest.raises(InputError, match="3-bit values must lie in -4..3"):
        QLinear((0,), w + 4, 3, np.ones(2, np.float32), np.zeros(2, np.int32), a4, None, False)
    with pytest.raises(InputError, match="asymmetric weights: expected at most 7 bits"):
        QLinear((0,), w, 8, np.ones(2, np.float32), np.zeros(2, np.int32), a4, None, False,
                weight_zero_point=np.zeros(2, np.int8))
    with pytest.raises(InputError, match="weight zero point: expected integers in -2..1"):
        QLinear((0,), w, 2, np.ones(2, np.float32), np.zeros(2, np.int32), a4, None, False,
                weight_zero_point=np.array([0, 2]))


def test_accumulator_guard_uses_the_widths():
    # K * (2**a - 1) * 2**(w-1) must fit int32: 8-bit activations and weights at K = 70,000 overflow ...
    k = 70_000
    w = np.zeros((1, k), np.int8)
    with pytest.raises(InputError, match="exceeds int32"):
        QLinear((0,), w, 8, np.ones(1, np.float32), np.zeros(1, np.int32), ActQuant(1.0, 0, 8), None, False)
    # ... 3-bit ones do not (70,000 * 7 * 4 < 2**31)
    QLinear((0,), w, 3, np.ones(1, np.float32), np.zeros(1, np.int32), ActQuant(1.0, 0, 3), None, False)


# -- networks and files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(mnist_train):
    images = mnist_train[0]
    net = microcnn.lenet(seed=11)
    return net, calibrate(net, images[:200], samples=60, progress=False), images[500:560]


@pytest.mark.parametrize("wbits, abits, symmetric, per_channel", [
    (2, 2, True, True), (3, 3, True, True), (3, 3, False, True), (2, 4, False, False), (5, 5, True, False),
    (6, 7, False, True), (7, 3, True, True), (8, 2, True, True)])
def test_every_width_round_trips_exactly(small, tmp_path, wbits, abits, symmetric, per_channel):
    net, cal, x = small
    q = quantize(net, cal, wbits, abits, symmetric=symmetric, per_channel=per_channel)
    path = tmp_path / "q.safetensors"
    q.save(path)
    back = load_model(path)
    np.testing.assert_array_equal(back.logits(x), q.logits(x))
    assert back.settings == json.loads(json.dumps(q.settings))
    tensors, _ = io.read_safetensors(path)
    for i, st in enumerate(q.stages):
        if hasattr(st, "weight_bits"):
            n = int(np.prod(st.weight_shape))
            stored = tensors[f"{i}.weight"]
            assert stored.nbytes == packed_size(n, wbits)  # packed at the width, nothing more
            np.testing.assert_array_equal(back.stages[i].weight_values, st.weight_values)
            assert (f"{i}.weight_zero_point" in tensors) == (not symmetric)


def _rewrite(path, out, edit_meta=None, edit_tensors=None):
    tensors, meta = io.read_safetensors(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        specs = json.loads(meta["stages"])
        edit_meta(specs)
        meta["stages"] = json.dumps(specs)
    io.write_safetensors(out, tensors, meta)
    return out


def test_hostile_files_are_refused(small, tmp_path):
    net, cal, _ = small
    path = tmp_path / "w3.safetensors"
    quantize(net, cal, 3, 3, symmetric=False).save(path)
    first = next(i for i, st in enumerate(load_model(path).stages) if hasattr(st, "weight_bits"))

    def declare(bits):
        def edit(specs):
            specs[first]["weight_bits"] = bits
        return edit

    # declared bits disagree with the byte count of the packed stream
    with pytest.raises(FileFormatError, match=rf"tensor {first}.weight has the wrong dtype or shape"):
        load_model(_rewrite(path, tmp_path / "a.safetensors", declare(4)))
    with pytest.raises(FileFormatError, match="bits outside 2..8"):
        load_model(_rewrite(path, tmp_path / "b.safetensors", declare(9)))

    def set_padding(tensors):
        tensors[f"{first}.weight"][-1] |= 0x80  # 150 codes x 3 bits = 450 bits: bits 2..7 of the last byte

    with pytest.raises(FileFormatError, match="bits set after the last of 150 3-bit codes"):
        load_model(_rewrite(path, tmp_path / "c.safetensors", edit_tensors=set_padding))

    def bad_zero_point(tensors):
        tensors[f"{first}.weight_zero_point"][0] = 4  # 3-bit grid: -4..3

    with pytest.raises(FileFormatError, match="weight zero point"):
        load_model(_rewrite(path, tmp_path / "d.safetensors", edit_tensors=bad_zero_point))

    def symmetric(specs):
        specs[first]["weight_symmetric"] = True  # the zero point tensor is then left over

    with pytest.raises(FileFormatError, match="unexpected tensors"):
        load_model(_rewrite(path, tmp_path / "e.safetensors", symmetric))


def test_bits_outside_2_to_8_are_refused_by_name(small):
    net, cal, _ = small
    for w, a in [(1, 8), (9, 8), (8, 1), (4, 16)]:
        with pytest.raises(InputError, match="bits outside 2..8"):
            quantize(net, cal, w, a)
    with pytest.raises(InputError, match=r"weight bits outside 2..8 \(found 12\)"):
        parse_precision("w12a4")
    with pytest.raises(InputError, match="asymmetric weights need at most 7 bits"):
        quantize(net, cal, 8, 8, symmetric=False)
    assert parse_precision("W3A3").label == "W3A3" and parse_precision("w2a4").weight_bits == 2


# -- the command line --------------------------------------------------------------------------------
def test_command_line_widths_rounding_and_equalization(capsys, tmp_path):
    from tests.test_cli_safety import run

    code, _, err = run(capsys, "eval", "--precision", "w9a8")
    assert code == 2 and "argument --precision: precision 'w9a8': weight bits outside 2..8 (found 9)" in err
    out = tmp_path / "w3.safetensors"
    code, text, _ = run(capsys, "quantize", "--bits", "3", "--act-bits", "3", "--calibration", "40",
                        "--asymmetric", "--granularity", "tensor", "--cle", "--rounding", "adaround",
                        "--adaround-iterations", "5", "--out", str(out))
    assert code == 0, text
    q = load_model(out)
    assert q.settings["rounding"] == "adaround" and q.settings["symmetric"] is False
    assert (q.settings["weight_bits"], q.settings["act_bits"], q.settings["per_channel"]) == (3, 3, False)
    code, text, _ = run(capsys, "eval", "--model", str(out), "--samples", "200", "--json")
    assert code == 0 and json.loads(text)["precision"] == "w3a3"
    code, text, _ = run(capsys, "eval", "--precision", "W2A4", "--calibration", "40", "--samples", "200",
                        "--json")
    assert code == 0 and json.loads(text)["precision"] == "w2a4"
