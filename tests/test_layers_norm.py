"""BatchNorm2d / BatchNorm1d (issue 13): training mode (batch statistics, running-stat updates over
several calls), eval mode, gradients, folding into the preceding Conv2d / Linear, state dicts and
files. References: the plain-NumPy float64 formulas of ``tests.layer_refs`` and float64 central
differences; PyTorch as an extra check where installed.

Tolerances: forward within 1e-5 absolute of the float64 reference (unit-variance outputs); running
statistics within 1e-6; gradients within 1e-4 relative to the largest; folded layers within 1e-5
relative to the unfolded pair (float32 rounding of the folded weights).
"""

import numpy as np
import pytest

from microcnn import InputError
from microcnn.autograd import Tensor
from microcnn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    Linear,
    ReLU,
    fold_batchnorm,
    layer_from_config,
)
from microcnn.network import Sequential

from . import layer_refs as ref

RNG = np.random.default_rng(13)


def _bn(cls, c, seed=0):
    rng = np.random.default_rng(seed)
    bn = cls(c, eps=1e-3, momentum=0.2)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, c)
    bn.bias.data[...] = rng.standard_normal(c)
    return bn


@pytest.mark.parametrize("cls, shape", [(BatchNorm2d, (4, 3, 5, 6)), (BatchNorm1d, (8, 5)),
                                        (BatchNorm1d, (4, 3, 7))])
