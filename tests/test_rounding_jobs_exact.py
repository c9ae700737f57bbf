"""The rounding registry as ``quantize`` calls it: a ``RoundingJob`` built positionally, dispatched by
name. Each method's codes are compared with the underlying routine called directly on the pieces the
job should hand it (per-group slices for a grouped convolution, the ReLU-clamped FP32 target for
AdaRound), so a job that loses, swaps or mis-slices a field is caught."""

import numpy as np
import pytest

from microcnn.errors import InputError
from microcnn.layers import Conv2d, Linear
from microcnn.quant.adaround import AdaRoundSettings, adaround
from microcnn.quant.rounding import NEEDS_DATA, ROUNDINGS, RoundingJob, gptq_round, input_gram

# AdaRound in a unit test: few, large steps (the codes move), batches smaller than the image count
FAST = {"iterations": 24, "batch": 3, "lr": 0.05}


def _grid(layer, bits):
    """Per-row scale, non-zero zero points and nearest codes of ``layer``'s weights (O, K)."""
    rng = np.random.default_rng(0)
    w = layer.weight.data.reshape(layer.weight.data.shape[0], -1).astype(np.float64)
    scale = np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1) * 1.3
    zp = rng.integers(-1, 2, size=len(w))
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    nearest = np.clip(np.rint(w / scale[:, None]) + zp[:, None], lo, hi).astype(np.int8)
    return nearest, scale, zp


def _job(layer, bits, x_quant, x_float, relu, **rest):
    nearest, scale, zp = _grid(layer, bits)
    # positional, as quantize builds it
    return RoundingJob("layer_x", layer, nearest, scale, zp, bits, x_quant, x_float, relu, **rest)


def _conv(groups, seed):
    return Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), groups=groups,
                  rng=np.random.default_rng(seed))


def _inputs(seed, shape=(7, 4, 6, 5)):
    rng = np.random.default_rng(seed)
    x_float = rng.normal(size=shape).astype(np.float32)
    x_quant = (x_float + rng.normal(scale=0.2, size=shape)).astype(np.float32)
    return x_quant, x_float


def test_every_field_lands_where_quantize_puts_it_and_the_defaults():
    layer = Linear(5, 3, rng=np.random.default_rng(0))
    xq, xf = np.ones((2, 5), np.float32), np.zeros((2, 5), np.float32)
    job = _job(layer, 3, xq, xf, True)
    nearest, scale, zp = _grid(layer, 3)
    assert job.name == "layer_x" and job.layer is layer and job.bits == 3 and job.relu is True
    assert job.x_quant is xq and job.x_float is xf
    np.testing.assert_array_equal(job.nearest, nearest)
    np.testing.assert_array_equal(job.scale, scale)
    np.testing.assert_array_equal(job.zero_point, zp)
    assert job.options == {} and job.seed == 0 and job.progress is False
    other = _job(layer, 3, xq, xf, False, options={"lam": 0.5}, seed=4, progress=True)
    assert other.options == {"lam": 0.5} and other.seed == 4 and other.progress is True
    assert job.options is not _job(layer, 3, xq, xf, True).options  # a fresh dict per job
    assert set(ROUNDINGS) == {"nearest", "gptq", "adaround"} and set(NEEDS_DATA) == {"gptq", "adaround"}


def test_nearest_returns_the_jobs_own_codes():
    layer = _conv(1, 1)
    job = _job(layer, 4, None, None, False)
    out = ROUNDINGS["nearest"](job)
    np.testing.assert_array_equal(out, _grid(layer, 4)[0])


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_of_a_dense_layer_is_gptq_round_on_its_input_gram(bits):
    layer = Linear(6, 5, rng=np.random.default_rng(2))
    xq, xf = _inputs(6, (9, 6))
    job = _job(layer, bits, xq, xf, False)
    _, scale, zp = _grid(layer, bits)
    want = gptq_round(layer.weight.data, scale, bits, input_gram(layer, xq), zero_point=zp)
    got = ROUNDINGS["gptq"](job)
    np.testing.assert_array_equal(got, want)
    # the gram is the quantized input's, not the FP32 one's (they give other codes here)
    assert not np.array_equal(got, gptq_round(layer.weight.data, scale, bits, input_gram(layer, xf),
                                              zero_point=zp))


