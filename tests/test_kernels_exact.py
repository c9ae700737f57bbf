"""Exact checks of the small kernels the larger tests only reach indirectly: the prepared-weight cache's
bit comparison, the fixed-order float64 linear algebra (known factors and inverses, non-square
products), the dense layer's fused ReLU, and where the Numba cache lives for each SIMD width.

Each test was written against a planted one-line bug (``tools/kernel_mutants.py``) that the suite let
through: a comparison that keeps only the last element's difference, a Cholesky that accepts a zero
pivot, a width override that exceeds the hardware."""

import numpy as np
import pytest

from microcnn.kernels import linalg, simd
from microcnn.kernels.elementwise import same_bits
from microcnn.kernels.gemm import linear_forward

# -- elementwise.same_bits ----------------------------------------------------------------------------


def test_same_bits_sees_a_difference_in_any_position():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 2), dtype=np.float32)
    assert same_bits(a, a.copy())
    for flat in (0, 7, a.size - 1):  # first, middle, last: a difference must survive later equal values
        b = a.copy()
        b.reshape(-1)[flat] = np.nextafter(b.reshape(-1)[flat], np.float32(np.inf))
        assert not same_bits(a, b), flat
        assert not same_bits(b, a), flat


def test_same_bits_compares_bits_not_values():
    zeros, negative = np.zeros(4, np.float32), np.zeros(4, np.float32)
    negative[2] = -0.0
    assert not same_bits(zeros, negative)  # equal values, different bits
    nan = np.full(3, np.nan, np.float32)
    assert same_bits(nan, nan.copy())  # NaN != NaN as values, same bits


def test_same_bits_refuses_different_sizes_with_the_same_leading_dimension():
    a = np.zeros((4, 2), np.float32)
    b = np.zeros((4, 3), np.float32)  # a's 8 values are b's first 8
    assert not same_bits(a, b)
    assert not same_bits(b, a)
    assert not same_bits(np.zeros(5, np.float32), np.zeros(6, np.float32))


# -- linalg ------------------------------------------------------------------------------------------


def test_cholesky_and_inverse_of_a_known_matrix_are_exact():
    a = np.array([[4.0, 2.0], [2.0, 5.0]])  # L = [[2, 0], [1, 2]], a^-1 = [[5, -2], [-2, 4]] / 16
    np.testing.assert_array_equal(linalg.cholesky_lower(a), [[2.0, 0.0], [1.0, 2.0]])
    np.testing.assert_array_equal(linalg.inverse_spd(a), np.array([[5.0, -2.0], [-2.0, 4.0]]) / 16)


