"""Autograd: every op's forward against a float64 NumPy reference and its backward against central
finite differences of that reference.

The kernels are float32 only (one specialisation each, as the project's Numba rules ask), so the
gradient check differentiates an independent float64 reference forward numerically (step 1e-6,
truncation and rounding error ~1e-9) and compares it with the float32 analytic gradient. The
tolerance, |analytic - numeric| <= 2e-4 * (1 + max|numeric|), covers float32 accumulation error
over the few hundred terms these small shapes sum, and is far below the size of any real mistake
(a wrong index or a missing term changes gradients by O(1)).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microcnn import autograd as ag
from microcnn.autograd import Tensor, no_grad
from microcnn.errors import InputError
from tests import reference as ref

GRAD_TOL = 2e-4
FWD_TOL = 1e-5
EXAMPLES = settings(max_examples=12, deadline=None)


def numeric_grads(f64, arrays, cotangent, eps=1e-6):
    """d/d(arrays) of sum(f64(*arrays) * cotangent) by central differences, in float64."""
    arrays = [np.asarray(a, np.float64).copy() for a in arrays]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        flat, gflat = a.reshape(-1), g.reshape(-1)
        for j in range(flat.size):
            keep = flat[j]
            flat[j] = keep + eps
            up = np.sum(f64(*arrays) * cotangent)
            flat[j] = keep - eps
            down = np.sum(f64(*arrays) * cotangent)
            flat[j] = keep
            gflat[j] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def check_op(op, f64, arrays, rng, wrt=None):
    """Forward of ``op`` on float32 tensors matches ``f64``; its backward matches finite differences."""
    arrays = [np.asarray(a, np.float32) for a in arrays]
    wrt = range(len(arrays)) if wrt is None else wrt
    tensors = [Tensor(a, requires_grad=i in wrt) for i, a in enumerate(arrays)]
    out = op(*tensors)
    expected = f64(*[a.astype(np.float64) for a in arrays])
    np.testing.assert_allclose(out.data, expected, rtol=FWD_TOL, atol=FWD_TOL * (1 + np.abs(expected).max()))
    cot = rng.standard_normal(out.shape)
    out.backward(cot.astype(np.float32))
    numeric = numeric_grads(f64, arrays, cot)
    for i in wrt:
        scale = 1 + np.abs(numeric[i]).max()
        np.testing.assert_allclose(tensors[i].grad, numeric[i], rtol=0, atol=GRAD_TOL * scale,
                                   err_msg=f"gradient of input {i}")


def away_from_zero(rng, shape):
    """Values with |v| >= 0.1 so a finite-difference step never crosses a ReLU kink."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 1.0, size=shape)


# -- elementwise arithmetic and broadcasting -------------------------------------------------------
BROADCAST_PAIRS = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)), ((3, 4), ())]


@pytest.mark.parametrize("sa,sb", BROADCAST_PAIRS)
@pytest.mark.parametrize("name", ["add", "sub", "mul"])
def test_binary_ops_broadcast_gradients(name, sa, sb):
    rng = np.random.default_rng(0)
    op = getattr(ag, name)
    f64 = {"add": np.add, "sub": np.subtract, "mul": np.multiply}[name]
    check_op(op, f64, [rng.standard_normal(sa), rng.standard_normal(sb)], rng)


def test_operator_overloads_call_the_ops():
    a, b = Tensor([[1.0, 2.0]], True), Tensor([[3.0], [4.0]], True)
    y = (a + b) * a - 2.0 * b + (a @ b)  # (2, 2) by broadcasting; a @ b is (1, 1)
    y.backward(np.ones((2, 2), np.float32))
    # S = sum_ij (a_j + b_i) a_j - 4 sum_i b_i + 4 a.b:  dS/da_j = 4 a_j + sum(b) + 4 b_j,
    # dS/db_i = sum(a) - 4 + 4 a_i
    np.testing.assert_allclose(a.grad, [[4 + 7 + 12, 8 + 7 + 16]])
    np.testing.assert_allclose(b.grad, [[3 - 4 + 4], [3 - 4 + 8]])
    np.testing.assert_allclose((-a).data, [[-1, -2]])
    np.testing.assert_allclose((1.0 - a).data, [[0, -1]])


@given(m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 4), seed=st.integers(0, 2**16))
@EXAMPLES
def test_matmul_gradients(m, k, n, seed):
    rng = np.random.default_rng(seed)
    check_op(ag.matmul, np.matmul, [rng.standard_normal((m, k)), rng.standard_normal((k, n))], rng)


