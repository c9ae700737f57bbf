"""QuantizedSequential: a chain of quantized stages with the FP32 Sequential's inference API."""

from __future__ import annotations

import json
import time

import numpy as np

from ..errors import InputError
from ..kernels import program
from ..model import LayerNode, LayerTrace, Model
from ..network import PROGRAM_MAX_BATCH, Sequential
from .qlayers import FloatStage, QWeighted, Stage, refuse_nonfinite_input, run_if_compiled
from .serialize import save_quantized


class QuantizedSequential(Model):
    """Integer inference of a Sequential. ``predict``, ``predict_classes``, ``accuracy`` and
    ``check_input`` are every model's (``Model``: same validation and batching); ``trace`` returns one
    record per FP32 layer, in the same order and with the same names, outputs as real (float32) values.

    ``architecture`` is the FP32 network's config; ``settings`` records how it was quantized.
    """

    def __init__(self, stages: list[Stage], architecture: dict, settings: dict | None = None):
        self.stages = list(stages)
        self.architecture = json.loads(json.dumps(architecture))
        self.settings = dict(settings or {})
        reference = Sequential.from_config(self.architecture)  # names and types only
        self.names = reference.names
        self.types = [layer.type for layer in reference.layers]
        self.input_shape = reference.input_shape
        covered = [i for s in self.stages for i in s.layers]
        if covered != list(range(len(self.names))):
            raise InputError(f"stages must cover layers 0..{len(self.names) - 1} in order, found {covered}")

    def __len__(self):
        return len(self.stages)

    def __repr__(self):
        body = "\n".join(f"  ({i}) {s.kind} {self._stage_name(s)} {s.precision}"
                         for i, s in enumerate(self.stages))
        return f"QuantizedSequential(\n{body}\n)"

    def _stage_name(self, stage: Stage) -> str:
        return "+".join(self.names[i] for i in stage.layers) or stage.kind

    def __getstate__(self):
        # A copy gets no compiled program: its rows hold the addresses of this network's arrays.
        return {**self.__dict__, "_program": None}

    # -- inference -----------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inference, stage by stage; a small batch (fewer than PROGRAM_MAX_BATCH images) of a float32
        sample shape seen before runs as one compiled program instead (``kernels.program``: the same
        kernels, so the same bits, without the per-stage checks and calls)."""
        prog = getattr(self, "_program", None)
        compiled = run_if_compiled(prog, x, self.stages, PROGRAM_MAX_BATCH)
        if compiled is not None:
            return compiled
        refuse_nonfinite_input(x)
        sample_shape = x.shape[1:] if isinstance(x, np.ndarray) else None
        for stage in self.stages:
            x = stage.run(x)
        if (prog is None or prog[1] != sample_shape or prog[0] != self.stages) and sample_shape is not None:
            self._program = self._build_program(tuple(sample_shape), x.shape[1:])
        return x

    def _build_program(self, sample_shape: tuple, out_shape: tuple):
        """(stages, sample shape, output shape, op table, kept arrays), or None when a stage has no ops
        or the network does not end in float32 (the interpreter returns its float buffer)."""
        if len(sample_shape) != 3:
            return None
        rows: list[list[int]] = []
        keep: list[object] = []  # what the rows point at, kept alive
        chw = sample_shape
        for stage in self.stages:
            built = stage.program_ops(chw, keep)
            if built is None:
                return None
            ops, chw = built
            rows += ops  # chw: what the next stage's rows see (a flattened vector is (F, 1, 1))
        if self.stages[-1].out_act is not None:
            return None
        table = np.array(rows, np.int64).reshape(len(rows), program.FIELDS)
        return list(self.stages), sample_shape, out_shape, table, keep

    def _ends_in_softmax(self) -> bool:
        last = self.stages[-1]
        return isinstance(last, FloatStage) and last.layer.type == "Softmax"

    def logits(self, x: np.ndarray) -> np.ndarray:
        stages = self.stages[:-1] if self._ends_in_softmax() else self.stages
        refuse_nonfinite_input(x)
        for stage in stages:
            x = stage.run(x)
        return x

    def trace(self, x) -> list[LayerTrace]:
        """Run once, keeping each FP32 layer's output (dequantized) and time. A fused ReLU repeats its
        convolution's output with 0 s; (de)quantization time goes to the next layer (the last at the end)."""
        x = self.check_input(x)
        records, pending = [], 0.0
        for stage in self.stages:
            t0 = time.perf_counter()
            x = stage.run(x)
            seconds = time.perf_counter() - t0
            if not stage.layers:
                pending += seconds
                continue
            real = stage.dequantize(x)
            for j, i in enumerate(stage.layers):
                records.append(LayerTrace(i, self.names[i], self.types[i], real,
                                          seconds + pending if j == 0 else 0.0))
            pending = 0.0
        records[-1].seconds += pending
        return records

    def stage_inputs(self, stage: Stage) -> list[str]:
        """The FP32 network's tensor ``stage`` reads: the output of the layer before its first."""
        first = stage.layers[0]
        return [self.names[first - 1] if first > 0 else self.input_name]

    # -- memory and description ------------------------------------------------------------------
    def layer_nodes(self) -> list[LayerNode]:
        """The FP32 layers this model quantizes (rebuilt from ``architecture``: types and shapes)."""
        return Sequential.from_config(self.architecture).layer_nodes()

    @property
    def nbytes(self) -> int:
        """Bytes stored: integer weights (packed for 4 bits), scales, zero points, biases, and the
        float32 parameters of layers kept in FP32. The copies the kernels read (``kernel_nbytes``) are
        not counted: they are derived from these on loading."""
        return sum(s.nbytes for s in self.stages)

    @property
    def kernel_nbytes(self) -> int:
        """Bytes held in memory beside ``nbytes`` while the model is loaded: the int8 weight codes and
        their copies repacked for the integer kernels (one byte or more per weight at any bit width)."""
        return sum(s.kernel_nbytes for s in self.stages)

    def layer_precisions(self) -> dict:
        """FP32-layer name -> "W8A8" / "W4A4" / "FP32" for the layers with weights."""
        out = {}
        for s in self.stages:
            if isinstance(s, QWeighted | FloatStage) and s.precision != "-":
                out[self.names[s.layers[0]]] = s.precision
        return out

    def summary(self):
        """One row per stage: Layer(s), Stage, Precision, Bytes."""
        import pandas as pd

        return pd.DataFrame([{"Layer": self._stage_name(s), "Stage": s.kind, "Precision": s.precision,
                              "Bytes": s.nbytes} for s in self.stages])

    def save(self, path) -> None:
        """Write a self-describing file that ``microcnn.load`` reads back."""
        save_quantized(self, path)
