"""Networks built in PyTorch, written by ``torch.onnx.export``, read by ``load_onnx`` and converted by
``microcnn.from_torch``.

References, on the same random weights (BatchNorm statistics set to non-trivial values) and images:
ONNX Runtime on the same file (probabilities within PROB_ATOL = 1e-4, the issue's target) and PyTorch
eager (logits within LOGIT_ATOL = 1e-4: float32 with different summation orders, and BatchNorm applied
as PyTorch's (x - mean) / sqrt(var + eps) * w + b vs our own order). Our export -> import round trip
gives identical bits. torch and onnxruntime are optional: the tests skip without them.
"""

import warnings

import numpy as np
import pytest

import microcnn
from microcnn import InputError, Sequential
from microcnn.onnx_io import export_onnx, load_onnx

torch = pytest.importorskip("torch")

PROB_ATOL = 1e-4
LOGIT_ATOL = 1e-4


def torch_export(module, shape, path):
    """What a researcher runs: the TorchScript exporter (no onnxscript here), batch axis dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
    return path


def randomize_batchnorm(module, seed=0):
    """Running statistics and affine parameters far from their defaults, so BatchNorm does something."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return module.eval()


# -- the models ----------------------------------------------------------------------------------------
def lenet_like(nn):
    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
            self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 84), nn.Linear(84, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2)
            x = nn.functional.avg_pool2d(torch_sigmoid(self.conv2(x)), 2)
            x = x.view(x.size(0), -1)  # Shape/Gather/Unsqueeze/Concat -> Reshape in the file
            return nn.functional.softmax(self.fc2(nn.functional.relu(self.fc1(x))), dim=1)

    def torch_sigmoid(x):
        return x.sigmoid()

    return LeNet(), (1, 28, 28)


def mlp(nn):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 32),
                         nn.Tanh(), nn.Linear(32, 10), nn.Softmax(dim=1)), (1, 28, 28)


def bn_cnn(nn):
    """Conv+BN+ReLU blocks, stride-2 convolutions, global average pooling, BatchNorm1d, LeakyReLU."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 10)), (1, 28, 28)


def residual(nn):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            x = nn.functional.relu(x + self.body(x))
            x = nn.functional.relu(self.down(x))
            return self.head(torch_flatten(nn.functional.adaptive_avg_pool2d(x, 1)))

    def torch_flatten(x):
        return x.flatten(1)

    return Block(), (3, 16, 16)


def concat_depthwise(nn):
    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 6, 1)
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU6(),
                                   nn.Conv2d(4, 6, 1))
            self.c = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
            self.fc = nn.Linear(16 * 6 * 6, 5)

        def forward(self, x):
            y = torch_cat([self.a(x), self.b(x), self.c(x)])
            return self.fc(self.pool(nn.functional.relu(y)).flatten(1))

    def torch_cat(xs):
        import torch

        return torch.cat(xs, dim=1)

    return Inception(), (4, 12, 12)


def pools(nn):
    """Padding, ceil mode (windows that start inside: ONNX shape inference and PyTorch agree, so ONNX
    Runtime loads the file) and count_include_pad=False."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, 2, padding=1, ceil_mode=True),
                         nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5)), (1, 8, 8)


