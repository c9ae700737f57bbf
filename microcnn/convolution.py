"""Convolution algorithm dispatch: prepared-weight cache, auto-tuning, explicit fallbacks, benchmarks.

``conv2d_forward`` is what ``Conv2d.forward`` calls. The calling layer owns a ``state`` dict in
which this module keeps

* ``"prepared"`` and ``"runners"``: per-algorithm weight transforms (Winograd ``U``, FFT spectra,
  im2col's packed blocks) and the kernels holding them, valid for the weight values in ``"weights"``
  (a copy). Every call compares the weights with that copy, bit for bit (~0.1 ns a value), and
  rebuilds on any difference, so nothing that changes a weight -- an optimizer step, pruning in place,
  ``load_state_dict``, another array -- can leave a convolution computing with the old values;
* ``"used"``: the algorithm that actually ran last time, and ``"fallback"``: why it differs from the
  requested one (``None`` when it does not).

Algorithms: ``naive`` (reference loops), ``im2col`` (implicit patch matrix + our GEMM; the fast
default), ``winograd`` (F(2x2, rxr), r in {3, 5}, stride 1), ``winograd4`` (F(4x4, rxr), fewer
multiplies but ~10x the rounding error -- selectable, never picked by ``auto``), ``fft``.

``auto`` times the eligible fast algorithms (im2col, winograd, fft) once per (layer shape, batch-size
bucket) on up to ``AUTO_SAMPLE`` images of the real input and remembers the fastest for the rest
of the process (``auto_choices()`` shows the decisions). ``naive`` is never a candidate: it is the
reference, not a contender.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from .errors import InputError
from .kernels import conv as K
from .kernels.elementwise import same_bits

ALGORITHMS = ("naive", "im2col", "winograd", "fft")
# Extra names conv2d_forward accepts: a variant of an algorithm above.
ALGORITHM_VARIANTS = ("winograd4",)
AUTO_CANDIDATES = ("im2col", "winograd", "fft")
AUTO_SAMPLE = 64  # images the auto-tuner times each candidate on
_WINOGRAD_TILE = {"winograd": 2, "winograd4": 4}
_BUCKETS = (1, 8, 64)  # batch-size buckets: 1, 2-8, 9-64, >64

_F32 = np.dtype(np.float32)
_auto_cache: dict[tuple, str] = {}
_auto_timings: dict[tuple, dict[str, float]] = {}


def _batch_bucket(n: int) -> int:
    for i, top in enumerate(_BUCKETS):
        if n <= top:
            return i
    return len(_BUCKETS)


def ineligibility(algorithm: str, w_shape, stride, padding, dilation=(1, 1), groups=1) -> str | None:
    """Why ``algorithm`` cannot run this convolution, or None when it can."""
    kh, kw = w_shape[2], w_shape[3]
    if algorithm in ("winograd", "winograd4", "fft") and (tuple(dilation) != (1, 1) or groups != 1):
        return f"{algorithm} needs dilation (1, 1) and groups 1, found {tuple(dilation)} and {groups}"
    if algorithm in _WINOGRAD_TILE:
        if tuple(stride) != (1, 1):
            return f"{algorithm} needs stride (1, 1), found {tuple(stride)}"
        if kh != kw or kh not in (3, 5):
            return f"{algorithm} needs a 3x3 or 5x5 kernel, found {kh}x{kw}"
    return None


def eligible_algorithms(w_shape, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1) -> tuple[str, ...]:
    """The algorithms of ``ALGORITHMS`` (and variants) that run this convolution without fallback.

    FFT handles any stride by subsampling a stride-1 result (correct but wasteful)."""
    names = ALGORITHMS + ALGORITHM_VARIANTS
    return tuple(a for a in names if ineligibility(a, w_shape, stride, padding, dilation, groups) is None)


def _check(x, w, b, stride, padding, dilation, groups):
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.flags.c_contiguous):
        arr = np.asarray(x)
        if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"conv2d x: expected a float (N, C, H, W) array, found {arr.dtype} {arr.shape}")
        x = np.ascontiguousarray(arr, dtype=np.float32)
    if not (isinstance(w, np.ndarray) and w.dtype == np.float32 and w.flags.c_contiguous):
        w = np.ascontiguousarray(w, dtype=np.float32)
    if not (isinstance(b, np.ndarray) and b.dtype == np.float32 and b.flags.c_contiguous):
        b = np.ascontiguousarray(b, dtype=np.float32)
    n, c, h, wd = x.shape
    if groups < 1 or c % groups or w.ndim != 4 or w.shape[0] % groups or w.shape[1] * groups != c:
        cg = c // groups if groups >= 1 and c % groups == 0 else f"{c} / {groups}"
        raise InputError(f"conv2d w: expected (O, {cg}, KH, KW) for input {x.shape} and groups {groups} "
                         f"(dividing C and O), found {w.shape}")
    if b.shape != (w.shape[0],):
        raise InputError(f"conv2d b: expected shape ({w.shape[0]},), found {b.shape}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if sh < 1 or sw < 1 or ph < 0 or pw < 0 or dh < 1 or dw < 1:
        raise InputError(f"conv2d: expected stride >= 1, padding >= 0 and dilation >= 1, found {stride}, "
                         f"{padding}, {dilation}")
    if h + 2 * ph < dh * (w.shape[2] - 1) + 1 or wd + 2 * pw < dw * (w.shape[3] - 1) + 1 or n == 0:
        raise InputError(f"conv2d: input {x.shape} with padding {padding} is smaller than kernel {w.shape} "
                         f"dilated by {dilation}")
    return x, w, b


def _prepared(state, key, make):
    item = state["prepared"].get(key)
    if item is None:
        item = state["prepared"][key] = make()
    return item


def _runner(algorithm, x_shape, w, stride, padding, state, dilation=(1, 1), groups=1):
    """A ``run(x, b, pool=None, relu=False)`` (see ``kernels.conv.im2col_runner``) for this algorithm and
    input shape (any batch size), cached in the state."""
    key = (algorithm, x_shape[1:], stride, padding, dilation, groups)
    run = state["runners"].get(key)
    if run is not None:
        return run
    (sh, sw), (ph, pw) = stride, padding
    kh, kw = w.shape[2], w.shape[3]
    if algorithm == "im2col":
        run = K.im2col_runner(x_shape, w, sh, sw, ph, pw, dilation, groups)
    elif algorithm in _WINOGRAD_TILE:
        m = _WINOGRAD_TILE[algorithm]
        u = _prepared(state, ("winograd", m), lambda: K.winograd_weights(w, m))
        run = K.winograd_runner(x_shape, u, ph, pw, m, kh)
    elif algorithm == "fft":
        grid = (x_shape[2] + 2 * ph, x_shape[3] + 2 * pw)
        wf = _prepared(state, ("fft", grid), lambda: K.fft_weights(w, grid))
        run = K.fft_runner(x_shape, wf, kh, kw, sh, sw, ph, pw)
    else:
        def run(x, b):
            return K.conv2d_naive(x, w, b, sh, sw, ph, pw, dilation, groups)
    if algorithm != "im2col":
        run = K.with_pool(run)
    state["runners"][key] = run
    return run


def _auto_key(x, w, stride, padding, dilation=(1, 1), groups=1):
    return (x.shape[1:], w.shape, stride, padding, _batch_bucket(x.shape[0]), dilation, groups)


def _tune(key, x, w, b, stride, padding, state, dilation, groups) -> str:
    sample = x[:AUTO_SAMPLE]
    times: dict[str, float] = {}
    for algorithm in AUTO_CANDIDATES:
        if ineligibility(algorithm, w.shape, stride, padding, dilation, groups) is not None:
            continue
        run = _runner(algorithm, x.shape, w, stride, padding, state, dilation, groups)
        run(sample, b)  # compile / first touch, not timed
        best = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            run(sample, b)
            best = min(best, time.perf_counter() - t0)
        times[algorithm] = best
    _auto_timings[key] = times
    choice = _auto_cache[key] = min(times, key=times.__getitem__)
    return choice


def auto_choices():
    """The auto-tuner's decisions so far: one row per (layer shape, batch bucket), times in ms."""
    import pandas as pd

    rows = []
    for key, choice in _auto_cache.items():
        (c, h, wd), wshape, stride, padding, bucket = key[:5]
        lo = 1 if bucket == 0 else _BUCKETS[bucket - 1] + 1
        hi = _BUCKETS[bucket] if bucket < len(_BUCKETS) else None
        row = {"Input": f"{c}x{h}x{wd}", "Kernel": "x".join(map(str, wshape)), "Stride": stride,
               "Padding": padding, "Batch": f"{lo}-{hi}" if hi else f">{lo - 1}", "Choice": choice}
        row.update({f"{a} (ms)": t * 1e3 for a, t in _auto_timings.get(key, {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def reset_auto_choices() -> None:
    """Forget the auto-tuner's decisions (they are re-measured on the next ``auto`` call)."""
    _auto_cache.clear()
    _auto_timings.clear()


def _resolve(algorithm, x, w, b, stride, padding, state, dilation, groups):
    """(algorithm that will run, why it differs from the requested one or None)."""
    if algorithm == "auto":
        key = _auto_key(x, w, stride, padding, dilation, groups)
        used = _auto_cache.get(key)
        if used is None:
            used = _tune(key, x, w, b, stride, padding, state, dilation, groups)
        return used, None
    if algorithm in _WINOGRAD_TILE or algorithm in ALGORITHMS:
        reason = ineligibility(algorithm, w.shape, stride, padding, dilation, groups)
        if reason is None:
            return algorithm, None
        reason = f"{reason}; used im2col"
        if state.get("warned") != reason:
            state["warned"] = reason
            warnings.warn(f"conv2d: {reason}", RuntimeWarning, stacklevel=4)
        return "im2col", reason
    raise InputError(
        f"conv2d algorithm: expected 'auto' or one of {ALGORITHMS + ALGORITHM_VARIANTS}, found {algorithm!r}"
    )


def conv2d_forward(x, w, b, stride=(1, 1), padding=(0, 0), algorithm="auto", state=None, pool=None,
                   relu=False, dilation=(1, 1), groups=1, out=None):
    """y (N, O, OH, OW) float32 = conv2d(x, w) + b by ``algorithm`` ("auto", one of ``ALGORITHMS``,
    or a variant in ``ALGORITHM_VARIANTS``); then ReLU when ``relu``, then max pooling when ``pool`` =
    (kh, kw, sh, sw[, ph, pw, ceil]) or a ``kernels.pool.PoolGeometry`` -- which im2col does in the
    convolution's own pass. ``dilation`` and ``groups`` as PyTorch's (w is (O, C / groups, KH, KW)).
    ``out``: an array y may be written into (see ``kernels.conv.im2col_runner``); y is returned.

    ``state``: a dict owned by the calling layer (see the module docstring). A requested algorithm
    that cannot run this shape (Winograd with stride 2 or a 7x7 kernel, Winograd and FFT with dilation
    or groups) falls back to im2col, records why in ``state["fallback"]`` and warns once per state;
    unknown names raise ``InputError``.

    A repeat call with the same input shape and weight array, whose values are unchanged, goes
    straight to the prepared kernel (about 1 us of Python), which keeps batch-1 latency low.
    """
    if state is None:
        state = {}
    memo = state.get("memo")
    if (
        memo is not None
        and memo[0] is w
        and memo[1] == x.shape
        and memo[2] == algorithm
        and memo[3] == stride
        and memo[4] == padding
        and memo[7] == dilation
        and memo[8] == groups
        and type(x) is np.ndarray
        and x.dtype == _F32
        and x.flags.c_contiguous
        and type(b) is np.ndarray
        and b.dtype == _F32
        and b.shape == memo[5]
        and same_bits(w, state["weights"])
    ):
        return memo[6](x, b, pool, relu, out)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    x, w2, b = _check(x, w, b, stride, padding, dilation, groups)
    seen = state.get("weights")
    if seen is None or seen.shape != w2.shape or not same_bits(w2, seen):
        state["prepared"] = {}
        state["runners"] = {}
        state["weights"] = w2.copy()
    used, fallback = _resolve(algorithm, x, w2, b, stride, padding, state, dilation, groups)
    run = _runner(used, x.shape, w2, stride, padding, state, dilation, groups)
    state["used"] = used
    state["fallback"] = fallback
    # Only a float32 contiguous weight array may be remembered by identity (others are converted copies).
    memo = (w, x.shape, algorithm, stride, padding, b.shape, run, dilation, groups)
    state["memo"] = memo if w2 is w else None
    return run(x, b, pool, relu, out)


# -- benchmarks --------------------------------------------------------------------------------


def _conv_layers(net):
    # By type name, as the file formats do: this module is below layers.py, which calls into it.
    names = getattr(net, "names", None) or [f"layer{i}" for i in range(len(net.layers))]
    return [(name, layer) for name, layer in zip(names, net.layers, strict=True)
            if getattr(layer, "type", None) == "Conv2d"]


def _images(net, images):
    return net.check_input(images)  # every model (``model.Model``) validates its own input


def _check_algorithms(algorithms):
    algorithms = tuple(algorithms)
    bad = [a for a in algorithms if a not in ALGORITHMS + ALGORITHM_VARIANTS]
    if bad or not algorithms:
        raise InputError(f"algorithms: expected names from {ALGORITHMS + ALGORITHM_VARIANTS}, "
                         f"found {algorithms}")
    return algorithms


def benchmark_algorithms(net, images, algorithms=ALGORITHMS, repeats=5, progress=False):
    """Whole-network forward time on ``images`` with every conv layer set to each algorithm.

    Columns: Algorithm, Total Time (ms) (median of ``repeats`` runs after one untimed warm-up),
    Per Image (us), Speedup (naive time / this time), Max Error vs Naive (max |logit difference|
    against the naive network). Naive is always run, as the reference, even when not listed. A
    layer an algorithm cannot run falls back to im2col (Winograd with stride 2); such rows say so
    in the Algorithm column. Times use the current Numba thread count.
    """
    import pandas as pd

    from .timing import median_time

    algorithms = _check_algorithms(algorithms)
    images = _images(net, images)
    run = net.logits
    layers = _conv_layers(net)
    saved = [layer.algorithm for _, layer in layers]
    order = ("naive",) + tuple(a for a in algorithms if a != "naive")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="conv algorithms", unit="algorithm")
    results = {}
    try:
        for algorithm in order:
            if algorithm in ALGORITHMS:
                net.set_conv_algorithm(algorithm)
            else:
                _set_all(layers, algorithm)
            out = run(images)
            seconds = median_time(lambda: run(images), repeats)
            fallbacks = sorted({layer.conv_state.get("fallback") for _, layer in layers} - {None})
            results[algorithm] = (seconds, out, fallbacks)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for (_, layer), algorithm in zip(layers, saved, strict=True):
            layer.algorithm = algorithm
            layer.conv_state.clear()
    naive_time, naive_out, _ = results["naive"]
    rows = []
    for algorithm in algorithms:
        seconds, out, fallbacks = results[algorithm]
        label = algorithm + (f" (fallback: {'; '.join(fallbacks)})" if fallbacks else "")
        rows.append({
            "Algorithm": label,
            "Total Time (ms)": seconds * 1e3,
            "Per Image (us)": seconds * 1e6 / len(images),
            "Speedup": naive_time / seconds,
            "Max Error vs Naive": float(np.max(np.abs(out.astype(np.float64) - naive_out))),
        })
    return pd.DataFrame(rows, columns=["Algorithm", "Total Time (ms)", "Per Image (us)", "Speedup",
                                       "Max Error vs Naive"])


def _set_all(layers, algorithm):
    for _, layer in layers:
        layer.algorithm = algorithm
        layer.conv_state.clear()


def per_layer_algorithm_table(net, images, algorithms=ALGORITHMS, repeats=5, progress=False):
    """Time of every conv layer of ``net`` under each algorithm, on that layer's real input.

    One row per conv layer: Layer, Input (CxHxW), Output, Kernel, Stride, Padding, one
    "<algorithm> (ms)" column per algorithm (median of ``repeats`` after a warm-up; NaN where the
    algorithm cannot run that layer without falling back), Fastest, and Auto (what ``auto`` picks).
    """
    import pandas as pd

    from .timing import median_time

    algorithms = _check_algorithms(algorithms)
    x = _images(net, images)
    convs = {id(layer) for _, layer in _conv_layers(net)}
    names = getattr(net, "names", None) or [f"layer{i}" for i in range(len(net.layers))]
    work = [(name, layer) for name, layer in zip(names, net.layers, strict=True) if id(layer) in convs]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(work) * len(algorithms), desc="conv layers", unit="run")
    rows = []
    try:
        for name, layer in zip(names, net.layers, strict=True):
            if id(layer) in convs:
                w = layer.weight.data
                b = layer.bias.data if layer.bias is not None else np.zeros(w.shape[0], np.float32)
                stride, padding = layer.stride, layer.padding
                row = {"Layer": name, "Input": "x".join(map(str, x.shape[1:])),
                       "Output": "x".join(map(str, layer.output_shape(x.shape[1:]))),
                       "Kernel": f"{w.shape[2]}x{w.shape[3]}", "Stride": stride, "Padding": padding}
                for algorithm in algorithms:
                    seconds = np.nan
                    why = ineligibility(algorithm, w.shape, stride, padding, layer.dilation, layer.groups)
                    if why is None:
                        args = (x, w, b, stride, padding, algorithm, {}, None, False, layer.dilation,
                                layer.groups)
                        seconds = median_time(lambda args=args: conv2d_forward(*args), repeats)
                    row[f"{algorithm} (ms)"] = seconds * 1e3
                    if bar is not None:
                        bar.update(1)
                timed = {a: row[f"{a} (ms)"] for a in algorithms if np.isfinite(row[f"{a} (ms)"])}
                row["Fastest"] = min(timed, key=timed.get)
                auto_state: dict = {}
                conv2d_forward(x, w, b, stride, padding, "auto", auto_state, dilation=layer.dilation,
                               groups=layer.groups)
                row["Auto"] = auto_state["used"]
                rows.append(row)
            x = layer.forward(x)
    finally:
        if bar is not None:
            bar.close()
    return pd.DataFrame(rows)