def test_matmul_batched_broadcast_gradients():
    rng = np.random.default_rng(1)
    check_op(ag.matmul, np.matmul, [rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 2))], rng)


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
def test_sum_and_mean_gradients(axis, keepdims):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4))
    check_op(lambda t: ag.sum(t, axis, keepdims), lambda a: np.sum(a, axis, keepdims=keepdims), [x], rng)
    check_op(lambda t: ag.mean(t, axis, keepdims), lambda a: np.mean(a, axis, keepdims=keepdims), [x], rng)


def test_reshape_and_flatten_gradients():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 2, 2))
    check_op(lambda t: ag.reshape(t, (6, 4)), lambda a: a.reshape(6, 4), [x], rng)
    check_op(ag.flatten, lambda a: a.reshape(2, -1), [x], rng)


# -- activations -----------------------------------------------------------------------------------
def test_relu_and_sigmoid_gradients():
    rng = np.random.default_rng(4)
    x = away_from_zero(rng, (3, 5))
    check_op(ag.relu, lambda a: np.maximum(a, 0), [x], rng)
    check_op(ag.sigmoid, lambda a: 1 / (1 + np.exp(-a)), [x * 4], rng)


@given(n=st.integers(1, 4), k=st.integers(1, 6), scale=st.sampled_from([1.0, 10.0]),
       seed=st.integers(0, 2**16))
@EXAMPLES
def test_softmax_and_log_softmax_gradients(n, k, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) * scale
    check_op(ag.softmax, ref.softmax, [x], rng)
    check_op(ag.log_softmax, lambda a: np.log(ref.softmax(a)), [x], rng)


def test_log_softmax_is_finite_for_huge_scores():
    y = ag.log_softmax(Tensor([[1000.0, 0.0, -1000.0]]))
    np.testing.assert_allclose(y.data, [[0.0, -1000.0, -2000.0]])


# -- layers ----------------------------------------------------------------------------------------
@given(n=st.integers(1, 3), fin=st.integers(1, 6), fout=st.integers(1, 5), bias=st.booleans(),
       seed=st.integers(0, 2**16))
@EXAMPLES
def test_linear_gradients(n, fin, fout, bias, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((n, fin)), rng.standard_normal((fout, fin)), rng.standard_normal(fout)
    if bias:
        check_op(ag.linear, ref.linear, [x, w, b], rng)
    else:
        check_op(lambda x, w: ag.linear(x, w), lambda x, w: ref.linear(x, w, 0), [x, w], rng)


@st.composite
def conv_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 6))
    w = draw(st.integers(max(1, kw - 2 * pw), 6))
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), o=draw(st.integers(1, 5)),
                h=h, w=w, k=(kh, kw), s=(sh, sw), p=(ph, pw), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@given(case=conv_cases())
@EXAMPLES
def test_conv2d_gradients(case):
    rng = np.random.default_rng(case["seed"])
    (kh, kw), s, p = case["k"], case["s"], case["p"]
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    w = rng.standard_normal((case["o"], case["c"], kh, kw))
    if case["bias"]:
        b = rng.standard_normal(case["o"])
        check_op(lambda x, w, b: ag.conv2d(x, w, b, s, p), lambda x, w, b: ref.conv2d(x, w, b, s, p),
                 [x, w, b], rng)
    else:
        check_op(lambda x, w: ag.conv2d(x, w, None, s, p), lambda x, w: ref.conv2d(x, w, None, s, p),
                 [x, w], rng)


@pytest.mark.parametrize("shape,k,s,p", [((2, 3, 6, 6), (3, 3), (1, 1), (1, 1)),     # LeNet-like
                                         ((2, 4, 5, 5), (5, 5), (1, 1), (0, 0)),     # 1x1 output
                                         ((1, 2, 7, 6), (3, 2), (2, 3), (2, 1))])    # odd everything
def test_conv2d_gradients_fixed_cases(shape, k, s, p):
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal(shape), rng.standard_normal((3, shape[1], *k)), rng.standard_normal(3)
    check_op(lambda x, w, b: ag.conv2d(x, w, b, s, p), lambda x, w, b: ref.conv2d(x, w, b, s, p),
             [x, w, b], rng)


