"""Graph: a network whose layers form a directed acyclic graph (residual additions, channel
concatenation), with the same model interface, training and files as ``Sequential``.

A node is ``(name, layer, [input names])``; its output is named after it. ``Add`` and ``Concat`` read
several tensors, every other layer one. Inference lowers each chain of nodes that only feed each other
(one consumer each) with ``network.fuse_chain``, the lowering Sequential uses, so Conv+ReLU+MaxPool and
Linear+ReLU run as one call inside a graph too; a tensor is dropped once its last consumer has run.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np

from . import autograd as ag
from .autograd import Tensor
from .checks import check_array_batch, check_count
from .errors import FileFormatError, InputError
from .io import MAX_ACTIVATION_ELEMENTS
from .layers import Layer, Softmax, layer_from_config, state_shapes
from .model import INPUT, LayerNode, LayerTrace, sample_output_shape
from .network import CompiledProgram, FloatModel, FusedGroup, fold_pair, folds_into, fuse_chain, run_groups


def _same_rank(op: str, shapes) -> None:
    if len(shapes) < 1 or len({len(s) for s in shapes}) != 1:
        raise InputError(f"{op}: expected inputs of one rank, found shapes {[tuple(s) for s in shapes]}")


class Add(Layer):
    """Elementwise sum of two or more tensors of one shape: a residual connection.

    Shape:
        inputs (N, *S) each -> output (N, *S).

    Example::

        >>> Graph([("a", Conv2d(3, 3, 3, padding=1), ["input"]), ("sum", Add(), ["input", "a"])],
        ...       "input", "sum", input_shape=(3, 8, 8))
    """

    min_inputs = 2

    def output_shape(self, *shapes):
        _same_rank("Add", shapes)
        if len(shapes) < 2 or any(tuple(s) != tuple(shapes[0]) for s in shapes):
            raise InputError(f"Add: expected two or more inputs of one shape, found "
                             f"{[tuple(s) for s in shapes]}")
        return tuple(shapes[0])

    def forward(self, *xs, into: int | None = None):
        """The sum, in the inputs' order (same bits on every run): a new array, or with ``into`` (0 or
        1) written over ``xs[into]``, an intermediate the caller owns and reads nowhere else (a Graph
        passes it to save an allocation and its page faults)."""
        self.output_shape(*(x.shape for x in xs))
        out = np.add(xs[0], xs[1], out=None if into is None else xs[into])
        for x in xs[2:]:
            np.add(out, x, out=out)
        return out

    def forward_tensor(self, *ts):
        self.output_shape(*(t.shape for t in ts))
        out = ts[0]
        for t in ts[1:]:
            out = ag.add(out, t)
        return out

    def __call__(self, *xs):
        return self.forward_tensor(*xs) if isinstance(xs[0], Tensor) else self.forward(*xs)


class Concat(Layer):
    """Concatenation along ``axis`` (1: channels, as ``torch.cat(xs, dim=1)``); never the batch axis.

    Args:
        axis: the axis of the batched (N, ...) tensors to join along, >= 1.

    Shape:
        inputs (N, C_i, H, W) -> output (N, sum C_i, H, W) for axis 1 (likewise other axes).
    """

    min_inputs = 1

    def __init__(self, axis: int = 1):
        self.axis = check_count("Concat axis", axis)

    def config(self):
        return {"axis": self.axis}

    def output_shape(self, *shapes):
        _same_rank("Concat", shapes)
        k = self.axis - 1  # shapes here are one sample's, without the batch axis
        if k >= len(shapes[0]) or any(tuple(s[:k]) + tuple(s[k + 1:]) != tuple(shapes[0][:k]) +
                                      tuple(shapes[0][k + 1:]) for s in shapes):
            raise InputError(f"Concat(axis={self.axis}): expected inputs equal but along axis {self.axis}, "
                             f"found {[('N', *s) for s in shapes]}")
        return (*shapes[0][:k], sum(s[k] for s in shapes), *shapes[0][k + 1:])

    def forward(self, *xs):
        self.output_shape(*(x.shape[1:] for x in xs))
        return np.concatenate(xs, axis=self.axis)

    def forward_tensor(self, *ts):
        self.output_shape(*(t.shape[1:] for t in ts))
        ends = np.cumsum([t.shape[self.axis] for t in ts])[:-1]

        def backward(g):  # each input gets its own slice of the gradient
            return tuple(np.ascontiguousarray(part) for part in np.split(g, ends, axis=self.axis))

        return ag.make_result(np.concatenate([t.data for t in ts], axis=self.axis), tuple(ts), backward,
                              "concat")

    def __call__(self, *xs):
        return self.forward_tensor(*xs) if isinstance(xs[0], Tensor) else self.forward(*xs)


GRAPH_LAYER_TYPES = {"Add": Add, "Concat": Concat}  # the layers that read several tensors


def _graph_layer(cfg: dict) -> Layer:
    """A layer from ``{"type": name, **config()}``: Add/Concat here, every other type by ``layers``."""
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if isinstance(kind, str) and kind in GRAPH_LAYER_TYPES:
        args = {k: v for k, v in cfg.items() if k != "type"}
        try:
            return GRAPH_LAYER_TYPES[kind](**args)
        except TypeError as exc:
            raise InputError(f"bad arguments for {kind}: {args} ({exc})") from None
    return layer_from_config(cfg)


@dataclass(frozen=True)
class _Step:
    """One inference call of a plan: a fused chain (the layers ``chain`` as ``groups``) or one
    multi-input ``layer``, reading ``inputs``, naming its result ``output``, after which the tensors in
    ``free`` are dropped."""

    inputs: tuple[str, ...]
    output: str
    chain: list
    groups: tuple[FusedGroup, ...]
    layer: Layer | None
    free: tuple[str, ...]
    into: int | None = None  # an Add's input (0 or 1) it may overwrite (see ``Graph.plan``)

    def run(self, env: dict, programs: dict, key, workspace=None):
        """The step's result. A chain runs as its compiled program (``network.CompiledProgram``, kept in
        ``programs`` under ``key``) when it may, as Sequential does, else group by group, its large
        convolution outputs in ``workspace`` arrays (``network.Workspace``)."""
        if self.layer is not None:
            if self.into is not None:
                assert isinstance(self.layer, Add)  # Graph.plan sets ``into`` on Add steps only
                return self.layer.forward(*(env[i] for i in self.inputs), into=self.into)
            return self.layer.forward(*(env[i] for i in self.inputs))
        x = env[self.inputs[0]]
        prog = programs.get(key)
        if prog is not None and prog.runs(x, self.chain):
            return prog.run(x)
        sample_shape = x.shape[1:]
        x = run_groups(self.groups, x, workspace, key)
        if len(sample_shape) == 3:  # the program takes NCHW inputs
            programs[key] = CompiledProgram.refreshed(prog, self.chain, lambda: list(self.groups),
                                                      sample_shape)
        return x


class Graph(FloatModel):
    """A directed acyclic graph of named layers with one image input and one output.

    Args:
        nodes: ``(name, layer, [input names])`` per node; the output of a node is named after it. An
            input name is the graph input's or another node's. Any order; run in topological order.
        inputs: the graph input's name (a string or a one-element list).
        outputs: the output node's name (a string or a one-element list).
        input_shape: (C, H, W) of one sample, or None. With it every node's shape is checked now.

    Raises:
        InputError: naming the node, on a duplicate name, an input that is neither the graph input nor
        a node (dangling), a cycle, a node whose output nothing reads, or shapes that do not fit.

    Shape:
        ``predict``/``logits``: (N, C, H, W) -> the output node's (N, ...).

    Example::

        >>> g = Graph([("conv", Conv2d(1, 4, 3, padding=1), ["x"]), ("relu", ReLU(), ["conv"]),
        ...            ("res", Add(), ["conv", "relu"]), ("flat", Flatten(), ["res"]),
        ...            ("fc", Linear(4 * 28 * 28, 10), ["flat"]), ("prob", Softmax(), ["fc"])],
        ...           inputs="x", outputs="prob", input_shape=(1, 28, 28))
        >>> g.predict(images).shape, g.state_dict().keys()  # (N, 10), conv.weight, conv.bias, ...
    """

    def __init__(self, nodes, inputs, outputs, input_shape: tuple | None = None):
        self.input_name = _one_name(inputs, "inputs")
        self.output_name = _one_name(outputs, "outputs")
        self.nodes = _topological(_checked_nodes(nodes, self.input_name), self.input_name)
        self._check_usage()
        self.layers = [n.layer for n in self.nodes]
        self.names = [n.name for n in self.nodes]
        self._by_name = {n.name: n for n in self.nodes}
        self.input_shape = _checked_input_shape(input_shape)
        # one sample's shape per tensor name, checked now (None without an input shape)
        self.shapes = self._propagate_shapes() if self.input_shape is not None else None
        self._plans: dict = {}
        self._programs: dict = {}  # (target, step index) -> the chain's compiled program

    def _check_usage(self) -> None:
        if self.output_name not in {n.name for n in self.nodes}:
            raise InputError(f"Graph outputs: expected the name of a node, found {self.output_name!r}")
        read = {i for n in self.nodes for i in n.inputs}
        if self.input_name not in read:
            raise InputError(f"Graph inputs: no node reads the input {self.input_name!r}")
        unused = [n.name for n in self.nodes if n.name not in read and n.name != self.output_name]
        if unused:
            raise InputError(f"Graph node {unused[0]!r}: its output is never read (expected every node to "
                             f"feed the output {self.output_name!r})")

    def _propagate_shapes(self) -> dict:
        shapes = {self.input_name: self.input_shape}
        for node in self.nodes:
            ins = [shapes[i] for i in node.inputs]
            try:
                out = shapes[node.name] = sample_output_shape(node.layer, *ins)
            except (InputError, ValueError, IndexError) as exc:
                raise InputError(f"Graph node {node.name!r} ({node.layer.type}): inputs "
                                 f"{dict(zip(node.inputs, ins, strict=True))} do not fit ({exc})") from None
            if math.prod(out) > MAX_ACTIVATION_ELEMENTS:
                raise InputError(f"Graph node {node.name!r} ({node.layer.type}): expected at most "
                                 f"{MAX_ACTIVATION_ELEMENTS} values per sample, found {out}")
        return shapes

    def __getstate__(self):
        # Plans hold fused groups of this graph's layers, programs the addresses of its arrays.
        return {**self.__dict__, "_plans": {}, "_programs": {}}

    def __len__(self):
        return len(self.nodes)

    def __getitem__(self, name: str) -> Layer:
        return self._by_name[name].layer

    def __repr__(self):
        body = "\n".join(f"  {n.name}: {n.layer!r} <- {', '.join(n.inputs)}" for n in self.nodes)
        return f"Graph(input {self.input_name!r} {self.input_shape}, output {self.output_name!r},\n{body}\n)"

    # -- model interface -------------------------------------------------------------------------
    def layer_nodes(self) -> list[LayerNode]:
        """The nodes in run order."""
        return list(self.nodes)

    @property
    def logits_name(self) -> str:
        """The tensor before a final Softmax node (the output itself otherwise)."""
        out = self._by_name[self.output_name]
        return out.inputs[0] if isinstance(out.layer, Softmax) else self.output_name

    def __call__(self, x):
        return self._run_tensor(x, self.output_name) if isinstance(x, Tensor) else self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Inference on a float32 (N, C, H, W) array, through fused chains (see the module docstring)."""
        return self._run(x, self.output_name)

    def logits(self, x):
        """Scores before a final Softmax; ndarrays (inference) or Tensors (training)."""
        if isinstance(x, Tensor):
            return self._run_tensor(x, self.logits_name)
        return self._run(x, self.logits_name)

    def trace(self, x) -> list[LayerTrace]:
        """Run once node by node (no fusion), keeping every node's output and wall time."""
        env = {self.input_name: self.check_input(x)}
        records = []
        for i, node in enumerate(self.nodes):
            t0 = time.perf_counter()
            env[node.name] = node.layer.forward(*(env[j] for j in node.inputs))
            seconds = time.perf_counter() - t0
            records.append(LayerTrace(i, node.name, node.layer.type, env[node.name], seconds))
        return records

    # -- inference plan ----------------------------------------------------------------------------
    def _run(self, x, target: str):
        check_array_batch(x)
        env = {self.input_name: x}
        for k, step in enumerate(self.plan(target)):
            env[step.output] = step.run(env, self._programs, (target, k), self.workspace)
            for name in step.free:
                del env[name]
        self.workspace.release(env[target])
        return env[target]

    def _run_tensor(self, x, target: str):
        env = {self.input_name: x}
        for node in self._needed(target):
            env[node.name] = node.layer(*(env[j] for j in node.inputs))
        return env[target]

    def _needed(self, target: str) -> list:
        """The nodes ``target`` depends on (itself included), in run order."""
        want, order = {target}, []
        for node in reversed(self.nodes):
            if node.name in want:
                want.update(node.inputs)
                order.append(node)
        return order[::-1]

    def plan(self, target: str | None = None) -> list[_Step]:
        """The inference calls computing ``target`` (default: the output): chains of single-input nodes
        whose results have one reader each become one ``fuse_chain`` step; Add and Concat are steps
        of their own. Each step lists the tensors no later step reads, which are then dropped."""
        target = self.output_name if target is None else target
        if target in self._plans:
            return self._plans[target]
        nodes = self._needed(target)
        readers: dict = {}
        for node in nodes:
            for i in node.inputs:
                readers[i] = readers.get(i, 0) + 1
        readers[target] = readers.get(target, 0) + 1  # the caller reads it
        chains: list[list] = []
        tail_of: dict = {}  # a chain's last node name -> the chain
        for node in nodes:
            single = type(node.layer) not in GRAPH_LAYER_TYPES.values()
            src = node.inputs[0]
            if single and src in tail_of and readers[src] == 1:
                chain = tail_of.pop(src)
                chain.append(node)
            else:
                chain = [node]
                chains.append(chain)
            if single:
                tail_of[node.name] = chain
        steps, remaining = [], dict(readers)
        made = set()  # results that are arrays of their own (no view of another live tensor)
        for chain in chains:
            head, last = chain[0], chain[-1].name
            for i in head.inputs:
                remaining[i] -= 1
            free = tuple(i for i in dict.fromkeys(head.inputs) if remaining[i] == 0)
            if type(head.layer) in GRAPH_LAYER_TYPES.values():
                # An Add may write over its first or second input when this is that input's last
                # reader, the graph made it and it is not read twice by this Add.
                into = next((k for k, i in enumerate(head.inputs[:2]) if i in free and i in made
                             and head.inputs.count(i) == 1), None) if type(head.layer) is Add else None
                steps.append(_Step(head.inputs, last, [], (), head.layer, free, into))
                made.add(last)
            else:
                # The head's input may be overwritten only if this chain is its one reader and the
                # graph made it (an Add/Concat result: never the caller's array, never a view).
                owned = head.inputs[0] != self.input_name and readers[head.inputs[0]] == 1
                layers = [n.layer for n in chain]
                groups = tuple(fuse_chain(layers, owned))
                steps.append(_Step(head.inputs, last, layers, groups, None, free))
                if not all(layer.passes_input for layer in layers):
                    made.add(last)
        self._plans[target] = steps
        return steps

    def fold_batchnorm(self) -> Graph:
        """A new Graph with every BatchNorm node merged into the Conv2d/Linear node it reads when the BN
        is that node's only reader; the merged node keeps the conv's name and the BN's readers read it."""
        readers: dict = {}
        for n in self.nodes:
            for i in n.inputs:
                readers[i] = readers.get(i, 0) + 1
        rename: dict[str, str] = {}
        nodes: dict[str, tuple[str, Layer, list[str]]] = {}
        for n in self.nodes:
            src = self._by_name.get(n.inputs[0])
            if (src is not None and folds_into(src.layer, n.layer) and readers[src.name] == 1
                    and src.name != self.output_name):
                nodes[src.name] = (src.name, fold_pair(src.layer, n.layer), nodes[src.name][2])
                rename[n.name] = src.name
            else:
                nodes[n.name] = (n.name, copy.deepcopy(n.layer), [rename.get(i, i) for i in n.inputs])
        return Graph(list(nodes.values()), self.input_name, rename.get(self.output_name, self.output_name),
                     input_shape=self.input_shape)

    # -- parameters, architecture, files ------------------------------------------------------------
    def prefixed_layers(self) -> list[tuple[str, Layer]]:
        """State names are ``"<node>.weight"``, ``"<node>.running_mean"``, ..."""
        return [(n.name, n.layer) for n in self.nodes]

    def config(self) -> dict:
        return {"input_shape": list(self.input_shape) if self.input_shape else None,
                "inputs": [self.input_name], "outputs": [self.output_name],
                "nodes": [{"name": n.name, "inputs": list(n.inputs),
                           "layer": {"type": n.layer.type, **n.layer.config()}} for n in self.nodes]}

    @classmethod
    def from_sequential(cls, net, input_name: str = INPUT) -> Graph:
        """The chain ``net`` (a Sequential) as a graph sharing its layers, nodes named as its layers."""
        names = list(net.names)
        return cls([(n, layer, [prev]) for n, layer, prev in zip(names, net.layers, [input_name, *names],
                                                                   strict=False)],
                   input_name, names[-1], input_shape=net.input_shape)

    @classmethod
    def from_config(cls, cfg: dict) -> Graph:
        """Rebuild a graph from ``config()`` (every node, edge and shape checked)."""
        nodes = _config_nodes(cfg)
        return cls([(c["name"], _graph_layer(c["layer"]), c["inputs"]) for c in nodes], cfg.get("inputs"),
                   cfg.get("outputs"), input_shape=cfg.get("input_shape"))


