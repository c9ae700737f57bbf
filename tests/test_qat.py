"""Quantization-aware training: LSQ fake quantization on the tape against hand-derived formulas, finite
differences and PyTorch's reference LSQ formulation; distillation loss against NumPy; the converted integer
model against the fake-quantized one."""

import math

import numpy as np
import pytest

from microcnn.autograd import Tensor
from microcnn.errors import InputError
from microcnn.quant.qat import QATNetwork, distillation_loss, fake_quant, lsq_grad_scale, lsq_init
from tests.test_cli_safety import run  # the one CLI runner of the tests


def _grads(x, s, qn, qp, g=1.0, axis=None, upstream=None):
    xt, st = Tensor(x, requires_grad=True), Tensor(s, requires_grad=True)
    y = fake_quant(xt, st, qn, qp, g, axis)
    y.backward(np.ones_like(y.data) if upstream is None else upstream)
    return y.data, xt.grad, st.grad


def test_forward_rounds_half_to_even_and_clips():
    s = np.float32(0.5)
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 0.1, 5.0, -5.0], np.float32)  # x/s: .5, 1.5, 2.5 ties
    y, _, _ = _grads(x, s, 2, 1)
    ref = np.clip(np.rint(x / s), -2, 1) * s
    assert np.array_equal(y, ref.astype(np.float32))
    assert list(y / s) == [0, 1, 1, 0, -2, 0, 1, -2]  # 1.5 -> 2 clipped to 1; -1.5 -> -2


def test_ste_and_lsq_step_gradient_hand_formula_including_boundaries_and_ties():
    s, qn, qp, g = np.float32(0.5), 2, 1, 0.25
    # v = x/s: inside, tie at .5, tie at -1.5, exactly at +Qp, exactly at -Qn, beyond both
    v = np.array([0.3, 0.5, -1.5, 1.0, -2.0, 3.0, -7.0], np.float32)
    x = v * s
    up = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], np.float32)
    _, dx, ds = _grads(x, s, qn, qp, g, upstream=up)
    inside = np.array([1, 1, 1, 0, 0, 0, 0], bool)  # the clamp boundaries count as clipped (paper, eq. 3)
    assert np.array_equal(dx, np.where(inside, up, 0))
    q = np.clip(np.rint(v.astype(np.float64)), -qn, qp)  # rint(.5) = 0, rint(-1.5) = -2
    local = np.where(inside, q - v, q)
    assert local[3] == qp and local[4] == -qn
    assert ds.shape == () and math.isclose(float(ds), g * float((up * local).sum()), rel_tol=1e-6)


def test_step_gradient_matches_finite_differences_where_clipped():
    # Outside the grid v_hat = s * (-Qn or Qp) exactly, so the LSQ gradient is the true derivative.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(1.8, 3, 20), rng.uniform(-3, -2.3, 20)]).astype(np.float32)
    s, w = 0.5, rng.standard_normal(40)
    _, _, ds = _grads(x, np.float32(s), 4, 3, upstream=w.astype(np.float32))
    h = 1e-4

    def f(step):
        return float((w * np.clip(np.rint(x / step), -4, 3) * step).sum())

    assert math.isclose(float(ds), (f(s + h) - f(s - h)) / (2 * h), rel_tol=1e-4)
    # x-gradient: the true derivative there is 0 too
    assert not np.any(_grads(x, np.float32(s), 4, 3)[1])


def test_per_channel_steps_get_per_channel_sums():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 2, 4)).astype(np.float32)
    s = np.array([0.5, 1.0, 2.0], np.float32)
    y, _, ds = _grads(w, s, 2, 1, g=0.5, axis=0)
    for c in range(3):
        v = w[c] / s[c]
        q = np.clip(np.rint(v), -2, 1)
        assert np.array_equal(y[c], (q * s[c]).astype(np.float32))
        inside = (v > -2) & (v < 1)
        assert math.isclose(float(ds[c]), 0.5 * float(np.where(inside, q - v, q).sum()), rel_tol=1e-5)


def test_against_pytorch_lsq_reference():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    s = np.float32(0.4)
    qn, qp = 4, 3
    g = lsq_grad_scale(x.size, qp)
    # Esser et al.'s reference formulation (grad_scale and round_pass, as in their code release)
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(s, requires_grad=True)
    sg = (st - st * g).detach() + st * g
    v = torch.clamp(xt / sg, -qn, qp)
    v = (v.round() - v).detach() + v
    (v * sg).sum().backward()
    y, dx, ds = _grads(x, s, qn, qp, g)
    assert not np.any(np.isin(x / s, [-qn, qp]))  # torch passes the gradient at the exact boundary; we don't
    assert np.array_equal(y, (v * sg).detach().numpy())
    assert np.array_equal(dx, xt.grad.numpy())
    assert math.isclose(float(ds), float(st.grad), rel_tol=1e-5)


def test_lsq_init_and_grad_scale():
    w = np.arange(-6, 6, dtype=np.float32).reshape(2, 6)
    assert np.allclose(lsq_init(w, 3, axis=0), 2 * np.abs(w).mean(axis=1) / math.sqrt(3))
    assert math.isclose(lsq_grad_scale(100, 4), 1 / 20)


def test_bad_steps_refused():
    with pytest.raises(InputError, match="steps must be finite and > 0"):
        fake_quant(Tensor(np.ones(3)), Tensor(np.float32(0)), 2, 1)
    with pytest.raises(InputError, match="step expected shape"):
        fake_quant(Tensor(np.ones((2, 3))), Tensor(np.ones(3)), 2, 1, axis=0)