def test_cholesky_refuses_a_singular_matrix():
    """A zero pivot (positive semi-definite, not definite) would divide by zero: refused like an
    indefinite one."""
    with pytest.raises(ValueError, match="positive definite"):
        linalg.cholesky_lower(np.array([[1.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="positive definite"):
        linalg.cholesky_lower(np.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("n", [1, 3, 6])
def test_inverse_of_a_random_spd_matrix_matches_numpy(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n + 4, n))
    h = x.T @ x + 0.5 * np.eye(n)
    lo = linalg.cholesky_lower(h)
    np.testing.assert_allclose(lo @ lo.T, h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(linalg.inverse_spd(h), np.linalg.inv(h), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("p", "k"), [(2, 5), (7, 3), (1, 1)])
def test_gram_of_non_square_inputs(p, k):
    rng = np.random.default_rng(p * 10 + k)
    x = rng.standard_normal((p, k))
    np.testing.assert_allclose(linalg.gram(x), x.T @ x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(("m", "k", "n"), [(3, 5, 7), (7, 2, 3), (1, 4, 1), (4, 4, 4)])
def test_matmul_of_non_square_operands_matches_numpy(m, k, n):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    c = linalg.matmul(a, b)
    assert c.shape == (m, n)
    np.testing.assert_allclose(c, a @ b, rtol=1e-13, atol=1e-13)


def test_kl_sum_of_non_uniform_distributions():
    p = np.array([0.1, 0.0, 0.6, 0.3])
    q = np.array([0.4, 0.2, 0.3, 0.1])
    expected = sum(pi * np.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
    assert linalg.kl_sum(p, q) == pytest.approx(expected, rel=1e-14)
    assert linalg.kl_sum(q, q) == 0.0


# -- gemm.linear_forward's fused ReLU ------------------------------------------------------------------


def test_linear_forward_relu_clamps_only_when_asked():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 11), dtype=np.float32)
    w = rng.standard_normal((6, 11), dtype=np.float32)
    b = rng.standard_normal(6, dtype=np.float32)
    plain = linear_forward(x, w, b)
    assert (plain < 0).any()  # the ReLU has something to do
    np.testing.assert_array_equal(linear_forward(x, w, b, True), np.maximum(plain, np.float32(0.0)))
    np.testing.assert_array_equal(linear_forward(x, w, b, False), plain)


# -- simd: the Numba cache folder per width ------------------------------------------------------------


def test_cache_folder_is_inside_numba_cache_dir_and_keyed_on_the_width(tmp_path, monkeypatch):
    from numba.core import config

    folders = {}
    for width in (0, 8, 16):
        monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))  # restored after the test
        simd._cache_folder(width)
        folders[width] = config.CACHE_DIR
    assert len(set(folders.values())) == 3
    for width, folder in folders.items():
        assert folder.startswith(str(tmp_path) + "/") and folder.endswith(f"-simd{width}")


def test_cache_folder_is_keyed_on_vnni_use(tmp_path, monkeypatch):
    # MICROCNN_VNNI=0 on VNNI hardware must not load the vpdpbusd code cached by a default run
    from numba.core import config

    folders = {}
    for vnni in (False, True):
        monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))  # restored after the test
        simd._cache_folder(16, vnni)
        folders[vnni] = config.CACHE_DIR
    assert folders[True].endswith("-simd16-vnni") and folders[False].endswith("-simd16")
    assert folders[True] == folders[False] + "-vnni"


def test_cache_folder_is_keyed_on_block_pair_use(tmp_path, monkeypatch):
    # MICROCNN_PAIRS=1 on a Zen 4 compiles conv_blocked with PAIR_PIXELS = 10: not the default's code
    from numba.core import config

    folders = {}
    for pairs in (False, True):
        monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))  # restored after the test
        simd._cache_folder(16, True, pairs)
        folders[pairs] = config.CACHE_DIR
    assert folders[True] == folders[False] + "-pairs" and folders[False].endswith("-simd16-vnni")


@pytest.mark.parametrize(("width", "cpu", "requested", "expected"),
                         [(16, "znver4", "", False), (16, "sapphirerapids", "", True),
                          (16, "skylake-avx512", "", True), (16, "tigerlake", "", False),
                          (16, "znver4", "1", True), (16, "sapphirerapids", "0", False),
                          (8, "sapphirerapids", "", False), (8, "znver4", "1", False),
                          (0, "sapphirerapids", "1", False)])
def test_block_pairs_follow_the_core_and_the_override(monkeypatch, width, cpu, requested, expected):
    from llvmlite import binding

    monkeypatch.setattr(binding, "get_host_cpu_name", lambda: cpu)
    monkeypatch.setenv("MICROCNN_PAIRS", requested)
    assert simd.host_block_pairs(width) is expected


@pytest.mark.parametrize(("hardware", "requested", "expected"),
                         [(8, "16", 8), (8, "0", 0), (16, "8", 8), (8, "", 8), (16, "12", 16), (0, "16", 0)])
def test_microcnn_simd_can_only_lower_the_hardware_width(monkeypatch, hardware, requested, expected):
    monkeypatch.setattr(simd, "_hardware_simd", lambda: hardware)
    monkeypatch.setenv("MICROCNN_SIMD", requested)
    assert simd.host_simd() == expected