def is_graph_config(arch) -> bool:
    """Whether an architecture (a file's ``architecture`` metadata) describes a Graph."""
    return isinstance(arch, dict) and "nodes" in arch


def _config_nodes(cfg) -> list:
    if not (isinstance(cfg, dict) and isinstance(cfg.get("nodes"), list)):
        raise InputError("graph architecture: expected {'nodes': [...], 'inputs': [...], 'outputs': [...]}, "
                         f"found {str(cfg)[:200]}")
    for i, c in enumerate(cfg["nodes"]):
        if not (isinstance(c, dict) and set(c) == {"name", "inputs", "layer"}
                and isinstance(c["layer"], dict)):
            raise InputError(f"graph architecture: node {i}: expected {{'name', 'inputs', 'layer'}}, "
                             f"found {str(c)[:200]}")
    return cfg["nodes"]


def declared_parameters(arch) -> dict:
    """``"<node>.<param>"`` -> shape of every parameter a graph architecture declares, computed without
    allocating any (loaders compare it with a file's tensors before building anything)."""
    declared: dict[str, tuple[int, ...]] = {}
    for c in _config_nodes(arch):
        cfg = c["layer"]
        if cfg.get("type") in GRAPH_LAYER_TYPES:
            continue
        try:
            shapes = state_shapes(cfg)
        except InputError as exc:
            raise InputError(f"graph node {str(c['name'])[:80]!r}: {exc}") from None
        declared.update((f"{c['name']}.{p}", s) for p, s in shapes.items())
    return declared


