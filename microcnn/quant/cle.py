"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction"): rescale consecutive weighted layers so their per-channel weight ranges match, which
the FP32 network cannot tell apart but per-tensor (and low-bit per-channel) weight grids can.

For a pair W1 (output channel i) -> f -> W2 (input channel i), where f is positively homogeneous per
channel (ReLU, max or average pooling, flatten: f(s x) = s f(x) for s > 0), dividing row i of W1 and
b1[i] by s_i and multiplying W2's input channel i by s_i leaves the network's function unchanged. With
r1_i = max |W1[i, :]| and r2_i = max |W2[:, i]|, s_i = sqrt(r1_i / r2_i) makes both ranges
sqrt(r1_i r2_i). Chains of more than two layers are swept pair by pair until the scales settle.

The network has no batch-norm layer type, so there is nothing to fold first; a BatchNorm following a
convolution would have to be folded into it before equalizing (its scale is not homogeneous in x).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..layers import AvgPool2d, Conv2d, Flatten, Layer, Linear, MaxPool2d, ReLU

HOMOGENEOUS = (ReLU, MaxPool2d, AvgPool2d, Flatten)  # f(s x) = s f(x) per channel, for s > 0


def equalization_pairs(net) -> list[tuple[int, int]]:
    """Indices (i, j) of weighted layers i -> j joined only by positively homogeneous layers."""
    pairs = []
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, Conv2d | Linear):
            continue
        j = i + 1
        while j < len(net.layers) and isinstance(net.layers[j], HOMOGENEOUS):
            j += 1
        if j < len(net.layers) and isinstance(net.layers[j], Conv2d | Linear):
            pairs.append((i, j))
    return pairs


def _input_groups(w2: np.ndarray, channels: int) -> np.ndarray:
    """W2 (float64) as (O2, channels, rest): the weights reading each output channel of the layer before
    (a dense layer after Flatten reads channel c as the c-th block of its inputs)."""
    o2 = w2.shape[0]
    fits = w2.shape[1] % channels == 0 if w2.ndim == 2 else w2.shape[1] == channels
    if not fits:
        raise InputError(f"cross-layer equalization: {w2.shape} weights cannot read {channels} channels")
    return w2.reshape(o2, channels, -1)


def _weighted(layer: Layer) -> Conv2d | Linear:
    assert isinstance(layer, Conv2d | Linear)  # equalization_pairs pairs weighted layers only
    return layer


def equalize(net, iterations: int = 20, tol: float = 1e-6):
    """A copy of ``net`` (a Sequential) with cross-layer equalized weights; ``net`` is not changed.

    iterations: sweeps over the chain at most; stops earlier when every scale of a sweep is within
    ``tol`` of 1. Channels whose weights are all zero on either side keep scale 1.
    """
    from ..network import Sequential

    if not isinstance(net, Sequential):
        raise InputError(f"net: expected a microcnn Sequential, found {type(net).__name__}")
    out = Sequential.from_config(net.config())
    out.load_state_dict(net.state_dict())
    pairs = equalization_pairs(out)
    chain = {k: _weighted(out.layers[k]) for pair in pairs for k in pair}
    weights = {k: layer.weight.data.astype(np.float64) for k, layer in chain.items()}
    biases = {k: layer.bias.data.astype(np.float64) for k, layer in chain.items() if layer.bias is not None}
    for _ in range(iterations):
        worst = 0.0
        for i, j in pairs:
            w1 = weights[i].reshape(len(weights[i]), -1)
            w2 = _input_groups(weights[j], len(w1))
            r1 = np.abs(w1).max(axis=1)
            r2 = np.abs(w2).max(axis=(0, 2))
            live = (r1 > 0) & (r2 > 0)
            s = np.ones(len(w1))
            s[live] = np.sqrt(r1[live] / r2[live])
            weights[i] = (w1 / s[:, None]).reshape(weights[i].shape)
            if i in biases:
                biases[i] = biases[i] / s
            weights[j] = (w2 * s[None, :, None]).reshape(weights[j].shape)
            worst = max(worst, float(np.abs(s - 1).max(initial=0)))
        if worst <= tol:
            break
    state = out.state_dict()
    state.update({f"{k}.weight": w.astype(np.float32) for k, w in weights.items()})
    state.update({f"{k}.bias": b.astype(np.float32) for k, b in biases.items()})
    out.load_state_dict(state, source="equalized weights")  # (bumps the versions: caches are rebuilt)
    return out
