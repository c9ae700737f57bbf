"""Mixed precision: choose INT4, INT8 or FP32 weights per layer within an accuracy budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..layers import Conv2d, Linear
from .qlayers import FloatStage, QWeighted
from .quantize import quantize

LADDER = (4, 8, 32)  # weight bits, cheapest first

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class MixedPrecisionResult:
    """What ``mixed_precision`` chose: the quantized network, the per-layer table, its accuracy and
    bytes next to the FP32 network's."""

    network: object  # QuantizedSequential
    table: pd.DataFrame
    accuracy: float
    fp32_accuracy: float
    nbytes: int
    fp32_nbytes: int

    @property
    def saved_bytes(self) -> int:
        return self.fp32_nbytes - self.nbytes


def _layer_bytes(qnet) -> dict:
    out = {}
    for s in qnet.stages:
        if isinstance(s, QWeighted | FloatStage) and s.layers and s.nbytes:
            out[qnet.names[s.layers[0]]] = s.nbytes
    return out


def mixed_precision(net, calibration, images, labels, budget_points: float = 0.1, act_bits: int = 8,
                    progress: bool = False, **quantize_options) -> MixedPrecisionResult:
    """Per-layer weight precision (INT4 / INT8 / FP32, activations ``act_bits``) that keeps accuracy on
    (images, labels) within ``budget_points`` percentage points of FP32 while storing as little as possible.

    Sensitivity: each layer quantized alone (others FP32) at 4 and 8 bits; the accuracy drop in points.
    Search: start with every layer at INT4; while the real drop exceeds the budget, promote the layer
    whose promotion (4->8 or 8->32) recovers the most sensitivity per extra byte. Use held-out data
    (e.g. part of the training split), never the test set you report on.

    The table has one row per layer with weights: Layer, Type, Parameters, INT4 Drop (pts),
    INT8 Drop (pts), Precision, Bytes, FP32 Bytes, Saved Bytes.
    """
    import pandas as pd  # imported on use: `import microcnn.quant` stays light

    labels = np.asarray(labels)
    if budget_points < 0:
        raise InputError(f"budget_points: expected >= 0, found {budget_points}")
    weighted = [(n, layer) for n, layer in zip(net.names, net.layers, strict=True)
                if isinstance(layer, Conv2d | Linear)]
    if not weighted:
        raise InputError("mixed_precision: the network has no layers with weights")
    names = [n for n, _ in weighted]
    fp32_acc = net.accuracy(images, labels)

    def run(bits_by_layer):
        q = quantize(net, calibration, weight_bits=8, act_bits=act_bits, layer_bits=bits_by_layer,
                     **quantize_options)
        return q, q.accuracy(images, labels)

    steps = [(n, b) for n in names for b in (4, 8)]
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sensitivity", unit="layer")
    drop = {}
    for name, bits in steps:
        setting = {n: 32 for n in names}
        setting[name] = bits
        drop[name, bits] = 100 * (fp32_acc - run(setting)[1])
    for name in names:
        drop[name, 32] = 0.0

    choice = {n: 4 for n in names}
    qnet, acc = run(choice)
    while 100 * (fp32_acc - acc) > budget_points and any(choice[n] < 32 for n in names):
        best, best_score = None, -np.inf
        for n in names:
            if choice[n] == 32:
                continue
            nxt = LADDER[LADDER.index(choice[n]) + 1]
            gain = drop[n, choice[n]] - drop[n, nxt]
            params = sum(p.data.size for p in dict(weighted)[n].parameters())
            extra = params * (nxt - choice[n]) / 8  # approximate extra bytes
            score = gain / extra
            if score > best_score:
                best, best_score = n, score
        choice[best] = LADDER[LADDER.index(choice[best]) + 1]
        qnet, acc = run(choice)

    final_bytes = _layer_bytes(qnet)
    rows = []
    for n, layer in weighted:
        fp32_bytes = sum(p.data.nbytes for p in layer.parameters())
        rows.append({"Layer": n, "Type": layer.type,
                     "Parameters": sum(p.data.size for p in layer.parameters()),
                     "INT4 Drop (pts)": drop[n, 4], "INT8 Drop (pts)": drop[n, 8],
                     "Precision": {4: "INT4", 8: "INT8", 32: "FP32"}[choice[n]],
                     "Bytes": final_bytes.get(n, 0), "FP32 Bytes": fp32_bytes,
                     "Saved Bytes": fp32_bytes - final_bytes.get(n, 0)})
    table = pd.DataFrame(rows)
    return MixedPrecisionResult(qnet, table, float(acc), float(fp32_acc), int(qnet.nbytes), int(net.nbytes))