def load_graph(path, st) -> Graph:
    """The Graph of an open FP32 ``io.SafetensorsFile`` ``st`` whose architecture has nodes: tensors
    checked against the declared parameters from the header, the graph (edges, cycles, types, shapes)
    checked before any tensor byte is read."""
    from .io import architecture_of, check_declared_sizes, check_weights

    arch = architecture_of(path, st.metadata, allow_graph=True)
    kind = st.metadata.get("kind", "fp32")
    if kind != "fp32":
        raise FileFormatError(path, "a graph model is stored in FP32 only", "kind=fp32", f"kind={kind}")
    try:
        check_declared_sizes(path, arch, st.entries, kind, declared=declared_parameters(arch))
        net = Graph.from_config(arch)
    except InputError as exc:
        raise FileFormatError(path, f"architecture is invalid ({exc})") from None
    tensors = st.read()
    for name, arr in tensors.items():
        check_weights(path, name, arr)
    net.load_state_dict(tensors, source=str(path))
    return net


# -- construction checks ------------------------------------------------------------------------------
def _one_name(value, what: str) -> str:
    names = [value] if isinstance(value, str) else value
    if not (isinstance(names, list | tuple) and len(names) == 1 and isinstance(names[0], str) and names[0]):
        raise InputError(f"Graph {what}: expected one name (a string or a one-element list), found {value!r}")
    return names[0]