def test_training_mode_normalises_with_batch_statistics_and_updates_running_ones(cls, shape):
    bn = _bn(cls, shape[1])
    mean, var = np.zeros(shape[1]), np.ones(shape[1])
    count = shape[0] * int(np.prod(shape[2:]))
    for step in range(3):  # several calls: the running statistics accumulate with the momentum
        x = (RNG.standard_normal(shape) * (step + 1) + step).astype(np.float32)
        y = bn.forward_tensor(Tensor(x))
        expected, bmean, bvar = ref.batch_norm_train(x, bn.weight.data, bn.bias.data, bn.eps)
        np.testing.assert_allclose(y.data, expected, atol=1e-5)
        mean = 0.8 * mean + 0.2 * bmean
        var = 0.8 * var + 0.2 * bvar * count / (count - 1)  # unbiased, as PyTorch
        np.testing.assert_allclose(bn.running_mean, mean, atol=1e-6)
        np.testing.assert_allclose(bn.running_var, var, rtol=1e-6)
    assert bn.running_mean.dtype == np.float32
    # eval mode and the array path use the running statistics (and change nothing)
    x = RNG.standard_normal(shape).astype(np.float32)
    expected = ref.batch_norm_eval(x, bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var, bn.eps)
    np.testing.assert_allclose(bn.forward(x), expected, atol=1e-5)
    bn.eval()
    np.testing.assert_allclose(bn.forward_tensor(Tensor(x)).data, expected, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, mean, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls, shape", [(BatchNorm2d, (3, 2, 3, 4)), (BatchNorm1d, (6, 3))])
def test_gradients_match_finite_differences(cls, shape, training):
    bn = _bn(cls, shape[1], seed=1)
    bn.running_mean[...] = RNG.standard_normal(shape[1])
    bn.running_var[...] = RNG.uniform(0.5, 2, shape[1])
    bn.train(training)
    x = RNG.standard_normal(shape).astype(np.float32)
    tx, tg, tb = Tensor(x, True), bn.weight, bn.bias
    tg.grad = tb.grad = None
    stats = bn.running_mean.copy(), bn.running_var.copy()
    y = bn.forward_tensor(tx)
    weights = RNG.standard_normal(shape)
    y.backward(weights.astype(np.float32))

    def f(xx, gamma, beta):
        if training:
            return ref.batch_norm_train(xx, gamma, beta, bn.eps)[0]
        return ref.batch_norm_eval(xx, gamma, beta, *stats, bn.eps)

    for i, t in enumerate((tx, tg, tb)):
        num = ref.numeric_grad(f, [x, tg.data, tb.data], i, weights)
        assert ref.relative_error(t.grad, num) < 1e-4, ("x", "gamma", "beta")[i]


def test_matches_torch_in_both_modes_over_several_steps():
    torch = pytest.importorskip("torch")
    bn, tbn = BatchNorm2d(3, momentum=0.3), torch.nn.BatchNorm2d(3, momentum=0.3).double()
    for _ in range(3):
        x = (RNG.standard_normal((4, 3, 5, 5)) * 2 + 1).astype(np.float32)
        gy = RNG.standard_normal(x.shape).astype(np.float32)
        tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        ty = tbn(tx)
        ty.backward(torch.tensor(gy, dtype=torch.float64))
        mx = Tensor(x, True)
        bn.weight.grad = None
        my = bn.forward_tensor(mx)
        my.backward(gy)
        np.testing.assert_allclose(my.data, ty.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(mx.grad, tx.grad.numpy(), atol=1e-5)
        np.testing.assert_allclose(bn.weight.grad, tbn.weight.grad.numpy(), atol=1e-4)
        tbn.weight.grad = None
        np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-6)
    tbn.eval()
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(bn.forward(x), tbn(torch.tensor(x, dtype=torch.float64)).detach().numpy(),
                               atol=1e-5)


def test_fold_batchnorm_into_conv_and_linear():
    rng = np.random.default_rng(3)
    cases = ((Conv2d(4, 6, 3, padding=1, groups=2, rng=rng), _bn(BatchNorm2d, 6), (2, 4, 7, 7)),
             (Conv2d(3, 5, 3, bias=False, rng=rng), _bn(BatchNorm2d, 5), (2, 3, 6, 6)),
             (Linear(7, 4, rng=rng), _bn(BatchNorm1d, 4), (5, 7)))
    for layer, bn, shape in cases:
        bn.running_mean[...] = rng.standard_normal(bn.num_features)
        bn.running_var[...] = rng.uniform(0.2, 3, bn.num_features)
        x = rng.standard_normal(shape).astype(np.float32)
        expected = bn.forward(layer.forward(x))
        folded = fold_batchnorm(layer, bn)
        assert type(folded) is type(layer) and folded.bias is not None
        assert folded.config() == {**layer.config(), "bias": True}
        assert ref.relative_error(folded.forward(x), expected) < 1e-5
    with pytest.raises(InputError, match="Conv2d \\+ BatchNorm2d"):
        fold_batchnorm(Linear(3, 4), BatchNorm2d(4))
    with pytest.raises(InputError, match="does not fit"):
        fold_batchnorm(Conv2d(1, 3, 3), BatchNorm2d(4))


def _bn_net():
    rng = np.random.default_rng(4)
    net = Sequential(Conv2d(1, 4, 3, rng=rng), BatchNorm2d(4), ReLU(), Flatten(),
                     Linear(4 * 6 * 6, 5, rng=rng), BatchNorm1d(5), input_shape=(1, 8, 8))
    net.train()
    for _ in range(2):  # running statistics away from their initial values
        net(Tensor(rng.standard_normal((6, 1, 8, 8)).astype(np.float32)))
    return net


def test_state_dict_and_files_carry_running_statistics(tmp_path):
    net = _bn_net()
    state = net.state_dict()
    assert {"1.running_mean", "1.running_var", "5.running_mean", "5.running_var"} <= set(state)
    assert not np.allclose(state["1.running_var"], 1)
    clone = Sequential.from_config(net.config())
    clone.load_state_dict(state)
    x = np.random.default_rng(5).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(clone.predict(x), net.predict(x))
    net.save(tmp_path / "bn.safetensors")
    loaded = Sequential.from_config(net.config()).load(tmp_path / "bn.safetensors")
    np.testing.assert_array_equal(loaded[1].running_var, net[1].running_var)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    bad = dict(state)
    bad["1.running_var"] = np.ones(3, np.float32)
    with pytest.raises(InputError, match="1.running_var expected shape"):
        clone.load_state_dict(bad)
    del bad["1.running_var"]
    with pytest.raises(InputError, match="missing \\['1.running_var'\\]"):
        clone.load_state_dict(bad)


def test_train_and_eval_propagate_and_buffers_are_checked():
    net = _bn_net()
    assert all(layer.training for layer in net.layers)
    net.eval()
    assert not any(layer.training for layer in net.layers)
    before = net[1].running_mean.copy()
    net(Tensor(np.ones((2, 1, 8, 8), np.float32)))
    np.testing.assert_array_equal(net[1].running_mean, before)  # eval: no update
    with pytest.raises(InputError, match="running_var: expected finite floats of shape \\(4,\\)"):
        net[1].running_var = np.ones(5)
    with pytest.raises(InputError, match="num_features is fixed"):
        net[1].num_features = 5
    net[1].running_var = [2.0, 2.0, 2.0, 2.0]
    assert net[1].running_var.dtype == np.float32
    with pytest.raises(InputError, match="more than one value per channel"):
        BatchNorm1d(3).forward_tensor(Tensor(np.ones((1, 3), np.float32)))
    with pytest.raises(InputError, match="expected a 4-D input"):
        BatchNorm2d(3).forward(np.ones((2, 3), np.float32))
    cfg = {"type": "BatchNorm1d", **BatchNorm1d(5, eps=1e-3, momentum=0.01).config()}
    assert layer_from_config(cfg).config() == {k: v for k, v in cfg.items() if k != "type"}