def test_gptq_of_a_grouped_conv_rounds_each_group_on_its_own_channels():
    layer = _conv(2, 4)
    xq, xf = _inputs(5)
    job = _job(layer, 3, xq, xf, False)
    _, scale, zp = _grid(layer, 3)
    parts = []
    for g in range(2):
        alone = Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0))
        alone.weight.data[...] = layer.weight.data[3 * g:3 * g + 3]
        gram = input_gram(alone, xq[:, 2 * g:2 * g + 2])
        parts.append(gptq_round(alone.weight.data, scale[3 * g:3 * g + 3], 3, gram,
                                zero_point=zp[3 * g:3 * g + 3]))
    got = ROUNDINGS["gptq"](job)
    np.testing.assert_array_equal(got, np.concatenate(parts))
    assert got.shape == (6, 12) and got.dtype == np.int8


def _adaround_direct(layer, job, relu, seed=0, settings=None):
    target = layer.forward(job.x_float)
    if relu:
        target = np.maximum(target, np.float32(0.0))
    return adaround(layer, job.scale, job.zero_point, job.bits, job.x_quant, target, relu,
                    settings or AdaRoundSettings(**FAST), seed=seed)[0]


@pytest.mark.parametrize("relu", [True, False])
def test_adaround_reconstructs_the_fp32_output_from_the_quantized_input(relu):
    layer = _conv(1, 6)
    xq, xf = _inputs(7)
    job = _job(layer, 3, xq, xf, relu, options=FAST)
    got = ROUNDINGS["adaround"](job)
    np.testing.assert_array_equal(got, _adaround_direct(layer, job, relu))
    assert got.shape == (6, 24) and got.dtype == np.int8


def test_adaround_target_is_clamped_by_the_fused_relu():
    # Mostly negative outputs: an unclamped target asks the rounding to reproduce values the ReLU
    # removes, which changes the chosen codes.
    layer = Linear(6, 4, rng=np.random.default_rng(8))
    layer.bias.data[...] = -0.5
    xq, xf = _inputs(9, (12, 6))
    options = {"iterations": 60, "batch": 12, "lr": 0.05}  # a large step: the codes move in 60 steps
    job = _job(layer, 2, xq, xf, True, options=options)
    got = ROUNDINGS["adaround"](job)
    settings = AdaRoundSettings(**options)
    np.testing.assert_array_equal(got, _adaround_direct(layer, job, True, settings=settings))
    unclamped = adaround(layer, job.scale, job.zero_point, 2, xq, layer.forward(xf), True, settings)[0]
    assert not np.array_equal(got, unclamped)


def test_adaround_uses_the_jobs_seed_and_options_and_is_silent_by_default(capfd):
    layer = _conv(1, 10)
    xq, xf = _inputs(11)
    by_seed = {s: ROUNDINGS["adaround"](_job(layer, 3, xq, xf, True, options=FAST, seed=s)) for s in (0, 1)}
    assert not np.array_equal(by_seed[0], by_seed[1])  # the seed picks the batches: it matters here
    default = ROUNDINGS["adaround"](_job(layer, 3, xq, xf, True, options=FAST))
    np.testing.assert_array_equal(default, by_seed[0])
    np.testing.assert_array_equal(by_seed[1], _adaround_direct(layer, _job(layer, 3, xq, xf, True), True,
                                                               seed=1))
    assert capfd.readouterr().err == ""  # progress=False: no bar
    ROUNDINGS["adaround"](_job(layer, 3, xq, xf, True, options=FAST, progress=True))
    assert "layer_x" in capfd.readouterr().err


def test_adaround_refuses_a_grouped_conv_by_name_and_takes_ungrouped_ones():
    xq, xf = _inputs(12)
    with pytest.raises(InputError, match=r"layer_x is a grouped convolution \(groups=2\)"):
        ROUNDINGS["adaround"](_job(_conv(2, 13), 3, xq, xf, False, options=FAST))
    assert ROUNDINGS["adaround"](_job(_conv(1, 13), 3, xq, xf, False, options=FAST)).shape == (6, 24)


def test_gptq_zero_point_shifts_the_codes_where_nothing_clips():
    # real = scale * (q - zero_point): with room on the 8-bit grid, a zero point z moves every code by
    # exactly +z and leaves the error feedback (in real values) unchanged
    layer = Linear(6, 5, rng=np.random.default_rng(14))
    w = layer.weight.data
    scale = np.abs(w).max(axis=1).astype(np.float64) / 60  # |codes| <= 60: z in [-3, 3] cannot clip
    gram = input_gram(layer, _inputs(15, (9, 6))[0])
    zp = np.array([3, -3, 1, 0, -2])
    plain = gptq_round(w, scale, 8, gram).astype(np.int64)
    np.testing.assert_array_equal(gptq_round(w, scale, 8, gram, zero_point=zp), plain + zp[:, None])