def _checked_input_shape(shape):
    if shape is None:
        return None
    dims = tuple(shape) if isinstance(shape, list | tuple) else ()
    if len(dims) != 3 or not all(isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 1
                                 for d in dims):
        raise InputError(f"input_shape: expected None or (C, H, W) positive integers, found {shape!r}")
    if math.prod(dims) > MAX_ACTIVATION_ELEMENTS:
        raise InputError(f"input_shape: expected at most {MAX_ACTIVATION_ELEMENTS} values per sample, "
                         f"found {list(dims)}")
    return tuple(int(d) for d in dims)


def _checked_nodes(nodes, input_name: str) -> list[LayerNode]:
    if not isinstance(nodes, list | tuple) or not nodes:
        raise InputError(f"Graph nodes: expected a non-empty list of (name, layer, [inputs]), "
                         f"found {nodes!r:.100}")
    out, seen = [], {input_name}
    for k, node in enumerate(nodes):
        if not (isinstance(node, list | tuple) and len(node) == 3):
            raise InputError(f"Graph node {k}: expected (name, layer, [input names]), found {node!r:.100}")
        name, layer, inputs = node
        if not isinstance(name, str) or not name or "." in name:
            raise InputError(f"Graph node {k}: expected a non-empty name without '.', found {name!r}")
        if name in seen:
            raise InputError(f"Graph node {name!r}: duplicate name (each node and the input need their own)")
        seen.add(name)
        if not isinstance(layer, Layer):
            raise InputError(f"Graph node {name!r}: expected a Layer, found {type(layer).__name__}")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not (isinstance(inputs, list | tuple) and all(isinstance(i, str) for i in inputs)):
            raise InputError(f"Graph node {name!r}: expected a list of input names, found {inputs!r:.100}")
        multi = type(layer) in GRAPH_LAYER_TYPES.values()
        low = layer.min_inputs if multi and isinstance(layer, Add | Concat) else 1  # multi implies Add/Concat
        if len(inputs) < low or (not multi and len(inputs) != 1):
            want = f"at least {low}" if multi else "exactly 1"
            raise InputError(f"Graph node {name!r} ({layer.type}): expected {want} input(s), "
                             f"found {list(inputs)}")
        out.append(LayerNode(name, layer, tuple(inputs)))
    names = {n.name for n in out} | {input_name}
    for n in out:
        for i in n.inputs:
            if i not in names:
                raise InputError(f"Graph node {n.name!r}: input {i!r} is neither the graph input "
                                 f"{input_name!r} nor a node (dangling edge)")
    if len({id(n.layer) for n in out}) != len(out):
        raise InputError("Graph nodes: a Layer object appears in two nodes; give each node its own layer")
    return out


