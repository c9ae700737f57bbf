"""Same bits on every CPU: predictions compared byte for byte across Numba targets and SIMD widths, the
fixed summation order of the dot-product kernel against a model of it, and guards against the code
that made results depend on the machine (fastmath reassociation, BLAS/LAPACK, NumPy's CPU-dispatched
float64 transcendentals)."""

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from microcnn.kernels import linalg
from microcnn.kernels.gemm import linear_forward, window_dots

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "microcnn"


# -- the fixed order of the dot-product kernel -------------------------------------------------------


def fixed_order_dot(x: np.ndarray, y: np.ndarray) -> np.float32:
    """The order ``gemm._make_dot_kernel`` promises, in NumPy: lane l takes k = l, l + 8, ... by fused
    multiply-adds (the float32 product is exact in float64; the float64 sum rounded to float32 is the
    FMA's single rounding except in double-rounding cases of probability ~2**-29), then lanes (l, l+4),
    (l, l+2), (0, 1) are added. The 8 is the documented order, not ``gemm.DOT_LANES``: a changed constant
    changes the bits and must be caught."""
    lanes = [np.float32(0.0)] * 8
    for k in range(len(x)):
        lane = k % 8
        lanes[lane] = np.float32(np.float64(x[k]) * np.float64(y[k]) + np.float64(lanes[lane]))
    width = 8
    while width > 1:
        width //= 2
        lanes = [np.float32(lanes[i] + lanes[i + width]) for i in range(width)]
    return lanes[0]


@pytest.mark.parametrize(("n", "k", "o"), [(1, 400, 12), (7, 84, 10), (6, 3, 5), (9, 17, 11), (5, 8, 9),
                                           (4, 1, 4)])
def test_linear_forward_sums_in_the_fixed_order(n, k, o):
    """Every block shape of the kernel (4x4, 4x1, 1x8, 1x1) and every tail length (k mod 8)."""
    rng = np.random.default_rng(n * 1000 + k)
    x = rng.standard_normal((n, k), dtype=np.float32)
    w = rng.standard_normal((o, k), dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32)
    x[0, : k // 2] = w[0, : k // 2]  # a row equal to a weight row: a large, all-positive sum
    expected = np.array([[fixed_order_dot(x[i], w[j]) + b[j] for j in range(o)] for i in range(n)],
                        np.float32)
    np.testing.assert_array_equal(linear_forward(x, w, b), expected)
    reference = x.astype(np.float64) @ w.T.astype(np.float64) + b  # and it is a dot product
    assert np.abs(linear_forward(x, w, b) - reference).max() < 1e-5 * (1 + np.abs(reference).max())


def test_window_dots_accumulates_onto_existing_values_in_the_fixed_order():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 21), dtype=np.float32)
    src = rng.standard_normal(60, dtype=np.float32)
    offs = np.array([0, 5, 39, 2, 17], np.int64)  # overlapping windows, not in order
    start = rng.standard_normal((6, 5), dtype=np.float32)
    c = start.copy()
    window_dots(a, src, offs, c, True)
    expected = np.array([[start[i, j] + fixed_order_dot(a[i], src[offs[j]:offs[j] + 21])
                          for j in range(5)] for i in range(6)], np.float32)
    np.testing.assert_array_equal(c, expected)
    window_dots(a, src, offs, c, False)  # without accumulate: the dot products alone
    dots = [[fixed_order_dot(a[i], src[offs[j]:offs[j] + 21]) for j in range(5)] for i in range(6)]
    np.testing.assert_array_equal(c, np.array(dots, np.float32))


# -- fixed-order linear algebra for the quantization tools -------------------------------------------


