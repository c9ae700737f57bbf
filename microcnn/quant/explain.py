"""Quantized arithmetic worked through by hand, for teaching: one integer layer's output recomputed
from its stored integers and scales with Python integers (exact), following the rule of
``microcnn.kernels.integer`` (int32 accumulator, fixed-point multiplier ``M0 * 2**-n``, one rounding,
clamp), next to what the kernel computed."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .params import fixed_point_multiplier
from .qlayers import QLinear


def requantization_example(net, qnet, image, layer: str = "fc1", unit: int | None = None):
    """Every number of one output ``unit`` (default: the largest FP32 output) of the dense ``layer`` of
    ``qnet`` (the quantized ``net``) for one image, worked by hand with Python integers: accumulator,
    multiplier M and its fixed-point form M0 * 2**-n, rounding, clamp and real value, beside what the
    network's kernel computed and the FP32 output (notebook 03 shows the formulas)."""
    import pandas as pd  # imported on use: `import microcnn.quant` stays light

    x = net.check_input(image)[:1]
    dense = {qnet.names[st.layers[0]]: k for k, st in enumerate(qnet.stages)
             if isinstance(st, QLinear) and st.out_act is not None}
    if layer not in dense:
        raise InputError(f"layer: expected a dense layer with an integer output, one of {list(dense)}, "
                         f"found {layer!r}")
    stage, q_in = qnet.stages[dense[layer]], x
    for st in qnet.stages[:dense[layer]]:
        q_in = st.run(q_in)
    fp32 = {r.name: r.output[0] for r in net.trace(x)}
    out_name = net.names[stage.layers[-1]]
    unit = int(np.argmax(fp32[out_name])) if unit is None else int(unit)
    s_x, z_x = stage.in_act.scale, stage.in_act.zero_point
    s_w = float(np.broadcast_to(stage.weight_scale, (stage.weight_shape[0],))[unit])
    s_y, z_y = stage.out_act.scale, stage.out_act.zero_point
    x_int = [int(v) - z_x for v in q_in[0].reshape(-1)]
    w_int = [int(v) for v in stage.weight_values[unit].reshape(-1)]
    bias = int(stage.bias_q[unit])
    acc = sum(a * b for a, b in zip(x_int, w_int, strict=True)) + bias
    m = s_x * s_w / s_y
    m0, shift = (int(v[0]) for v in fixed_point_multiplier(m))
    rounded = (acc * m0 + (1 << (shift - 1))) >> shift
    q_y = min(max(rounded + z_y, stage.lo), stage.hi)
    return pd.Series({
        "Layer": "+".join(net.names[i] for i in stage.layers), "Unit": unit, "K (inputs)": len(x_int),
        "s_x (input scale)": s_x, "z_x (input zero point)": z_x, "s_w (weight scale)": s_w,
        "s_y (output scale)": s_y, "z_y (output zero point)": z_y, "q_b (int32 bias)": bias,
        "acc (int32 accumulator)": acc, "M = s_x s_w / s_y": m, "M0": m0, "n (shift)": shift,
        "M0 * 2^-n": m0 / 2.0 ** shift, "round(acc * M)": rounded, "q_y (clamped)": q_y,
        "q_y (network kernel)": int(stage.run(q_in)[0, unit]), "y = s_y (q_y - z_y)": s_y * (q_y - z_y),
        "y (FP32 network)": float(fp32[out_name][unit])}, name=f"{layer} unit {unit}", dtype=object)
