"""Accuracy and timing analysis of quantized networks against their FP32 originals (pandas tables)."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

import numpy as np

from ..kernels import integer as ki

if TYPE_CHECKING:
    import pandas as pd


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (ref - approx)^2), in dB (inf if exact)."""
    ref = np.asarray(reference, np.float64)
    noise = float(((ref - np.asarray(approx, np.float64)) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        return float("inf")
    # math.log10 (libm), not np.log10, which NumPy dispatches to CPU-specific loops
    return 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def mse(reference: np.ndarray, approx: np.ndarray) -> float:
    return float(((np.asarray(reference, np.float64) - np.asarray(approx, np.float64)) ** 2).mean())


def _groups(qnet):
    """(stage, first layer, last layer) for each stage that implements layers."""
    return [(s, s.layers[0], s.layers[-1]) for s in qnet.stages if s.layers]


def _local_output(stage, xs_float: list) -> np.ndarray:
    """The stage fed the FP32 network's inputs to it (each quantized to the stage's grid if integer)."""
    xs = []
    for x_float, a in zip(xs_float, stage.input_acts, strict=True):
        if a is not None:
            x = ki.quantize_u8(np.ascontiguousarray(x_float).reshape(-1), a.scale, a.zero_point, a.qmax)
            x_float = x.reshape(x_float.shape)
        xs.append(x_float)
    return stage.dequantize(stage.run(*xs))


def layer_error_table(net, qnet, images) -> pd.DataFrame:
    """Per stage (fused layers share a row, named like ``conv1+relu1+pool1``): MSE and SQNR (dB) of its
    output against the FP32 network's output of the group's last layer, both cumulative (the quantized
    network end to end) and local (the stage alone, fed the FP32 activations)."""
    import pandas as pd  # imported on use: `import microcnn.quant` stays light

    x = net.check_input(images)
    reference = net.trace(x)
    quantized = qnet.trace(x)
    values = {net.input_name: x, **{r.name: r.output for r in reference}}  # every FP32 tensor by name
    rows = []
    for stage, _, last in _groups(qnet):
        ref = reference[last].output
        cum = quantized[last].output
        local = _local_output(stage, [values[t] for t in qnet.stage_inputs(stage)])
        rows.append({"Layer": "+".join(qnet.names[i] for i in stage.layers),
                     "Type": "+".join(qnet.types[i] for i in stage.layers), "Precision": stage.precision,
                     "MSE": mse(ref, cum), "SQNR (dB)": sqnr_db(ref, cum),
                     "Local MSE": mse(ref, local), "Local SQNR (dB)": sqnr_db(ref, local)})
    return pd.DataFrame(rows)


def _median_trace_seconds(model, x, repeats: int) -> list[float]:
    model.trace(x)  # compile / warm caches
    runs = [[r.seconds for r in model.trace(x)] for _ in range(repeats)]
    return [statistics.median(col) for col in zip(*runs, strict=True)]


def per_layer_table(net, calibration, images, repeats: int = 3, int4_act_bits: int = 4,
                    **quantize_options) -> pd.DataFrame:
    """Benchmark table, one row per FP32 layer: Layer, Type, FP32 Time (ms), INT8 Time (ms),
    INT4 Time (ms), INT8 MSE, INT4 MSE.

    INT8 is W8A8 and INT4 W4A{int4_act_bits} (default W4A4, the headline's INT4), both from ``calibration``.
    Times are medians over ``repeats`` traces after a warm-up. In the integer networks a convolution's
    following ReLU and max pooling are fused into it: the stage time is on the convolution's row, the
    fused rows show 0, and the MSE (cumulative, vs FP32) is on the last layer of the group (NaN before).
    """
    import pandas as pd

    from .quantize import quantize

    x = net.check_input(images)
    models = {"INT8": quantize(net, calibration, 8, 8, **quantize_options),
              "INT4": quantize(net, calibration, 4, int4_act_bits, **quantize_options)}
    reference = net.trace(x)
    table = pd.DataFrame({"Layer": net.names, "Type": [r.type for r in reference],
                          "FP32 Time (ms)": np.array(_median_trace_seconds(net, x, repeats)) * 1e3})
    for label, qnet in models.items():
        table[f"{label} Time (ms)"] = np.array(_median_trace_seconds(qnet, x, repeats)) * 1e3
    for label, qnet in models.items():
        quantized = qnet.trace(x)
        errors = np.full(len(net.names), np.nan)
        for _, _, last in _groups(qnet):
            errors[last] = mse(reference[last].output, quantized[last].output)
        table[f"{label} MSE"] = errors
    return table[["Layer", "Type", "FP32 Time (ms)", "INT8 Time (ms)", "INT4 Time (ms)", "INT8 MSE",
                  "INT4 MSE"]]

