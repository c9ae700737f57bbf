"""Graph: a small ResNet-style block (conv-relu-conv + skip Add, relu, a Concat branch) built, run,
trained, saved and loaded; every figure checked against a plain NumPy float64 forward
(tests/reference.py) or finite differences; malformed graphs refused naming the node."""

import json
import struct

import numpy as np
import pytest

import microcnn
from microcnn import losses, optim
from microcnn.autograd import Tensor
from microcnn.datasets import load_mnist
from microcnn.errors import FileFormatError, InputError
from microcnn.graph import Add, Concat, Graph
from microcnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Softmax
from microcnn.model import Model
from tests import reference as ref


def block(seed=0, input_shape=(3, 8, 8)):
    rng = np.random.default_rng(seed)
    c = input_shape[0]
    h = input_shape[1] // 2
    return Graph([
        ("conv1", Conv2d(c, 4, 3, padding=1, rng=rng), ["x"]),
        ("relu1", ReLU(), ["conv1"]),
        ("conv2", Conv2d(4, 4, 3, padding=1, rng=rng), ["relu1"]),
        ("add", Add(), ["conv2", "conv1"]),
        ("relu2", ReLU(), ["add"]),
        ("branch", Conv2d(4, 2, 1, rng=rng), ["relu2"]),
        ("cat", Concat(1), ["relu2", "branch"]),
        ("pool", MaxPool2d(2), ["cat"]),
        ("flat", Flatten(), ["pool"]),
        ("fc", Linear(6 * h * h, 5, rng=rng), ["flat"]),
        ("prob", Softmax(), ["fc"]),
    ], inputs="x", outputs="prob", input_shape=input_shape)


def numpy_block(state, x):
    """The same block in float64 NumPy, from the state dict alone."""
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    c1 = ref.conv2d(x, state["conv1.weight"], state["conv1.bias"], padding=(1, 1))
    c2 = ref.conv2d(relu(c1), state["conv2.weight"], state["conv2.bias"], padding=(1, 1))
    r2 = relu(c2 + c1)
    cat = np.concatenate([r2, ref.conv2d(r2, state["branch.weight"], state["branch.bias"])], axis=1)
    flat = ref.max_pool2d(cat, (2, 2), (2, 2)).reshape(len(x), -1)
    return ref.softmax(ref.linear(flat, state["fc.weight"], state["fc.bias"]))


@pytest.fixture
def images():
    return np.random.default_rng(5).random((7, 3, 8, 8), dtype=np.float32)


def test_block_forward_matches_numpy_reference(images):
    g = block()
    assert isinstance(g, Model)
    got = g.predict(images)
    want = numpy_block(g.state_dict(), images)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # float32 vs float64 over ~100-term sums
    # The trace runs node by node, unfused: the same bits as the fused plan.
    assert np.array_equal(g.trace(images)[-1].output, got)
    np.testing.assert_allclose(ref.softmax(g.logits(images)), want, rtol=0, atol=2e-6)
    assert g.layer_names() == ["conv1", "relu1", "conv2", "add", "relu2", "branch", "cat", "pool", "flat",
                               "fc", "prob"]


def test_plan_fuses_single_consumer_chains_and_frees_intermediates(images):
    g = block()
    steps = g.plan()
    outputs = [s.output for s in steps]
    # conv1 feeds two nodes: it ends a chain; pool-flat-fc-softmax after the Concat is one chain.
    assert outputs == ["conv1", "conv2", "add", "relu2", "branch", "cat", "prob"]
    kinds = [type(gr.layer).__name__ for gr in steps[-1].groups]
    assert kinds == ["MaxPool2d", "Flatten", "Linear", "Softmax"]
    # relu1 reads conv1, which Add reads too: it must not overwrite it; relu2 may overwrite Add's result.
    assert steps[1].groups[0].owned is False and steps[3].groups[0].owned is True
    freed = [n for s in steps for n in s.free]
    assert sorted(freed) == sorted(["x", "conv1", "conv2", "add", "relu2", "branch", "cat"])
    # The caller's array is never written to.
    before = images.copy()
    g.predict(images)
    assert np.array_equal(images, before)


def test_fused_chain_is_conv_relu_pool_in_one_call():
    rng = np.random.default_rng(2)
    g = Graph([("c", Conv2d(1, 3, 3, rng=rng), ["x"]), ("r", ReLU(), ["c"]), ("p", MaxPool2d(2), ["r"]),
               ("q", Conv2d(3, 3, 1, rng=rng), ["p"]), ("s", Add(), ["p", "q"])], "x", "s",
              input_shape=(1, 6, 6))
    first = g.plan()[0]
    assert len(first.groups) == 1 and first.groups[0].relu and first.groups[0].pool is not None
    x = rng.random((2, 1, 6, 6), dtype=np.float32)
    st = g.state_dict()
    p = ref.max_pool2d(np.maximum(ref.conv2d(x, st["c.weight"], st["c.bias"]), 0), (2, 2), (2, 2))
    want = p + ref.conv2d(p, st["q.weight"], st["q.bias"])
    np.testing.assert_allclose(g.forward(x), want, rtol=0, atol=1e-6)


