"""Quantized graphs: integer inference of a ``Graph`` (residual Add, channel Concat).

Every node runs as the stage a Sequential would give it (``quantize``'s weighted stages with the
BatchNorm folded in and a following ReLU / max pool fused; integer ReLU, max pool and flatten; FP32
stages for the rest), wired by tensor name. A quantized tensor carries its own calibrated range. Add and
Concat are integer stages in the TFLite/QNNPACK manner: each input is rescaled to the output scale by a
fixed-point multiplier (the rounding rule of ``kernels.integer``), then summed (Add) or joined (Concat)
and clamped, so the inputs of a residual connection may have any scales and the output has the
calibrated range of the sum.

``QAdd`` keeps ``ADD_FRACTION_BITS`` fractional bits of every rescaled input and rounds once more after
the sum: y = round(sum_i M_i (q_i - z_i)) up to 2**-16 of an output step per input. ``QConcat`` rescales
each input with one rounding (an input already on the output grid passes unchanged).
"""

from __future__ import annotations

import json
import time

import numpy as np

from ..errors import InputError
from ..graph import Add, Concat, Graph
from ..kernels import program
from ..kernels.integer import MODE_DEQUANT
from ..layers import Conv2d, Flatten, Linear, ReLU
from ..model import LayerNode, LayerTrace, Model
from ..network import PROGRAM_MAX_BATCH, fold_pair, folds_into
from .params import KERNEL_BITS, ActQuant
from .qlayers import (
    DequantizeStage,
    FlattenStage,
    FloatStage,
    QAdd,
    QConcat,
    QMaxPool2d,
    QReLU,
    QuantizeStage,
    QWeighted,
    Stage,
    copy_layer,
    integer_pool,
    refuse_nonfinite_input,
    run_if_compiled,
)
from .serialize import save_quantized


def _writes_codes(row) -> bool:
    """Whether the program op ``row`` leaves uint8 codes (else float32 values) as its output."""
    code = row[program.CODE]
    if code in (program.OP_QCONV, program.OP_QLINEAR):
        return row[program.MODE] != MODE_DEQUANT
    return code in (program.OP_QUANTIZE, program.OP_QMAXPOOL, program.OP_QRELU, program.OP_QADD,
                    program.OP_QLOAD)