def _topological(nodes: list[LayerNode], input_name: str) -> list[LayerNode]:
    """``nodes`` in an order where every node comes after its inputs: the given order when it is one,
    else each time the earliest given node whose inputs are ready (a heap: n log n even for a hostile
    file's hundred thousand nodes in reverse); or InputError naming a node on a cycle."""
    import heapq

    waiting = [len(set(n.inputs) - {input_name}) for n in nodes]
    readers: dict = {}
    for k, n in enumerate(nodes):
        for i in set(n.inputs) - {input_name}:
            readers.setdefault(i, []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for r in readers.get(nodes[k].name, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(nodes):
        pending = {n.name: n for k, n in enumerate(nodes) if waiting[k] > 0}
        loop = _cycle(pending, next(iter(pending.values())))
        raise InputError(f"Graph node {loop[0]!r}: on a cycle ({' -> '.join(loop)}); a graph must be "
                         "acyclic")
    return order


def _cycle(pending: dict, node: LayerNode) -> list[str]:
    """A cycle among ``pending`` nodes (each has an unfinished input), found by walking inputs back."""
    path: dict[str, int] = {}
    while node.name not in path:
        path[node.name] = len(path)
        node = pending[next(i for i in node.inputs if i in pending)]
    loop = list(path)[path[node.name]:][::-1]  # in data-flow order
    return [*loop, loop[0]]