def test_gradients_match_finite_differences():
    g = block(seed=3, input_shape=(1, 4, 4))
    x = np.random.default_rng(4).random((2, 1, 4, 4), dtype=np.float32)
    y = np.array([1, 3])
    loss = losses.cross_entropy(g.logits(Tensor(x)), y)
    loss.backward()
    state = {k: v.astype(np.float64) for k, v in g.state_dict().items()}

    def f(st):
        p = numpy_block(st, x)
        return -np.mean(np.log(p[np.arange(2), y]))

    eps = 1e-6
    for name in ("conv1.weight", "conv2.bias", "branch.weight", "fc.weight"):
        grad = dict(g.named_parameters())[name].grad
        flat = [np.unravel_index(i, grad.shape) for i in (0, grad.size // 2, grad.size - 1)]
        for idx in flat:
            hi = {k: v.copy() for k, v in state.items()}
            lo = {k: v.copy() for k, v in state.items()}
            hi[name][idx] += eps
            lo[name][idx] -= eps
            numeric = (f(hi) - f(lo)) / (2 * eps)
            assert abs(grad[idx] - numeric) <= 1e-4 + 1e-3 * abs(numeric), (name, idx, grad[idx], numeric)


def test_training_decreases_loss():
    g = block(seed=1, input_shape=(1, 8, 8))
    rng = np.random.default_rng(0)
    x = rng.random((32, 1, 8, 8), dtype=np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > x[:, 0, 4:].mean(axis=(1, 2))).astype(np.int64)  # learnable
    opt = optim.Adam(g.parameters(), lr=1e-2)
    g.train()
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = losses.cross_entropy(g.logits(Tensor(x)), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    g.eval()
    final = losses.cross_entropy(Tensor(g.logits(x)), y).item()
    assert final < 0.5 * first, (first, final)
    assert g.accuracy(x, y) >= 0.9


def test_state_dict_keys_and_round_trip(tmp_path, images):
    g = block()
    assert list(g.state_dict()) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                    "branch.weight", "branch.bias", "fc.weight", "fc.bias"]
    other = block(seed=9)
    other.load_state_dict(g.state_dict())
    assert np.array_equal(other.predict(images), g.predict(images))
    with pytest.raises(InputError, match="missing"):
        other.load_state_dict({"conv1.weight": g.state_dict()["conv1.weight"]})
    path = tmp_path / "block.safetensors"
    g.save(path)
    back = microcnn.load(path)
    assert isinstance(back, Graph) and back.config() == g.config()
    assert np.array_equal(back.predict(images), g.predict(images))
    loaded = block(seed=9).load(path)
    assert np.array_equal(loaded.predict(images), g.predict(images))
    assert g.nbytes == sum(v.nbytes for v in g.state_dict().values())


def _rewrite_architecture(src, dst, edit):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    arch = json.loads(header["__metadata__"]["architecture"])
    edit(arch)
    header["__metadata__"]["architecture"] = json.dumps(arch)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["nodes"][0].update(inputs=["relu2"]), "cycle"),
    (lambda a: a["nodes"][3].update(inputs=["conv2", "nowhere"]), "'add'.*'nowhere'.*dangling"),
    (lambda a: a["nodes"][1]["layer"].update(type="Quux"), "unknown layer type 'Quux'"),
    (lambda a: a["nodes"][6]["layer"].update(axis=2), "'cat'.*Concat"),
    (lambda a: a.update(input_shape=[3, 10, 10]), r"'fc'.*expected input \(N, 96\), found \(1, 150\)"),
    (lambda a: a.update(input_shape=[1, 8, 8]), "'conv1'.*expected input \\(N, 3, H, W\\)"),
    (lambda a: a.update(input_shape=[3, 4096, 4096]), "at most"),
    (lambda a: a["nodes"][9]["layer"].update(in_features=10**9), "tensors do not match"),
    (lambda a: a["nodes"][1].update(name="conv1"), "'conv1': duplicate"),
    (lambda a: a["nodes"][1].update(inputs=5), "'relu1': expected a list of input names"),
    (lambda a: a.update(outputs=["nope"]), "outputs: expected the name of a node"),
    (lambda a: a["nodes"][0].update(extra=1), "node 0: expected"),
    (lambda a: a["nodes"].append({"name": "spare", "inputs": ["x"], "layer": {"type": "ReLU"}}),
     "'spare': its output is never read"),
    (lambda a: a["nodes"][3].update(inputs=["conv2"]), "'add' \\(Add\\): expected at least 2"),
])
def test_malformed_graph_files_are_refused(tmp_path, edit, message):
    good = tmp_path / "good.safetensors"
    block().save(good)
    bad = tmp_path / "bad.safetensors"
    _rewrite_architecture(good, bad, edit)
    with pytest.raises(FileFormatError, match=message) as info:
        microcnn.load(bad)
    assert str(bad) in str(info.value)