class QuantizedGraph(Model):
    """Integer inference of a Graph: ``steps`` of (stage, input tensor keys, output key) in run order.

    The model interface of every model; ``trace`` gives one record per graph node, in the graph's order
    and with its names (a fused node repeats its stage's output, as in ``QuantizedSequential``).
    """

    def __init__(self, steps: list, architecture: dict, settings: dict, output: str, logits: str):
        self.steps = list(steps)
        self.architecture = json.loads(json.dumps(architecture))
        self.settings = dict(settings)
        reference = Graph.from_config(self.architecture)
        self.names = reference.names
        self.types = [layer.type for layer in reference.layers]
        self.input_shape, self.input_name = reference.input_shape, reference.input_name
        self.output_key, self.logits_key = output, logits
        last_read = {key: k for k, (_, ins, _) in enumerate(self.steps) for key in ins}
        # per step: the tensors no later step reads, dropped after it (the results are never dropped)
        self._free = [tuple(key for key in dict.fromkeys(ins)
                            if last_read[key] == k and key not in (output, logits))
                      for k, (_, ins, _) in enumerate(self.steps)]
        covered = sorted(i for stage, _, _ in self.steps for i in stage.layers)
        if covered != list(range(len(self.names))):
            raise InputError(f"steps must cover nodes 0..{len(self.names) - 1} once each, found {covered}")

    @property
    def stages(self) -> list[Stage]:
        return [stage for stage, _, _ in self.steps]

    def __getstate__(self):
        # A copy gets no compiled program: its rows hold the addresses of this network's arrays.
        return {**self.__dict__, "_program": None}

    def __repr__(self):
        body = "\n".join(f"  {out} = {s.kind}({', '.join(ins)}) {s.precision}" for s, ins, out in self.steps)
        return f"QuantizedGraph(\n{body}\n)"

    def _run(self, x, key: str, record=None):
        refuse_nonfinite_input(x)
        env = {self.input_name: x}
        for (stage, ins, out), free in zip(self.steps, self._free, strict=True):
            t0 = time.perf_counter()
            env[out] = stage.run(*(env[i] for i in ins))
            if record is not None:
                record(stage, env[out], time.perf_counter() - t0)
            for name in free:
                del env[name]
        return env[key]

    def forward(self, x):
        """Inference step by step; a small batch (fewer than PROGRAM_MAX_BATCH images) of a float32
        sample shape seen before runs as one compiled program (``kernels.program``, as
        ``QuantizedSequential``: the same kernels and bits, a tensor read by a later step kept in a slot)."""
        prog = getattr(self, "_program", None)
        compiled = run_if_compiled(prog, x, self.stages, PROGRAM_MAX_BATCH)
        if compiled is not None:
            return compiled
        out = self._run(x, self.output_key)
        sample = x.shape[1:] if isinstance(x, np.ndarray) else None
        if sample is not None and (prog is None or prog[1] != sample or prog[0] != self.stages):
            self._program = self._build_program(tuple(sample), out.shape[1:])
        return out

    def _build_program(self, sample_shape: tuple, out_shape: tuple):
        """(stages, sample shape, output shape, op table, kept arrays) of the steps as one program, or None
        when a stage has no ops (a grouped convolution, a Concat), the output is not float32, or more
        than ``program.MAX_SLOTS`` tensors wait at once for a later step."""
        last, _, last_out = self.steps[-1]
        if len(sample_shape) != 3 or last_out != self.output_key or last.out_act is not None:
            return None
        readers: dict = {}
        for k, (_, ins, _) in enumerate(self.steps):
            for key in ins:
                readers.setdefault(key, []).append(k)
        rows: list[list[int]] = []
        keep: list[object] = []
        slots: dict = {}  # tensor -> slot holding its codes
        shapes = {self.input_name: tuple(sample_shape)}
        codes = {self.input_name: False}  # tensor -> whether the program holds it as codes (else float32)
        current = self.input_name
        for k, (stage, ins, out) in enumerate(self.steps):
            first = len(rows)
            if isinstance(stage, QAdd):
                if len(ins) != 2 or ins[0] == ins[1]:
                    return None
                if current not in ins:  # bring the first input back
                    if ins[0] not in slots:
                        return None
                    rows.append(program.op_row(program.OP_QLOAD, out=slots[ins[0]]))
                    current = ins[0]
                other = ins[1] if ins[0] == current else ins[0]
                row = stage.program_row(slots[other], ins.index(current), keep) if other in slots else None
                if row is None:
                    return None
                rows.append(row)
                chw = shapes[current]
            else:
                if len(ins) != 1:
                    return None
                if ins[0] != current:
                    if ins[0] not in slots:
                        return None
                    rows.append(program.op_row(program.OP_QLOAD, out=slots[ins[0]]))
                built = stage.program_ops(shapes[ins[0]], keep)
                if built is None:
                    return None
                ops, chw = built
                rows += ops
            current, shapes[out] = out, tuple(chw)
            codes[out] = _writes_codes(rows[-1]) if len(rows) > first else codes[ins[0]]  # (flatten: none)
            for key in [key for key in slots if max(readers[key]) <= k]:  # read by no later step
                del slots[key]
            if any(r > k + 1 for r in readers.get(out, [])):  # read again after the next step
                free = sorted(set(range(program.MAX_SLOTS)) - set(slots.values()))
                if not free or not codes[out]:  # the slots hold codes only
                    return None
                slots[out] = free[0]
                row = program.op_row(program.OP_QSAVE, out=free[0])
                row[program.WORDS] = int(np.prod(chw))
                rows.append(row)
        table = np.array(rows, np.int64).reshape(len(rows), program.FIELDS)
        return list(self.stages), sample_shape, out_shape, table, keep

    def logits(self, x):
        return self._run(x, self.logits_key)

    def trace(self, x) -> list[LayerTrace]:
        """Run once, keeping each node's output (dequantized) and its stage's time (conversions between
        domains count towards the next node)."""
        records: dict = {}
        pending = [0.0]

        def record(stage, y, seconds):
            if not stage.layers:
                pending[0] += seconds
                return
            real = stage.dequantize(y)
            for j, i in enumerate(stage.layers):
                records[i] = LayerTrace(i, self.names[i], self.types[i], real, seconds + pending[0] if j == 0
                                        else 0.0)
            pending[0] = 0.0

        self._run(self.check_input(x), self.output_key, record)
        return [records[i] for i in range(len(self.names))]

    def stage_inputs(self, stage: Stage) -> list[str]:
        """The FP32 graph's tensors ``stage`` reads (in either domain)."""
        ins = next(ins for s, ins, _ in self.steps if s is stage)
        # "t:q" / "t:f": the tensor t quantized / dequantized by a conversion step
        return [key[:-2] if key.endswith((":q", ":f")) else key for key in ins]

    def layer_nodes(self) -> list[LayerNode]:
        return Graph.from_config(self.architecture).layer_nodes()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stages)

    def layer_precisions(self) -> dict:
        """Node name -> "W8A8" / "FP32" for the nodes with weights."""
        return {self.names[s.layers[0]]: s.precision for s in self.stages
                if isinstance(s, QWeighted | FloatStage) and s.precision != "-"}

    def summary(self):
        """One row per stage: Layer(s), Stage, Inputs, Precision, Bytes."""
        import pandas as pd

        return pd.DataFrame([{"Layer": "+".join(self.names[i] for i in s.layers) or s.kind, "Stage": s.kind,
                              "Inputs": ", ".join(ins), "Precision": s.precision, "Bytes": s.nbytes}
                             for s, ins, _ in self.steps])

    def save(self, path) -> None:
        """Write a self-describing file (``microcnn.load`` reads it back): each stage's description with
        the tensors it reads and writes, and the output and logits tensors."""
        specs = [{**s.spec(), "inputs": list(ins), "output": out} for s, ins, out in self.steps]
        save_quantized(self, path, specs, outputs=[self.output_key, self.logits_key])