def test_distillation_loss_value_and_gradient():
    rng = np.random.default_rng(3)
    s_logits = rng.standard_normal((4, 5)).astype(np.float32)
    t_logits = rng.standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    T, alpha = 3.0, 1.0

    def numpy_kl(s):
        def log_softmax(z):
            z = z / T - (z / T).max(axis=1, keepdims=True)
            return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        p = np.exp(log_softmax(t_logits.astype(np.float64)))
        return alpha * T**2 * (p * (np.log(p) - log_softmax(s))).sum() / len(s)

    st = Tensor(s_logits, requires_grad=True)
    loss = distillation_loss(st, t_logits, labels, T, alpha, hard_loss=None)
    assert math.isclose(loss.item(), numpy_kl(s_logits.astype(np.float64)), rel_tol=1e-5)
    loss.backward()
    h, fd = 1e-5, np.zeros_like(s_logits, np.float64)
    for idx in np.ndindex(s_logits.shape):
        e = np.zeros(s_logits.shape)
        e[idx] = h
        fd[idx] = (numpy_kl(s_logits + e) - numpy_kl(s_logits - e)) / (2 * h)
    assert np.allclose(st.grad, fd, atol=1e-5)


def test_converted_model_matches_fake_quant(mnist_train, mnist_test):
    """The integer model computes what was trained: the same prediction on >= 99.5 % of 2,000 test images
    and accuracy within 0.3 pt, at W4A4 after a short fine-tuning. They can differ only where an exact
    integer accumulator sits on a rounding tie that float fake quantization (with its float32 error)
    puts on the other side. At 2 bits such ties are frequent in a barely trained model (one epoch on
    512 images agrees on only ~80 %), so W2A2 is checked on the shipped, fully trained model below."""
    from microcnn import lenet
    from microcnn.train import evaluate, fit

    bits = 4
    images, labels = mnist_train
    test_x, test_y = mnist_test[0][:2000], mnist_test[1][:2000]
    qat = QATNetwork(lenet(weights="bundled"), bits, bits, images[:256])
    fit(qat, images[:512], labels[:512], epochs=1, batch_size=64, lr=1e-3, schedule="none", progress=False)
    qnet = qat.quantized()
    with_fake = evaluate(qat, test_x, test_y)
    agree = float((qnet.logits(test_x).argmax(axis=1) == _fake_predictions(qat, test_x)).mean())
    assert agree >= 0.995
    assert abs(qnet.accuracy(test_x, test_y) - with_fake) <= 0.003
    assert qnet.settings["weight_bits"] == bits and qnet.settings["rounding"] == "qat"


def _fake_predictions(qat, images):
    from microcnn.autograd import no_grad

    with no_grad():
        return qat.logits(Tensor(images)).data.argmax(axis=1)


def test_train_qat_command_writes_an_integer_model_eval_scores(tmp_path, capsys, mnist_test):
    """`train --qat` writes a quantized model whose own accuracy (as `eval` computes it) is the one the
    command printed for the integer model; it refuses to replace the file without --force, and refuses
    bad bit widths and a non-FP32 --init before any work."""
    import re

    from microcnn.quant import load_model
    from microcnn.quant.params import KERNEL_BITS

    bits = 2 if 2 in KERNEL_BITS else 4
    out = tmp_path / f"w{bits}a{bits}.safetensors"
    args = ("train", "--qat", f"w{bits}a{bits}", "--init", "lenet", "--epochs", 1, "--train-images", 256,
            "--no-progress", "--out", out)
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    printed = float(re.search(r"integer model (\d+\.\d+)%", stdout)[1])
    qnet = load_model(out)
    assert (qnet.settings["weight_bits"], qnet.settings["act_bits"]) == (bits, bits)
    assert round(qnet.accuracy(*mnist_test) * 100, 2) == printed
    before = out.read_bytes()
    code, _, err = run(capsys, *args)
    assert code != 0 and "already exists" in err and out.read_bytes() == before
    bad = tmp_path / "x.safetensors"
    code, _, err = run(capsys, "train", "--qat", "w1a2", "--init", "lenet", "--out", bad)
    assert code != 0 and "2..8" in err and "1" in err and not bad.exists()
    code, _, err = run(capsys, "train", "--qat", "w4a4", "--init", out, "--out", bad)
    assert code != 0 and "expected an FP32 model" in err


def test_shipped_w2a2_lenet_reaches_the_target(mnist_test):
    """data/lenet-w2a2-qat.safetensors (README: 15 epochs of QAT, fake-quant 99.05 %) scores >= 98.8 % as
    an integer W2A2 model: within 0.3 pt of its fake-quantized accuracy."""
    from pathlib import Path

    from microcnn.quant import load_model
    from microcnn.quant.params import KERNEL_BITS

    if 2 not in KERNEL_BITS:
        pytest.skip("2-bit integer stages arrive with the 2..8-bit quantizer (ptq14)")
    qnet = load_model(Path(__file__).resolve().parent.parent / "data" / "lenet-w2a2-qat.safetensors")
    assert (qnet.settings["weight_bits"], qnet.settings["act_bits"]) == (2, 2)
    accuracy = qnet.accuracy(*mnist_test)
    assert accuracy >= 0.988 and abs(accuracy - 0.9905) <= 0.003