def test_construction_errors_name_the_node():
    conv = Conv2d(1, 2, 3)
    with pytest.raises(InputError, match=r"'c': on a cycle \(c -> b -> c\)"):
        Graph([("a", ReLU(), ["x"]), ("b", Add(), ["a", "c"]), ("c", ReLU(), ["b"])], "x", "c")
    with pytest.raises(InputError, match="'a'.*duplicate"):
        Graph([("a", ReLU(), ["x"]), ("a", ReLU(), ["a"])], "x", "a")
    with pytest.raises(InputError, match="'a'.*dangling"):
        Graph([("a", ReLU(), ["y"])], "x", "a")
    with pytest.raises(InputError, match="'side'.*never read"):
        Graph([("a", ReLU(), ["x"]), ("side", ReLU(), ["a"]), ("b", ReLU(), ["a"])], "x", "b")
    with pytest.raises(InputError, match="'s'.*Add.*at least 2"):
        Graph([("s", Add(), ["x"])], "x", "s")
    with pytest.raises(InputError, match=r"'c'.*Conv2d.*expected input \(N, 1, H, W\), found \(1, 3, 8"):
        Graph([("c", conv, ["x"])], "x", "c", input_shape=(3, 8, 8))
    with pytest.raises(InputError, match="'s'.*Add"):
        Graph([("c", Conv2d(1, 2, 3), ["x"]), ("s", Add(), ["x", "c"])], "x", "s", input_shape=(1, 8, 8))
    with pytest.raises(InputError, match="outputs"):
        Graph([("a", ReLU(), ["x"])], "x", ["a", "b"])


def test_any_input_shape_is_recorded_and_checked():
    g = block(input_shape=(3, 12, 12))
    x = np.random.default_rng(0).random((2, 3, 12, 12), dtype=np.float32)
    np.testing.assert_allclose(g.predict(x), numpy_block(g.state_dict(), x), rtol=0, atol=2e-6)
    with pytest.raises(InputError, match=r"expected shape \(N, 3, 12, 12\), found \(2, 1, 12, 12\)"):
        g.predict(x[:, :1])


def test_concat_backward_splits_the_gradient():
    a, b = Tensor(np.ones((2, 1, 2, 2)), True), Tensor(np.ones((2, 3, 2, 2)), True)
    out = Concat(1)(a, b)
    g = np.arange(out.size, dtype=np.float32).reshape(out.shape)
    (out * Tensor(g)).sum().backward()
    assert np.array_equal(a.grad, g[:, :1]) and np.array_equal(b.grad, g[:, 1:])


def test_tensor_read_directly_and_through_an_op_gets_both_gradients():
    # Concat(x, 2x): x reaches the output directly and through mul; backward must order x after mul.
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 2)).astype(np.float32)
    t = Tensor(x, True)
    out = Concat(1)(t, t * 2.0)
    g = np.random.default_rng(1).normal(size=out.shape).astype(np.float32)
    (out * Tensor(g)).sum().backward()
    np.testing.assert_allclose(t.grad, g[:, :3] + 2 * g[:, 3:], rtol=1e-6, atol=1e-6)


def test_lenet_as_a_graph_is_bit_identical_to_the_sequential():
    net = microcnn.lenet(weights="bundled")
    g = Graph.from_sequential(net)
    images = load_mnist("test")[0][:300]
    assert [type(gr.layer).__name__ for s in g.plan() for gr in s.groups] == \
        [type(gr.layer).__name__ for gr in net.inference_groups()]  # the same fused calls
    assert np.array_equal(g.predict(images), net.predict(images))
    for n in (1, 7):  # small batches: the Sequential runs its compiled program, same bits
        net.predict(images[:n])
        assert np.array_equal(g.predict(images[:n]), net.predict(images[:n]))
    assert g.layer_table().drop(columns="Inputs").equals(net.layer_table().drop(columns="Inputs"))