def test_fixed_order_linear_algebra_matches_numpy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 37))
    x[:, 4] = 0.0  # an input that is always 0 (skipped rows of zeros)
    x[::3, 7] = 0.0
    g = linalg.gram(x)
    np.testing.assert_allclose(g, x.T @ x, rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(g, g.T)
    h = g + 0.1 * np.eye(37)
    lo = linalg.cholesky_lower(h)
    np.testing.assert_array_equal(lo, np.tril(lo))
    np.testing.assert_allclose(lo, np.linalg.cholesky(h), rtol=1e-9, atol=1e-12)
    inv = linalg.inverse_spd(h)
    np.testing.assert_allclose(inv @ h, np.eye(37), atol=1e-9)
    np.testing.assert_array_equal(inv, inv.T)
    with pytest.raises(ValueError, match="positive definite"):
        linalg.cholesky_lower(np.array([[1.0, 2.0], [2.0, 1.0]]))
    p, q = np.array([0.5, 0.0, 0.25, 0.25]), np.array([0.25, 0.25, 0.25, 0.25])
    assert linalg.kl_sum(p, q) == pytest.approx(0.5 * np.log(2.0), rel=1e-15)


# -- guards against what made results depend on the machine -------------------------------------------

_FORBIDDEN_FASTMATH = ("reassoc", "nsz", "arcp", "afn", "nnan", "ninf", "fast")


def _njit_fastmath(tree):
    """(line, flags) of every ``njit(..., fastmath=...)``, flags given inline or as a module constant."""
    constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "njit":
            for kw in node.keywords:
                if kw.arg == "fastmath":
                    value = constants.get(kw.value.id) if isinstance(kw.value, ast.Name) else kw.value
                    yield node.lineno, ast.literal_eval(value)


def test_no_kernel_reassociates_floating_point():
    """fastmath flags beyond ``contract`` let LLVM reorder sums by the target's vector width."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for line, flags in _njit_fastmath(tree):
            flags = {"fast"} if flags is True else set(flags or ())
            if flags & set(_FORBIDDEN_FASTMATH):
                found.append(f"{path.relative_to(ROOT)}:{line} fastmath={sorted(flags)}")
    assert not found


# Modules whose numbers users see (predictions, calibration, quantization, analysis tables) and which
# therefore may not call BLAS/LAPACK or NumPy's CPU-dispatched float64 exp/log.
_DETERMINISTIC_MODULES = ["network.py", "layers.py", "lenet.py", "analysis.py", "quant", "kernels"]
_DISPATCHED = {"dot", "matmul", "vdot", "inner", "tensordot", "linalg", "exp", "log", "log1p", "log10",
               "log2", "expm1"}


def test_visible_numbers_use_no_blas_or_cpu_dispatched_numpy_math():
    found = []
    for entry in _DETERMINISTIC_MODULES:
        paths = sorted((PACKAGE / entry).rglob("*.py")) if (PACKAGE / entry).is_dir() else [PACKAGE / entry]
        for path in paths:
            tree = ast.parse(path.read_text())
            # inside functions compiled by Numba, np.exp and np.log are C-library calls
            compiled = [(f.lineno, f.end_lineno) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                        and any("njit" in ast.unparse(d) for d in f.decorator_list)]
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
                    found.append(f"{where} a @ b")
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id == "np" and node.attr in _DISPATCHED
                      and not any(lo <= node.lineno <= hi for lo, hi in compiled)):
                    found.append(f"{where} np.{node.attr}")
    assert not found


# -- the same predictions under different targets, byte for byte -------------------------------------

_PREDICT = """
import hashlib, json
import numpy as np
import numba
import microcnn
from microcnn.datasets import load_mnist
from microcnn.kernels import simd
from microcnn.quant import calibrate, quantize

test_images, test_labels = load_mnist("test", download=False)
train_images = load_mnist("train", download=False)[0]
images, labels = test_images[:1000], test_labels[:1000]
net = microcnn.lenet(weights="bundled")
cal = calibrate(net, train_images[:2000], method="mse", samples=100, progress=False)
models = {"fp32": net, "int8": quantize(net, cal, weight_bits=8, act_bits=8),
          "w4a4": quantize(net, cal, weight_bits=4, act_bits=4)}
out = {"cpu_name": numba.config.CPU_NAME, "simd": simd.SIMD}
for name, model in models.items():
    for batch in (1000, 7):
        probs = model.predict(images[:batch])
        out[f"{name}/{batch}"] = hashlib.sha256(np.ascontiguousarray(probs).tobytes()).hexdigest()
    out[f"{name}/accuracy"] = float((model.predict(images).argmax(1) == labels).mean())
print(json.dumps(out))
"""


def _avx2_machine_numpy() -> dict:
    """Environment that makes NumPy and OpenBLAS behave as on a CPU without AVX-512 (NumPy's AVX-512
    loops disabled, OpenBLAS's Haswell kernels), when this machine has AVX-512."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    avx512 = [f for f in __cpu_dispatch__ if __cpu_features__.get(f) and ("AVX512" in f or f == "X86_V4")]
    env = {"OPENBLAS_CORETYPE": "Haswell"}
    if avx512:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(avx512)
    return env


def _run_predictions(tmp_path: Path, label: str, extra_env: dict, script: str = _PREDICT,
                     fresh_cache: bool = True) -> dict:
    """The JSON ``script`` prints last, run in a fresh process with its own empty Numba cache (or, without
    ``fresh_cache``, the package's own: the host's code as every other test compiles and caches it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "MICROCNN_SIMD", "MICROCNN_PAIRS",
                         "NUMBA_CACHE_DIR")}
    if fresh_cache:
        cache = tmp_path / f"numba-cache-{label}"
        cache.mkdir()
        env["NUMBA_CACHE_DIR"] = str(cache)
    env.update(PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1", **extra_env)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, f"{label}: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_predictions_are_byte_identical_across_numba_targets_and_simd_widths(tmp_path, mnist_test,
                                                                            mnist_train):
    """FP32, INT8 and W4A4 probabilities at batch 1000 and 7 on real test images (calibrated on training
    images) on the host target, as the package caches it, against configurations each compiled from
    scratch in its own Numba cache: Haswell (with NumPy/OpenBLAS as on an AVX2-only CPU), Skylake-AVX512,
    and the host with the integer kernels narrowed to 8 lanes (AVX2) and to portable IR. (The host's
    own cache: one compile less, about a minute of the suite.)"""
    from microcnn.kernels.simd import host_simd

    configs = {"host": {}, "haswell": {"NUMBA_CPU_NAME": "haswell", **_avx2_machine_numpy()},
               "skylake-avx512": {"NUMBA_CPU_NAME": "skylake-avx512"}, "simd0": {"MICROCNN_SIMD": "0"}}
    if host_simd() >= 16:
        configs["simd8"] = {"MICROCNN_SIMD": "8"}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(configs, pool.map(
            lambda item: _run_predictions(tmp_path, *item, fresh_cache=item[0] != "host"), configs.items()),
            strict=True))
    # the runs really compiled for what was asked
    assert results["haswell"]["cpu_name"] == "haswell" and results["haswell"]["simd"] == 0
    assert results["skylake-avx512"]["cpu_name"] == "skylake-avx512"
    assert results["host"]["simd"] == host_simd() and results["simd0"]["simd"] == 0
    reference = results["host"]
    assert reference["fp32/accuracy"] > 0.97 and reference["int8/accuracy"] > 0.97
    assert reference["w4a4/accuracy"] > 0.5
    keys = [k for k in reference if "/" in k]
    differing = {label: [k for k in keys if result[k] != reference[k]] for label, result in results.items()}
    assert differing == {label: [] for label in results}
    assert len({reference[k] for k in keys if not k.endswith("accuracy")}) == 6  # six distinct outputs



@pytest.mark.slow
def test_each_lowered_simd_width_gets_its_own_numba_cache(tmp_path):
    """Numba's cache index does not know MICROCNN_SIMD: a lowered width must not load (or overwrite) code
    compiled for another width, whose block layouts differ."""
    from microcnn.kernels.simd import _hardware_simd, host_vnni

    code = "from numba.core import config; import microcnn.kernels.simd as s; print(s.SIMD, config.CACHE_DIR)"
    seen = {}
    for requested in ("", "0", "8"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": str(tmp_path),
               "MICROCNN_SIMD": requested}
        env.pop("NUMBA_CPU_NAME", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True)
        width, cache = out.stdout.split()
        seen[requested] = (int(width), cache)
    natural = _hardware_simd()
    assert seen[""][0] == natural
    folders = {cache for _, cache in seen.values()}
    assert all(Path(cache).parent == tmp_path for cache in folders)
    for requested in ("0", "8"):
        width, cache = seen[requested]
        assert width == min(natural, int(requested))
        # VNNI code (u8 x s8 dot products) gets a folder of its own too: "-simd8-vnni"
        assert cache.endswith(f"-simd{width}" + "-vnni" * host_vnni(width))
        assert (cache == seen[""][1]) == (width == natural)


def test_numba_cache_folder_follows_every_kernel_source(tmp_path):
    """Numba checks a cached function against its own file only: editing another kernel file (one it
    inlines) must move the whole cache to a new folder, or stale machine code would run."""
    import shutil

    shutil.copytree(ROOT / "microcnn", tmp_path / "microcnn", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from numba.core import config; import microcnn.kernels.simd; print(config.CACHE_DIR)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def folder():
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True, cwd=tmp_path).stdout.strip()

    before = folder()
    assert folder() == before  # stable while nothing changes
    with open(tmp_path / "microcnn" / "kernels" / "elementwise.py", "a") as f:
        f.write("\n# an edit\n")
    assert folder() != before


def test_read_only_install_caches_in_the_users_folder(tmp_path):
    """Numba falls back to a user folder when the package's __pycache__ is not writable; pointing its
    cache at our own folder must keep that, or a read-only install would recompile in every process.
    (The folder is made to look read-only through os.access: as root, chmod would not stop writes.)"""
    import shutil

    shutil.copytree(ROOT / "microcnn", tmp_path / "pkg" / "microcnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("NUMBA_CACHE_DIR", None)

    def folder(read_only: bool) -> Path:
        code = ("import os\n"
                + ("os.access = lambda *args, **kwargs: False\n" if read_only else "")
                + "from numba.core import config; import microcnn.kernels.simd; print(config.CACHE_DIR)")
        return Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True, cwd=tmp_path).stdout.strip())

    assert folder(read_only=False).parent == tmp_path / "pkg" / "microcnn" / "kernels" / "__pycache__"
    assert folder(read_only=True).parent == tmp_path / "xdg" / "microcnn" / "numba"
