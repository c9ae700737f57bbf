"""Calibration: run sample images through the FP32 network and let one observer per activation tensor
(the network input and every layer's output) collect statistics."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np

from ..errors import InputError
from .observers import OBSERVERS, Observer, make_observer
from .params import ActQuant, check_bits
from .serialize import INPUT, read_calibration, save_calibration


class Calibration:
    """Per-tensor observers of one network, plus the calibration images (bias correction reuses them).

    ``range(name, bits)`` and ``act_quant(name, bits)`` give the clipping range / quantization of a
    tensor for a bit width; ranges are cached per (tensor, bits)."""

    def __init__(self, method: str, observers: OrderedDict, architecture: dict, images: np.ndarray,
                 seed: int = 0):
        self.method = method
        self.observers = observers
        self.architecture = architecture
        self.images = images
        self.seed = seed
        self._ranges: dict = {}

    @property
    def names(self) -> list[str]:
        return list(self.observers)

    @property
    def samples(self) -> int:
        return len(self.images)

    def observer(self, name: str) -> Observer:
        if name not in self.observers:
            raise InputError(f"calibration has no tensor {name!r}; it has {self.names}")
        return self.observers[name]

    def range(self, name: str, bits: int = 8) -> tuple[float, float]:
        bits = check_bits(bits)
        key = (name, bits)
        if key not in self._ranges:
            self._ranges[key] = self.observer(name).range(bits)
        return self._ranges[key]

    def act_quant(self, name: str, bits: int = 8) -> ActQuant:
        lo, hi = self.range(name, bits)
        return ActQuant.from_range(lo, hi, bits, name=f"calibrated range of {name}")

    def check_network(self, net) -> None:
        """InputError unless this calibration was made on a network of ``net``'s architecture."""
        key = "nodes" if "nodes" in self.architecture else "layers"
        if self.architecture.get(key) != net.config().get(key):
            raise InputError(f"calibration was made for another architecture "
                             f"({_layer_types(self.architecture)}) than the network "
                             f"({_layer_types(net.config())})")

    def table(self, bits: int = 8):
        """One row per tensor: observed min/max, the chosen range at ``bits`` and the resulting scale."""
        import pandas as pd

        rows = []
        for name, obs in self.observers.items():
            lo, hi = self.range(name, bits)
            q = self.act_quant(name, bits)
            rows.append({"Tensor": name, "Observer": obs.kind, "Min": obs.min_val, "Max": obs.max_val,
                         "Range Lo": lo, "Range Hi": hi, "Scale": q.scale, "Zero Point": q.zero_point})
        return pd.DataFrame(rows)

    def save(self, path) -> None:
        """Write the observers' state and the calibration images (``Calibration.load`` reads them)."""
        save_calibration(self, path)

    @staticmethod
    def load(path, net=None) -> Calibration:
        """Read a calibration file; with ``net``, refuse one made for another architecture."""
        return Calibration(*read_calibration(path, net))

    def __repr__(self):
        return f"Calibration(method={self.method!r}, samples={self.samples}, tensors={len(self.observers)})"


def _layer_types(arch: dict) -> list:
    return [c.get("type") for c in arch.get("layers", [])]


def calibrate(net, images, method: str = "mse", samples: int = 100, progress: bool = True, seed: int = 0,
              batch_size: int = 10, **observer_options) -> Calibration:
    """Collect activation statistics of ``net`` (a Sequential or a Graph: one observer for the input and
    one per layer / node output, by name) on up to ``samples`` of ``images``.

    ``images`` must not be the evaluation set (use the training split). When there are more images than
    ``samples``, a seeded random subset is taken. Layers run one at a time on batches of ``batch_size``
    (the unit of the moving-average observer). ``method``: "mse" | "minmax" | "ema" | "percentile" |
    "entropy"; ``observer_options`` go to the observer (e.g. ``percentile=99.9``, ``bins=2048``).
    """
    from ..graph import Graph
    from ..network import Sequential

    if not isinstance(net, Sequential | Graph):
        raise InputError(f"net: expected a microcnn Sequential or Graph, found {type(net).__name__}")
    if method not in OBSERVERS:
        raise InputError(f"method: expected one of {sorted(OBSERVERS)}, found {method!r}")
    if not isinstance(samples, int | np.integer) or samples < 1:
        raise InputError(f"samples: expected a positive integer, found {samples!r}")
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer, found {batch_size!r}")
    x = net.check_input(images, name="calibration images")
    if len(x) > samples:
        pick = np.sort(np.random.default_rng(seed).choice(len(x), size=samples, replace=False))
        x = x[pick]
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        raise InputError(f"calibration images: all {len(x)} images are constant (every value {lo:g}); "
                         "a zero range gives no quantization scale: calibrate on real samples")
    # the input tensor, then every layer's (node's) output; a Graph's nodes read tensors by name
    source = net.input_name if isinstance(net, Graph) else INPUT
    nodes = [(n.name, n.layer, n.inputs) for n in net.layer_nodes()]
    observers = OrderedDict((t, make_observer(method, t, **observer_options)) for t in [source, *net.names])
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"calibrate ({method})", unit="batch")
    for s in starts:
        env = {source: x[s:s + batch_size]}
        observers[source].observe(env[source])
        for name, layer, inputs in nodes:
            env[name] = layer.forward(*(env[i] for i in inputs))
            observers[name].observe(env[name])
    return Calibration(method, observers, json.loads(json.dumps(net.config())), x.copy(), seed)


def load_calibration(path, net=None) -> Calibration:
    """``Calibration.load(path, net)``."""
    return Calibration.load(path, net)