MODELS = {"lenet_like": lenet_like, "mlp": mlp, "bn_cnn": bn_cnn, "residual": residual,
          "concat_depthwise": concat_depthwise, "pools": pools}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory):
    torch.manual_seed(0)
    module, shape = MODELS[request.param](torch.nn)
    module = randomize_batchnorm(module)
    path = torch_export(module, shape, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    x = np.random.default_rng(1).random((12, *shape), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    return request.param, module, shape, path, x, expected


def probabilities(z):
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def as_probabilities(name, out):
    return out if name in ("lenet_like", "mlp") else probabilities(out.astype(np.float64))


@pytest.mark.torch
def test_imported_file_agrees_with_onnx_runtime_and_torch(case):
    ort = pytest.importorskip("onnxruntime")
    name, module, shape, path, x, expected = case
    net = load_onnx(path)
    assert net.input_shape == shape
    ours = net.forward(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(as_probabilities(name, ours), as_probabilities(name, theirs), atol=PROB_ATOL,
                               rtol=0)
    np.testing.assert_allclose(ours, expected, atol=LOGIT_ATOL, rtol=0)
    assert (ours.argmax(1) == expected.argmax(1)).all()


@pytest.mark.torch
def test_from_torch_computes_what_the_module_computes(case):
    name, module, shape, path, x, expected = case
    net = microcnn.from_torch(module, shape)
    np.testing.assert_allclose(net.forward(x), expected, atol=LOGIT_ATOL, rtol=0)
    if not isinstance(module, torch.nn.Sequential):  # converted through the same exporter: the same model
        np.testing.assert_array_equal(net.forward(x), load_onnx(path).forward(x))
    assert module.training is False


@pytest.mark.torch
def test_export_import_round_trip_is_bit_identical(case, tmp_path):
    name, module, shape, path, x, expected = case
    net = load_onnx(path)
    again = tmp_path / "again.onnx"
    export_onnx(net, again)
    back = load_onnx(again)
    assert type(back) is type(net)
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert {k: v.tobytes() for k, v in back.state_dict().items()} == \
        {k: v.tobytes() for k, v in net.state_dict().items()}
    ort = pytest.importorskip("onnxruntime")  # our file runs in ONNX Runtime as the original did
    session = ort.InferenceSession(str(again), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(as_probabilities(name, session.run(None, {"input": x})[0]),
                               as_probabilities(name, net.forward(x)), atol=PROB_ATOL, rtol=0)


@pytest.mark.torch
def test_to_torch_rebuilds_any_model_and_compare_runs_graphs(case):
    """``compare.to_torch`` (PyTorch's side of ``microcnn compare``) on Sequentials and Graphs: same
    state_dict keys and values, same logits; the residual Graph runs through the FP32 comparison, with
    ONNX Runtime on the original file (its byte count is the file's)."""
    from microcnn import compare

    name, module, shape, path, x, expected = case
    net = load_onnx(path)
    rebuilt = compare.to_torch(net)
    state = {k: v.numpy() for k, v in rebuilt.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert list(state) == list(net.state_dict())
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(state[k], v)
    with torch.no_grad():
        theirs = rebuilt(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, net.forward(x), atol=LOGIT_ATOL, rtol=0)
    if name == "residual":
        df = compare.compare_table(net, x, expected.argmax(1), x[:4], repeats=1, batch1_samples=0,
                                   precisions=("FP32",), torch_compile=False, onnx_file=path.read_bytes())
        rows = df.set_index("System")
        assert list(rows.index) == ["microcnn", "PyTorch eager", "ONNX Runtime"]
        assert (rows["Accuracy"] == 1.0).all()
        assert rows.loc["ONNX Runtime", "Model Bytes"] == path.stat().st_size


@pytest.mark.torch
def test_chains_load_as_sequential_and_graphs_as_graph(case):
    name, module, shape, path, x, expected = case
    net = load_onnx(path)
    chain = name in ("lenet_like", "mlp", "bn_cnn", "pools")
    assert isinstance(net, Sequential) == chain


@pytest.mark.torch
def test_conversion_errors_are_specific():
    nn = torch.nn
    with pytest.raises(InputError, match="from_torch: expected a torch.nn.Module, found dict"):
        microcnn.from_torch({"weight": 1})

    class Gelu(nn.Module):
        def forward(self, x):
            return nn.functional.gelu(x.flatten(1))

    with pytest.raises(InputError, match=r"from_torch: input_shape: expected \(C, H, W\).*found None"):
        microcnn.from_torch(Gelu())
    with pytest.raises(InputError, match=r"from_torch\(Gelu\): node '/Div' \(Div\): unsupported on a "
                                         r"computed tensor"):
        microcnn.from_torch(Gelu(), (1, 4, 4))
    with pytest.raises(InputError, match=r"cannot convert Conv2d.*padding"):
        microcnn.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")))
    with pytest.raises(InputError, match=r"cannot convert GELU"):
        microcnn.from_torch(nn.Sequential(nn.GELU()))
    with pytest.raises(InputError, match=r"cannot convert MaxPool2d.*dilation=1"):
        microcnn.from_torch(nn.Sequential(nn.MaxPool2d(2, dilation=2)))
