"""Small batches of a quantized graph run as one compiled program (``kernels.program``): a tensor that a
later step than the next one reads waits in a slot (OP_QSAVE / OP_QLOAD), a residual Add sums the current
codes with a slot's (OP_QADD). The reference is the same network run step by step (batches of 32 and
more, or read-only arrays, take that path): the program must give its bits at every batch size, whichever
Add input is current, with a fused ReLU; graphs it cannot express (Concat, grouped convolutions, more
than ``MAX_SLOTS`` waiting tensors, a float32 tensor read twice) keep the step path and its results."""

import copy
import pickle

import numpy as np
import pytest

from microcnn import Add, BatchNorm2d, Concat, Conv2d, Flatten, GlobalAvgPool2d, Graph, Linear, ReLU
from microcnn.kernels import program
from microcnn.quant import calibrate, quantize

RNG = np.random.default_rng(31)
X = RNG.random((64, 2, 9, 11), dtype=np.float32)  # non-square, 2 channels


def _bn(c, seed):
    rng = np.random.default_rng(seed)
    bn = BatchNorm2d(c)
    bn.running_mean[:], bn.running_var[:] = rng.normal(0, 0.2, c), rng.random(c) + 0.5
    bn.weight.data[:], bn.bias.data[:] = rng.random(c) + 0.5, rng.normal(0, 0.1, c)
    return bn


def _resnet(swap=False, seed=2) -> Graph:
    """Stem; a block whose Add reads (main, skip) or, with ``swap``, (skip, main); a downsampling block
    with a 1x1 projection (its Add's inputs both wait: the projection runs before the main path)."""
    rng = np.random.default_rng(seed)
    pair = (["b_bn", "stem_relu"] if not swap else ["stem_relu", "b_bn"])
    nodes = [("stem", Conv2d(2, 8, 3, padding=1, bias=False, rng=rng), ["x"]),
             ("stem_bn", _bn(8, 1), ["stem"]), ("stem_relu", ReLU(), ["stem_bn"]),
             ("a", Conv2d(8, 8, 3, padding=1, rng=rng), ["stem_relu"]), ("a_relu", ReLU(), ["a"]),
             ("b", Conv2d(8, 8, 3, padding=1, bias=False, rng=rng), ["a_relu"]), ("b_bn", _bn(8, 2), ["b"]),
             ("sum", Add(), pair), ("sum_relu", ReLU(), ["sum"]),
             ("proj", Conv2d(8, 16, 1, stride=2, rng=rng), ["sum_relu"]),
             ("c", Conv2d(8, 16, 3, stride=2, padding=1, rng=rng), ["sum_relu"]), ("c_relu", ReLU(), ["c"]),
             ("d", Conv2d(16, 16, 3, padding=1, rng=rng), ["c_relu"]),
             ("sum2", Add(), ["d", "proj"]),
             ("gap", GlobalAvgPool2d(), ["sum2"]), ("flat", Flatten(), ["gap"]),
             ("fc", Linear(16, 10, rng=rng), ["flat"])]
    return Graph(nodes, "x", "fc", input_shape=(2, 9, 11))


def _quantized(net, bits=8):
    return quantize(net, calibrate(net, X[:32], samples=32, progress=False), bits, 8)


def _step_path(q, x):
    """The step-by-step result (a read-only array never takes the program)."""
    ro = x.copy()
    ro.flags.writeable = False
    return q.forward(ro)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_small_batches_run_one_program_with_the_step_paths_bits(swap, bits):
    q = _quantized(_resnet(swap), bits)
    want = _step_path(q, X)
    q.forward(X[:3])  # builds the program
    codes = [int(r[program.CODE]) for r in q._program[3]]
    assert codes.count(program.OP_QADD) == 2 and program.OP_QSAVE in codes and program.OP_QLOAD in codes
    for n in (1, 5, 31):
        got = np.concatenate([q.forward(X[i:i + n]) for i in range(0, 62, n)])
        assert np.array_equal(got.view(np.uint32), want[:len(got)].view(np.uint32)), f"batch {n}"
    assert np.array_equal(q.forward(X).view(np.uint32), want.view(np.uint32))  # 64 images: the steps


def test_the_fused_relu_of_an_add_is_its_lower_clamp_in_the_program():
    q = _quantized(_resnet())
    adds = [s for s in q.stages if s.kind == "qadd"]
    assert [s.relu for s in adds] == [True, False]
    q.forward(X[:2])
    rows = [r for r in q._program[3] if r[program.CODE] == program.OP_QADD]
    assert [int(r[program.LO]) for r in rows] == [adds[0].out_act.zero_point, 0]
    assert np.array_equal(q.forward(X[:7]), _step_path(q, X[:7]))


def test_graphs_the_program_cannot_express_keep_the_step_path():
    rng = np.random.default_rng(5)
    concat = Graph([("a", Conv2d(2, 4, 3, padding=1, rng=rng), ["x"]), ("b", Conv2d(2, 4, 1, rng=rng), ["x"]),
                    ("cat", Concat(1), ["a", "b"]), ("gap", GlobalAvgPool2d(), ["cat"]),
                    ("flat", Flatten(), ["gap"]), ("fc", Linear(8, 3, rng=rng), ["flat"])], "x", "fc",
                   input_shape=(2, 9, 11))
    # five tensors wait at once for the chain of Adds at the end: one more than MAX_SLOTS
    nodes, prev = [], "x"
    for i in range(6):
        nodes.append((f"t{i}", Conv2d(2, 2, 3, padding=1, rng=rng), [prev]))
        prev = f"t{i}"
    for i in range(4, -1, -1):
        nodes.append((f"s{i}", Add(), [prev, f"t{i}"]))
        prev = f"s{i}"
    nodes += [("gap", GlobalAvgPool2d(), [prev]), ("flat", Flatten(), ["gap"]),
              ("fc", Linear(2, 3, rng=rng), ["flat"])]
    deep = Graph(nodes, "x", "fc", input_shape=(2, 9, 11))
    # a float32 tensor (global average pooling's input, dequantized once) read by two steps: slots hold codes
    fan = Graph([("c", Conv2d(2, 4, 3, padding=1, rng=rng), ["x"]),
                 ("g1", GlobalAvgPool2d(), ["c"]), ("g2", GlobalAvgPool2d(), ["c"]),
                 ("f1", Flatten(), ["g1"]), ("f2", Flatten(), ["g2"]),
                 ("s", Add(), ["f1", "f2"]), ("fc", Linear(4, 3, rng=rng), ["s"])], "x", "fc",
                input_shape=(2, 9, 11))
    assert program.MAX_SLOTS == 4
    for net in (concat, deep, fan):
        q = _quantized(net)
        want = _step_path(q, X[:6])
        assert np.array_equal(q.forward(X[:6]), want)
        assert q._program is None
        assert np.array_equal(q.forward(X[:6]), want)


def test_a_copy_has_no_program_and_a_changed_step_list_rebuilds_it():
    q = _quantized(_resnet())
    q.forward(X[:2])
    assert q._program is not None
    for twin in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert twin._program is None
        assert np.array_equal(twin.forward(X[:4]), q.forward(X[:4]))
    before = q.forward(X[:4])
    stage, ins, out = q.steps[-1]
    changed = copy.deepcopy(stage)  # another stage object, other biases: the old program must not run
    changed.packed_dense = changed.packed_dense._replace(bias=changed.packed_dense.bias + np.int32(1000))
    q.steps[-1] = (changed, ins, out)
    got = q.forward(X[:4])
    assert not np.array_equal(got, before) and np.array_equal(got, _step_path(q, X[:4]))