class GraphBuilder:
    """Walks a Graph's nodes in order, appending steps; ``weighted`` makes the QConv2d/QLinear stages
    (``quantize._Builder.weighted_stage``: rounding, bias correction). With calibration images it keeps
    each tensor's FP32 values and each step's output on them."""

    def __init__(self, graph: Graph, calibration, bits: dict, act_bits: int, weighted, images):
        self.graph, self.cal, self.bits, self.act_bits = graph, calibration, bits, act_bits
        self.weighted = weighted
        self.index = {n.name: k for k, n in enumerate(graph.nodes)}
        self.readers: dict[str, list] = {}
        for n in graph.nodes:
            for i in dict.fromkeys(n.inputs):
                self.readers.setdefault(i, []).append(n)
        self.steps: list = []
        self.held = {graph.input_name: (graph.input_name, None)}  # tensor -> (key, ActQuant | None)
        self.converted: dict = {}  # (tensor, "q" | "f") -> key of its other domain
        self.images = images
        self.env_float = self._float_values(images) if images is not None else None
        self.env_quant = {graph.input_name: images} if images is not None else None

    def _float_values(self, x) -> dict:
        env = {self.graph.input_name: x}
        for n in self.graph.nodes:
            env[n.name] = n.layer.forward(*(env[i] for i in n.inputs))
        return env

    def _add(self, stage, ins, out, tensor=None):
        self.steps.append((stage, tuple(ins), out))
        if tensor is not None:
            self.held[tensor] = (out, stage.out_act)
        if self.env_quant is not None:
            self.env_quant[out] = stage.run(*(self.env_quant[i] for i in ins))

    def _sole_reader(self, name: str):
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name != self.graph.output_name else None

    def integer(self, tensor: str) -> tuple[str, ActQuant]:
        """The key of ``tensor`` on integers (quantized with its calibrated range if it is real) and its
        quantization."""
        key, act = self.held[tensor]
        if act is not None:
            return key, act
        if (tensor, "q") not in self.converted:
            stage = QuantizeStage(self.cal.act_quant(tensor, self.act_bits))
            self._add(stage, [key], f"{tensor}:q")
            self.converted[tensor, "q"] = (f"{tensor}:q", stage.out_act)
        return self.converted[tensor, "q"]

    def real(self, tensor: str) -> str:
        key, act = self.held[tensor]
        if act is None:
            return key
        if (tensor, "f") not in self.converted:
            self._add(DequantizeStage(act), [key], f"{tensor}:f")
            self.converted[tensor, "f"] = (f"{tensor}:f", None)
        return self.converted[tensor, "f"][0]

    def _wants_integer(self, tensor: str) -> bool:
        """Whether a reader of ``tensor`` computes on integers (else the producer outputs real values)."""
        for n in self.readers.get(tensor, []):
            layer = n.layer
            if isinstance(layer, Add | Concat | ReLU | Flatten) or integer_pool(layer) or (
                    isinstance(layer, Conv2d | Linear) and self.bits[n.name] in KERNEL_BITS):
                return True
        return False

    def build(self):
        done: set = set()
        for node in self.graph.nodes:
            if node.name in done:
                continue
            layer = node.layer
            if isinstance(layer, Conv2d | Linear) and self.bits[node.name] in KERNEL_BITS:
                chain = self._chain(node)
                done.update(n.name for n in chain)
                self._weighted(chain)
            elif isinstance(layer, Conv2d | Linear) and self._chain(node)[1:2]:
                bn = self._chain(node)[1]  # an FP32 weighted node: its BatchNorm folded in, one stage
                if folds_into(layer, bn.layer):
                    done.add(bn.name)
                    pair = (self.index[node.name], self.index[bn.name])
                    source = self.real(node.inputs[0])
                    self._add(FloatStage(pair, fold_pair(layer, bn.layer)), [source], bn.name, bn.name)
                else:
                    self._single(node)
            elif isinstance(layer, Add | Concat):
                self._merge(node, done)
            else:
                self._single(node)
            done.add(node.name)
        return self.steps, self.real(self.graph.output_name), self.real(self.graph.logits_name)

    def _chain(self, node) -> list:
        """The weighted node, a BatchNorm folded into it, a ReLU and (convolutions) a max pool fused
        after it, each the only reader of the tensor before."""
        chain, last = [node], node
        for want in ("bn", "relu", "pool"):
            nxt = self._sole_reader(last.name)
            if nxt is None:
                break
            ok = {"bn": folds_into(node.layer, nxt.layer), "relu": isinstance(nxt.layer, ReLU),
                  "pool": isinstance(node.layer, Conv2d) and integer_pool(nxt.layer)}[want]
            if ok:
                chain.append(nxt)
                last = nxt
        return chain

    def _weighted(self, chain) -> None:
        node, last = chain[0], chain[-1]
        bn = chain[1].layer if len(chain) > 1 and folds_into(node.layer, chain[1].layer) else None
        layer = fold_pair(node.layer, bn) if bn is not None else node.layer
        relu = any(isinstance(n.layer, ReLU) for n in chain)
        pool = (last.layer.kernel_size, last.layer.stride) if integer_pool(last.layer) else None
        in_key, in_act = self.integer(node.inputs[0])
        out_act = self.cal.act_quant(last.name, self.act_bits) if self._wants_integer(last.name) else None
        covered = tuple(self.index[n.name] for n in chain)
        x_quant = self.env_quant[in_key] if self.env_quant is not None else None
        x_float = self.env_float[node.inputs[0]] if self.env_float is not None else None
        stage = self.weighted(node.name, layer, covered, in_act, out_act, relu, pool, x_quant, x_float)
        self._add(stage, [in_key], last.name, last.name)

    def _merge(self, node, done: set) -> None:
        ins = [self.integer(i) for i in node.inputs]
        covered, last, relu = [self.index[node.name]], node.name, False
        nxt = self._sole_reader(node.name)
        if isinstance(node.layer, Add) and nxt is not None and isinstance(nxt.layer, ReLU):
            covered.append(self.index[nxt.name])
            last, relu = nxt.name, True
            done.add(nxt.name)
        out_act = self.cal.act_quant(last, self.act_bits)
        acts = [a for _, a in ins]
        stage = (QAdd(covered, acts, out_act, relu) if isinstance(node.layer, Add)
                 else QConcat(covered, acts, out_act, node.layer.axis))
        self._add(stage, [k for k, _ in ins], last, last)

    def _single(self, node) -> None:
        layer, src = node.layer, node.inputs[0]
        key, act = self.held[src]
        k = (self.index[node.name],)
        if act is not None and isinstance(layer, ReLU):
            self._add(QReLU(k, act), [key], node.name, node.name)
        elif act is not None and integer_pool(layer):
            self._add(QMaxPool2d(k, act, layer.kernel_size, layer.stride), [key], node.name, node.name)
        elif isinstance(layer, Flatten):
            self._add(FlattenStage(k, act), [key], node.name, node.name)
        else:
            self._add(FloatStage(k, copy_layer(layer)), [self.real(src)], node.name, node.name)