def test_conv2d_without_input_grad_skips_dx():
    rng = np.random.default_rng(6)
    x, w = Tensor(rng.standard_normal((2, 1, 6, 6))), Tensor(rng.standard_normal((2, 1, 3, 3)), True)
    ag.conv2d(x, w, None, 1, 1).sum().backward()
    assert x.grad is None and w.grad.shape == (2, 1, 3, 3)


@given(k=st.integers(1, 3), s=st.integers(1, 3), h=st.integers(3, 7), w=st.integers(3, 7),
       seed=st.integers(0, 2**16))
@EXAMPLES
def test_pool_gradients(k, s, h, w, seed):
    rng = np.random.default_rng(seed)
    # Distinct values a grid step apart: a finite-difference step never changes which input is the max.
    x = rng.permutation(2 * 2 * h * w).reshape(2, 2, h, w) * 0.01
    check_op(lambda t: ag.max_pool2d(t, k, s), lambda a: ref.max_pool2d(a, (k, k), (s, s)), [x], rng)
    check_op(lambda t: ag.avg_pool2d(t, (k, k), (s, s)), lambda a: ref.avg_pool2d(a, (k, k), (s, s)),
             [rng.standard_normal((2, 2, h, w))], rng)


# -- the tape ------------------------------------------------------------------------------------
def test_small_network_end_to_end_gradient():
    """conv -> relu -> maxpool -> flatten -> linear -> log_softmax, all in one graph."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 1, 6, 6))
    w1, b1 = rng.standard_normal((2, 1, 3, 3)), rng.standard_normal(2)
    w2, b2 = rng.standard_normal((3, 8)), rng.standard_normal(3)

    def net(x, w1, b1, w2, b2):
        a = ag.max_pool2d(ag.relu(ag.conv2d(x, w1, b1, 1, 0)), 2, 2)
        return ag.log_softmax(ag.linear(ag.flatten(a), w2, b2))

    def net64(x, w1, b1, w2, b2):
        a = ref.max_pool2d(np.maximum(ref.conv2d(x, w1, b1), 0), (2, 2), (2, 2))
        return np.log(ref.softmax(ref.linear(a.reshape(2, -1), w2, b2)))

    check_op(net, net64, [x, w1, b1, w2, b2], rng)


def test_shared_input_gradients_add_up():
    x = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * x + ag.relu(x) * 3.0 + x  # x reaches the output along four paths
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 3 + 1)


def test_leaf_gradients_accumulate_across_backward_calls():
    x = Tensor([1.0, -2.0], requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 3 + 2 * x.data)


def test_no_grad_records_nothing_and_restores_state():
    w = Tensor([1.0, 2.0], requires_grad=True)
    with no_grad():
        y = w * 2.0
        assert not ag.is_grad_enabled()
    assert ag.is_grad_enabled()
    assert not y.requires_grad and y.parents == ()
    with pytest.raises(InputError, match="does not require grad"):
        y.sum().backward()


def test_backward_needs_a_gradient_for_non_scalars():
    y = Tensor([1.0, 2.0], requires_grad=True) * 2.0
    with pytest.raises(InputError, match="one element"):
        y.backward()
    with pytest.raises(InputError, match=r"expected \(2,\)"):
        y.backward(np.ones(3))


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = Tensor([1.0], requires_grad=True)
    y = x
    for _ in range(3000):
        y = y + 1.0
    y.sum().backward()
    assert x.grad[0] == 1.0


def test_bad_shapes_raise_input_error():
    with pytest.raises(InputError, match="do not broadcast"):
        ag.add(Tensor(np.ones((2, 3))), Tensor(np.ones((4,))))
    with pytest.raises(InputError, match="matmul"):
        ag.matmul(Tensor(np.ones((2, 3))), Tensor(np.ones((2, 3))))
    with pytest.raises(InputError, match="conv2d"):
        ag.conv2d(Tensor(np.ones((1, 2, 5, 5))), Tensor(np.ones((1, 3, 3, 3))))
    with pytest.raises(InputError, match="softmax"):
        ag.softmax(Tensor(np.ones((2, 2, 2))))


def test_lenet_autograd_forward_matches_float64_reference():
    """net(Tensor) and net.logits(Tensor), the training path, compute LeNet-5 as the reference does."""
    import microcnn

    net = microcnn.lenet(seed=1)
    x = np.random.default_rng(8).random((3, 1, 28, 28), dtype=np.float32)
    expected = ref.lenet_forward(net.state_dict(), x)
    np.testing.assert_allclose(net(Tensor(x)).data, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.softmax(net.logits(Tensor(x)).data), expected, rtol=0, atol=1e-6)