def test_intermediates_are_dropped_after_their_last_reader():
    # Eight residual blocks: 24 nodes, 16 activations made. Kept to the end they would peak above 16
    # inputs' worth; dropped after their last reader, at most the input, a block's input, its conv/ReLU
    # output (overwritten in place) and the sum are alive.
    nodes, prev = [], "x"
    for i in range(8):
        nodes += [(f"c{i}", Conv2d(8, 8, 1), [prev]), (f"r{i}", ReLU(), [f"c{i}"]),
                  (f"a{i}", Add(), [f"r{i}", prev])]
        prev = f"a{i}"
    g = Graph(nodes, "x", prev, input_shape=(8, 32, 32))
    x = np.random.default_rng(0).random((64, 8, 32, 32), dtype=np.float32)
    want = g.trace(x)[-1].output
    assert np.array_equal(g.forward(x), want)
    assert ref.peak_bytes(lambda: g.forward(x)) < 4 * x.nbytes


class BatchNorm2d(microcnn.layers.Layer):
    """Stand-in with the contract's fields (the real one comes with issue 13's layers), eval mode."""

    def __init__(self, c, rng):
        self.weight, self.bias = Tensor(rng.normal(1, 0.1, c)), Tensor(rng.normal(0, 0.1, c))
        self.running_mean = rng.normal(0, 0.1, c).astype(np.float32)
        self.running_var = rng.uniform(0.5, 2, c).astype(np.float32)
        self.eps = 1e-5

    def scale_shift(self):
        scale = self.weight.data / np.sqrt(self.running_var + self.eps)
        return scale, self.bias.data - self.running_mean * scale

    def forward(self, x):
        scale, shift = self.scale_shift()
        return (x * scale[None, :, None, None] + shift[None, :, None, None]).astype(np.float32)


def fold_reference(conv, bn):
    """Folding as a float64 reference: w * scale per output channel, (b - mean) * scale + beta."""
    scale, shift = bn.scale_shift()
    out = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    out.weight.data[...] = conv.weight.data * scale[:, None, None, None]
    out.bias.data[...] = conv.bias.data * scale + shift
    return out


def test_fold_batchnorm_merges_bn_into_its_conv_and_rewires_readers(monkeypatch):
    monkeypatch.setattr(microcnn.layers, "fold_batchnorm", fold_reference, raising=False)
    rng = np.random.default_rng(0)
    g = Graph([("conv", Conv2d(3, 4, 3, padding=1, rng=rng), ["x"]), ("bn", BatchNorm2d(4, rng), ["conv"]),
               ("relu", ReLU(), ["bn"]), ("side", Conv2d(3, 4, 1, rng=rng), ["x"]),
               ("sbn", BatchNorm2d(4, rng), ["side"]), ("sum", Add(), ["relu", "sbn"]),
               ("shared", Conv2d(4, 4, 1, rng=rng), ["sum"]), ("bn3", BatchNorm2d(4, rng), ["shared"]),
               ("out", Add(), ["bn3", "shared"])],  # shared has two readers: its BN stays
              "x", "out", input_shape=(3, 6, 6))
    x = rng.random((2, 3, 6, 6), dtype=np.float32)
    folded = g.fold_batchnorm()
    assert folded.layer_names() == ["conv", "relu", "side", "sum", "shared", "bn3", "out"]
    assert folded._by_name["sum"].inputs == ("relu", "side")
    np.testing.assert_allclose(folded.forward(x), g.forward(x), rtol=0, atol=1e-5)
    seq = microcnn.Sequential(Conv2d(3, 4, 3, rng=rng), BatchNorm2d(4, rng), ReLU(), input_shape=(3, 6, 6))
    fseq = seq.fold_batchnorm()
    assert [layer.type for layer in fseq] == ["Conv2d", "ReLU"]
    np.testing.assert_allclose(fseq.forward(x), seq.forward(x), rtol=0, atol=1e-5)


def test_a_long_graph_in_reverse_order_is_sorted_quickly():
    import time

    n = 20_000
    nodes = [(f"r{i}", ReLU(), [f"r{i - 1}" if i else "x"]) for i in range(n)][::-1]
    start = time.perf_counter()
    g = Graph(nodes, "x", f"r{n - 1}")
    assert time.perf_counter() - start < 5  # n log n; the quadratic scan took minutes
    assert g.layer_names()[:3] == ["r0", "r1", "r2"]
    nodes[0] = (f"r{n - 1}", ReLU(), [f"r{n - 2}"])
    nodes[-1] = ("r0", Add(), ["x", f"r{n - 1}"])  # close a loop through all of them
    with pytest.raises(InputError, match="on a cycle"):
        Graph(nodes, "x", f"r{n - 1}")
