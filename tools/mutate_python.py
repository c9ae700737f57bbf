"""Mutation testing of microcnn's pure-Python numeric modules (issue 19). Manual lane, never run by pytest.

    python tools/mutate_python.py params            # run every mutant of one module (see MODULES)
    python tools/mutate_python.py params --list     # list the mutants with their keys
    python tools/mutate_python.py params --show KEY # the diff of one mutant
    python tools/mutate_python.py all               # every module in turn, summary at the end
    python tools/mutate_python.py all --rerun       # only what the last run did not kill (tests added since)
    python tools/mutate_python.py all --report      # the saved results as Markdown

One table of entries, MODULES: a module (or a part of one, chosen with ``_all_but``) with the test files
run against each of its mutants, and EQUIVALENT, the mutants shown equivalent with the reason. Give a run
its own working copy and Numba cache while another mutation run is going (the default ones are shared):

    MICROCNN_MUTATION_DIR=/tmp/m1/work NUMBA_CACHE_DIR=/tmp/m1/numba python tools/mutate_python.py io-files

Each mutant is one small AST edit of the module (operator swap, comparison boundary, and/or, removed
`not` or unary minus, constant tweak 0->1, 1->0, n->n+1, True<->False, min<->max, swapped first two call
arguments, a removed statement, `return x` -> `return None`). Docstrings, annotations and the text of
error messages (f-strings, the argument of `raise`) are not mutated. A mutant is *killed* when the
module's test files fail (or time out) with it in place.

Mutants run one at a time, in one working copy of the repository (in $TMPDIR, reused between runs so
that Numba's cache stays valid: kernel files keep their path and modification time). A fork server
keeps pytest, NumPy and Numba imported: every mutant runs `pytest.main` in a fresh forked child that has
never imported microcnn, so each mutant costs its tests' run time only. NUMBA_NUM_THREADS=1.

Equivalent mutants (no input can tell them apart from the original) are listed in EQUIVALENT with the
reason; they are reported but left out of the kill ratio. docs/mutation-python.md has the results.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _all_but(path: str, keep: set) -> tuple:
    """Skip list (for MODULES) that leaves only the top-level functions and classes in ``keep``: every
    other one, and the module level, is skipped."""
    tree = ast.parse((ROOT / path).read_text())
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    return ("<module>", *[n for n in names if n not in keep])


# module -> (source file, test files (fast, exact ones first: -x stops at the first failure),
#            functions (qualified names) left out, extra pytest args)
MODULES = {
    "params": ("microcnn/quant/params.py",
               ["tests/test_quant_params_exact.py", "tests/test_quant_params.py"], (), []),
    "observers": ("microcnn/quant/observers.py",
                  ["tests/test_observers_exact.py", "tests/test_quant_observers.py"], (), []),
    "optim": ("microcnn/optim.py",
              ["tests/test_optim_exact.py", "tests/test_losses_optim.py"], (), []),
    "losses": ("microcnn/losses.py",
               ["tests/test_losses_exact.py", "tests/test_losses_optim.py"], (), []),
    "calibrate": ("microcnn/quant/calibrate.py",
                  ["tests/test_calibration_exact.py", "tests/test_quant_observers.py",
                   "tests/test_calibration_files_exact.py"], (), []),
    # Calibration.save/load's file format (quant/serialize.py's calibration part)
    "calibration-files": ("microcnn/quant/serialize.py", ["tests/test_calibration_files_exact.py"],
                          _all_but("microcnn/quant/serialize.py", {
                              "_meta", "_json", "save_calibration", "observer_state_layout",
                              "_calibration_field", "_observer_specs", "_check_observer_state",
                              "read_calibration"}), []),
    # empirical bias correction and the weighted stages it corrects (quant/quantize.py)
    # the output-chosen weight range (_closer, _output_error) and BatchNorm folding have their own files
    "bias-correction": ("microcnn/quant/quantize.py", ["tests/test_bias_correction_exact.py",
                                                       "tests/test_weight_range_choice.py",
                                                       "tests/test_quant_graph.py"],
                        ("<module>", "quantize_weight", "quantize", "check_layers", "folded_weighted",
                         "_Builder.__init__",
                         "_Builder._tensor_before", "_Builder._quantized", "_Builder._output_quant",
                         "_Builder.build"), []),
    # the network-level GPTQ test (a minute: calibrates and quantizes LeNet-5) is left out of each mutant
    "rounding": ("microcnn/quant/rounding.py",
                 ["tests/test_rounding_jobs_exact.py", "tests/test_gptq_exact.py",
                  "tests/test_quant_rounding.py"], (),
                 ["-k", "not improves_a_4bit_network"]),
    "jsonutil": ("microcnn/jsonutil.py", ["tests/test_jsonutil_exact.py"], (), []),
    # kernels/threads.py: the batch split across threads and the thread pool of the integer kernels
    "threads": ("microcnn/kernels/threads.py", ["tests/test_threads.py"], (), []),
    # network.py: only the arrays inference reuses from call to call (Workspace, run_groups)
    "workspace": ("microcnn/network.py", ["tests/test_workspace.py"],
                  _all_but("microcnn/network.py", {"Workspace", "run_groups"}), []),
    # cli.py: only the functions that build what the commands report (results, precision)
    "cli": ("microcnn/cli.py", ["tests/test_cli_results.py"],
            _all_but("microcnn/cli.py", {"_stored_precision", "_precision_of", "_model_at_precision",
                                         "cmd_eval", "precision_list"}), []),
    # io.py, first part: the safetensors reader and writer (header checks, tiling of the data section)
    "io": ("microcnn/io.py", ["tests/test_io_exact.py", "tests/test_io.py"],
           _all_but("microcnn/io.py", {"write_safetensors", "_refuse_foreign", "SafetensorsFile",
                                       "read_safetensors", "_validated_entry"}), []),
    # io.py, second part: the .raw format, non-finite refusals, and the architecture / size / weight checks
    # every loaded file goes through (issue 18's guards)
    "io-files": ("microcnn/io.py", ["tests/test_io_files_exact.py", "tests/test_io_exact.py"],
                 _all_but("microcnn/io.py", {
                     "_file_size", "check_finite", "_refuse_nonfinite_save", "save_raw", "load_raw",
                     "save_model", "architecture_of", "_declared_parameters", "check_declared_sizes",
                     "_default_input_shape", "_fit_input", "check_activation_sizes", "check_weights",
                     "read_model_state"}), []),
    # resolve.py: model specs, data directories, the sample-count limit
    # the .npz datasets and the data check are exercised through the CLI and the bench
    "resolve": ("microcnn/resolve.py", ["tests/test_npz_exact.py", "tests/test_resolve_exact.py",
                                        "tests/test_cli_info.py",
                                        "tests/test_cli_results.py", "tests/test_bench_exact.py"], (), []),
    # bench.py: the tables and the JSON report it builds (timings are stubbed by the tests)
    "bench": ("microcnn/bench.py", ["tests/test_bench_exact.py"],
              ("<module>", "startup_times", "random_images"), []),
    # datasets.py: the IDX reader/writer and header checks, load_dataset's cross-checks and ``samples``,
    # the download checksum, batching and the box filter. Paths, mirrors, the network and the dataset
    # tables are left for a later round (564 mutants in all).
    "datasets": ("microcnn/datasets.py", ["tests/test_datasets_exact.py", "tests/test_datasets.py",
                                          "tests/test_hostile_idx.py"],
                 _all_but("microcnn/datasets.py", {
                     "_read_upto", "_IdxReader", "read_idx", "_check_items", "write_idx", "_verify_download",
                     "_decode_pair", "load_dataset", "batches", "_iterate_batches", "box_weights"}), []),
}

# module -> {mutant key: why no input can tell the mutant from the original}
_DEAD_ZP_GUARD = ("the zero point of a channel with scale <= 0 is never returned: any such scale raises "
                  "InputError two lines later, and the final astype(np.int32) does the conversion")
_EVERY_LAYER_HAS_PADDING = ("the getattr default is never used: Conv2d, MaxPool2d and AvgPool2d, the only "
                            "layers that reach it, all set self.padding")
_ANNOTATION_ONLY = ("a class-level annotation without a value creates no attribute (it declares the type for "
                    "mypy); every subclass sets the value in __init__")
_ZERO_BINS = ("the histogram total also takes the bins that hold 0: they add 0 (negative counts were refused "
              "the line before)")
_PARITY = ("only the parity of this value is ever used (``% 2``), and a - b has the parity of a + b "
           "(NumPy's remainder of a negative number by 2 is 0 or 1, as Python's)")
EQUIVALENT: dict[str, dict[str, str]] = {
    "params": {
        "qparams_from_range: remove zero_point = np.where(scale > 0, zero_point, 0).astype(np.int64)":
            _DEAD_ZP_GUARD,
        "qparams_from_range: Gt->GtE in scale > 0": _DEAD_ZP_GUARD,
        "qparams_from_range: 0->1 in np.where(scale > 0, zero_point, 0)": _DEAD_ZP_GUARD,
    },
    "optim": {
        "OneCycleLR._phase: LtE->Lt in t <= self.warmup_end":
            "differs only at t == warmup_end, where the warm-up cosine at pct 1 and the annealing cosine at "
            "pct 0 both give max_lr and base_momentum (the bit-exact OneCycleLR test sees no difference at "
            "any tested boundary)",
        "OneCycleLR._phase: Gt->GtE in span > 0": "span > 0 always: pct_start < 1 is enforced, so "
                                                  "warmup_end = pct_start * total - 1 < total - 1",
        "OneCycleLR._phase: 1.0->0.0 in (t - self.warmup_end) / span if span > 0 else 1.0":
            "the else branch is unreachable: span > 0 always (see above)",
    },
    "calibrate": {
        "Calibration.range: remove bits = check_bits(bits)":
            "the observer's range() runs the same check_bits with the same message; accepted numpy integers "
            "hash and compare equal to the int, so the cache key is the same",
        "calibrate: remove raise InputError(f'method: expected one of {sorted(OBSERVERS)}, fou...":
            "make_observer raises the same InputError with the same message a few lines later, before "
            "anything is observed or returned",
        "calibrate: True->False in strict=True":
            "Sequential.names and Sequential.layers always have the same length (names are made per layer)",
        "calibrate: Gt->GtE in len(x) > samples":
            "with len(x) == samples the sorted choice of all indices is the identity: the same images",
    },
    "calibration-files": {
        "_check_observer_state: Gt->GtE in pos > 0": _ZERO_BINS,
        "_check_observer_state: Gt->GtE in neg > 0": _ZERO_BINS,
    },
    "rounding": {
        "_adaround: And->Or in job.x_quant is not None and job.x_float is not None":
            "the assert states quantize's contract (adaround is in NEEDS_DATA: both inputs are always "
            "passed); with either one None both versions raise (the mutant a TypeError a line later)",
    },
    "losses": {
        "_elementwise: remove x = np.ascontiguousarray(x, np.float64)":
            "every caller in losses.py passes a freshly computed, C-contiguous float64 array (astype, "
            "arithmetic or a kernel's output), so the call returned it unchanged",
        "binary_cross_entropy_with_logits.backward: GtE->Gt in x >= 0":
            "at x == 0 both branches give exactly 0.5: 1 / (1 + 1) and exp(0) / (1 + exp(0))",
    },
    "resolve": {
        "load_npz: False->True in allow_pickle=False":
            "the headers are checked first: images must be uint8 or float32 and labels integers, so no "
            "object array (the only kind that unpickles) reaches np.load",
        "_npz_headers: Gt->GtE in need > min(MAX_NPZ_BYTES, info.file_size)":
            "a member's size includes its .npy header (at least 64 bytes), so the data can never need "
            "exactly the member's size; MAX_NPZ_BYTES (4 GiB) is not reachable in a test",
    },
    "observers": {
        "Observer: remove min_val: float": _ANNOTATION_ONLY,
        "Observer: remove max_val: float": _ANNOTATION_ONLY,
        "EntropyObserver._range: remove threshold = min(threshold, max(abs(self.min_val), self.max_val))":
            "the returned range is clamped to [min_val, max_val] anyway: for t > M = max(|min|, max), "
            "max(-t, min_val) = min_val = max(-M, min_val) and min(t, max_val) = max_val = min(M, max_val)",
        "_quantile: Sub->Add in len(counts) - 1":
            "the clamp never binds: q <= 1 gives target = q * cum[-1] <= cum[-1] (cum[-1] is an exact "
            "integer and rounding is monotonic), so searchsorted returns at most len - 1",
        "_quantile: 0.0->1.0 in (target - below) / counts[i] if counts[i] else 0.0":
            "an empty bin is picked only for target 0 at bin 0 (any later empty bin has the same cum as the "
            "one before it); the only caller then clamps with max(lo, min_val), and min_val lies at or "
            "beyond the first non-empty bin, i.e. >= both edges[0] and edges[1]",
        "_quantile: 1->0 in len(counts) - 1":
            "the clamp never binds (see `len(counts) - 1` above): searchsorted returns at most len - 1",
        "HistogramObserver._observe: Gt->GtE in top > 0":
            "with top == 0 both set limit = 0 * (1 + 1e-6) = 0",
        "PercentileObserver._range: Lt->LtE in self.min_val < 0":
            "differs only for min_val == 0: the negative bins are then empty, so the low quantile is >= 0, "
            "and Observer.range returns min(lo, 0) = 0 either way",
        "PercentileObserver._range: 0.0->1.0 in _quantile(edges, counts, 1 - self.percentile / 100) "
        "if self.min_val...":
            "for non-negative data any lo >= 0 becomes 0 in Observer.range (min(lo, 0)); hi is unaffected",
        "PercentileObserver._range: 0->1 in self.min_val < 0":
            "as `Lt->LtE` above: for 0 <= min_val < 1 the negative bins are empty, the low quantile is >= 0 "
            "and Observer.range returns min(lo, 0) = 0",
        "MSEObserver._range: 0.0->1.0 in min(self.min_val, 0.0)":
            "lo0 changes only for min_val > 0; qparams_from_range widens every candidate range to include 0 "
            "(same grid), and Observer.range turns the positive lo it returns into 0",
        "EntropyObserver._range: 0.0->1.0 in max(-threshold, self.min_val) if signed else 0.0":
            "unsigned case only: Observer.range returns min(lo, 0) = 0 for lo = 1 as for lo = 0",
        "MSEObserver._range: 1.0->0.0 in (1.0, np.inf)":
            "the initial best alpha is always replaced: the first candidate's error is finite, hence < inf",
        "MSEObserver._range: Gt->GtE in counts > 0":
            "bins with count 0 enter the error sum with weight 0 (their centres are finite)",
        "kl_threshold: LtE->Lt in used <= levels":
            "when used == levels the loop has the single candidate i = used, and best_i starts at used: "
            "both return used",
    },
    "jsonutil": {
        "<module>: 256->257 in np.zeros(256, np.int32)":
            "the table is indexed by uint8 bytes (0..255): the extra entry is never read",
        "<module>: 20->21 in 1 << 20":
            "the chunk size of the depth scan; level, string state and backslash run carry across chunks "
            "(tests/test_jsonutil_exact.py runs chunks of 1, 2, 3, 5, 7 bytes against the whole)",
        "_depth: LtE->Lt in data.count(b'[') + data.count(b'{') <= MAX_JSON_DEPTH":
            "the shortcut only: with exactly MAX_JSON_DEPTH brackets the full scan runs and finds a depth "
            "<= MAX_JSON_DEPTH, which is accepted like the shortcut's 0",
        "_depth: 0->1 in return 0":
            "the shortcut's value is only compared with MAX_JSON_DEPTH (> 1): 0 and 1 are both accepted",
        "_depth: Add->Sub in index - last_other + np.where(last_other < 0, run, 0)": _PARITY,
        "_depth: Sub->Add in index - last_other": _PARITY,
        "_depth: Add->Sub in inside + np.cumsum(quotes)": _PARITY,
    },
    "workspace": {
        "Workspace.release: swap args of np.may_share_memory(buf, result)":
            "may_share_memory is symmetric: whether the bounds of a and b overlap",
    },
    "cli": {
        "_model_at_precision: False->True in getattr(args, 'json', False)":
            "both callers set args.json (cmd_eval from its --json flag, cmd_predict to False): the default "
            "is never used",
    },
    "io": {
        "_refuse_foreign: 9->10 in 8:9":
            "both callers pass exactly 9 bytes (the length field and the header's first byte), so "
            "first[8:10] is first[8:9]",
    },
    "bias-correction": {
        "quantize_bias: FloorDiv->Div in ACC_LIMIT // 2":
            "q is rounded to integers (np.rint) before the comparison, and no integer lies between "
            "ACC_LIMIT // 2 = 2**30 - 1 and ACC_LIMIT / 2 = 2**30 - 0.5",
        "quantize_bias: 0->1 in initial=0":
            "the maximum of |q| changes only when every q is 0 (or there is none): 1 and 0 are both far "
            "below the bound",
    },
    "io-files": {
        "_fit_input: 0->1 in (0, 0)": _EVERY_LAYER_HAS_PADDING,
        "_fit_input: 0->1 in (0, 0) #2": _EVERY_LAYER_HAS_PADDING,
        "check_weights: And->Or in arr.dtype.itemsize > 4 and arr.dtype.kind == 'f' and arr.size":
            "its callers pass tensors read from safetensors (the dtypes of io._DTYPES): entering the range "
            "check for an F16/F32, integer or bool tensor cannot refuse it, since no such value exceeds "
            "float32's largest (finite F32 values are checked just before), and an empty one has none",
        "check_weights: Gt->GtE in arr.dtype.itemsize > 4":
            "admits 4-byte tensors to the range check: finite F32 values never exceed float32's largest and "
            "I32 tensors are not floats",
        "check_weights: 4->5 in arr.dtype.itemsize > 4":
            "no float dtype a file can hold has 5 to 7 bytes: F64 (8) is still checked, F16/F32 still not",
        "check_activation_sizes: 0->1 in np.float32(0)":
            "the zero-stride view is only handed to _check_input, which every layer implements on shapes "
            "alone (ndim, channels, features, window sizes): the value is never read",
        "check_activation_sizes: 1->0 in (1, *shape)":
            "a batch of 0 instead of 1: no layer's _check_input looks at the batch axis",
        "_fit_input: 1->0 in (1, 1, 1) #2":
            "h = 0 instead of 1 for an input that is not an image: it only enters max(h, kh - 2ph, 1), which "
            "the final 1 keeps the same",
        "_fit_input: 1->0 in (1, 1, 1) #3": "as #2, for w",
        "_fit_input: 1->0 in max(h, kh - 2 * ph, 1)":
            "h >= 1 always: the guard's shapes are the default image, (1, 1, 1), or an output of a layer "
            "whose own check passed (convolution and pooling outputs are then >= 1)",
        "_fit_input: 1->0 in max(w, kw - 2 * pw, 1)": "as for h: w >= 1 always",
    },
    "datasets": {
        "_verify_download: remove out.flush()":
            "its only caller passes the buffered 'w+b' file of atomic_open, and the seek(0) that follows "
            "flushes a BufferedRandom's pending writes before moving",
        "_read_upto: Lt->LtE in len(buf) < n":
            "the extra turn reads min(_CHUNK, 0) = 0 bytes; read(0) returns b'' (raw files and GzipFile), "
            "so the loop breaks with the same buffer",
        "load_dataset: remove samples = int(samples)":
            "_check_items admits only ints and NumPy integers; a NumPy integer hashes and compares equal to "
            "the int (same cache key) and slices, min() and reshape treat it alike",
        "_verify_download: LtE->Lt in size <= expected.nbytes #2":
            "the message is built only when size != expected.nbytes, where <= and < agree",
        "_IdxReader.read: False->True in copy=False":
            "only whether the result shares memory with the local bytearray no one else holds: the values, "
            "dtype and flags (writable, C-contiguous) are the same",
    },
}

_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
          ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr, ast.BitXor: ast.BitOr, ast.MatMult: ast.Mult}
_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
        ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_NAMES = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "any": "all",
          "all": "any", "floor": "ceil", "ceil": "floor"}


# Calls whose first two arguments commute: swapping them is equivalent by construction, not generated.
# (np.clip(a, lo, hi) = min(max(a, lo), hi) is symmetric in a and lo.)
_SYMMETRIC = {"min", "max", "maximum", "minimum", "clip"}


def _callee(call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


@dataclass
class Mutant:
    key: str  # stable across line shifts: qualified name, what -> what, occurrence
    line: int
    node_index: int  # position in ast.walk order
    choice: int


def _parents(tree):
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _qualname(node, parents) -> str:
    names = []
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
    return ".".join(reversed(names)) or "<module>"


def _frozen(node, parents) -> bool:
    """True inside text that only feeds messages or annotations (not behaviour worth mutating)."""
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, ast.JoinedStr) or (isinstance(parent, ast.Raise) and child is parent.exc):
            return True
        if isinstance(parent, ast.arg) and child is parent.annotation:
            return True
        if isinstance(parent, ast.FunctionDef) and child is parent.returns:
            return True
        if isinstance(parent, ast.AnnAssign) and child is parent.annotation:
            return True
        if isinstance(parent, ast.Assert) and child is parent.msg:
            return True
        child = parent
    return False


def _is_docstring(stmt, parents) -> bool:
    parent = parents.get(stmt)
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str) and parent is not None
            and getattr(parent, "body", [None])[0] is stmt)


def _choices(node, parents) -> list:
    """Possible edits of ``node``: a list of (description, apply(node, parents) -> None)."""
    out = []
    src = ast.unparse(node) if not isinstance(node, ast.operator | ast.cmpop | ast.boolop) else ""
    if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _BINOP:
        new = _BINOP[type(node.op)]
        out.append((f"{type(node.op).__name__}->{new.__name__} in {_short(src)}",
                    lambda n, p, new=new: setattr(n, "op", new())))
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP:
                new = _CMP[type(op)]

                def swap(n, p, i=i, new=new):
                    n.ops[i] = new()
                out.append((f"{type(op).__name__}->{new.__name__} in {_short(src)}", swap))
    if isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__}->{new.__name__} in {_short(src)}",
                    lambda n, p, new=new: setattr(n, "op", new())))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub | ast.Invert):
        out.append((f"drop {type(node.op).__name__} in {_short(src)}",
                    lambda n, p: _replace(n, p, n.operand)))
    if isinstance(node, ast.Constant) and not isinstance(node.value, str | bytes) and node.value is not None:
        v = node.value
        if isinstance(v, bool):
            new_v = not v
        elif isinstance(v, int | float):
            new_v = 1 if v == 0 else 0 if v == 1 else v + 1
            new_v = type(v)(new_v)
        else:
            new_v = None
        if new_v is not None:
            out.append((f"{v!r}->{new_v!r} in {_short(ast.unparse(parents.get(node, node)))}",
                        lambda n, p, new_v=new_v: setattr(n, "value", new_v)))
    if isinstance(node, ast.Name) and node.id in _NAMES and isinstance(parents.get(node), ast.Call):
        new = _NAMES[node.id]
        out.append((f"{node.id}->{new} in {_short(ast.unparse(parents[node]))}",
                    lambda n, p, new=new: setattr(n, "id", new)))
    if isinstance(node, ast.Attribute) and node.attr in _NAMES and isinstance(parents.get(node), ast.Call):
        new = _NAMES[node.attr]
        out.append((f".{node.attr}->.{new} in {_short(ast.unparse(parents[node]))}",
                    lambda n, p, new=new: setattr(n, "attr", new)))
    if (isinstance(node, ast.Call) and len(node.args) >= 2 and _callee(node) not in _SYMMETRIC
            and not any(isinstance(a, ast.Starred) for a in node.args[:2])
            and ast.unparse(node.args[0]) != ast.unparse(node.args[1])):
        out.append((f"swap args of {_short(src)}",
                    lambda n, p: n.args.__setitem__(slice(0, 2), [n.args[1], n.args[0]])))
    in_function = _qualname(node, parents) != "<module>"
    if in_function and isinstance(node, ast.Return) and node.value is not None \
            and not (isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append((f"return None instead of {_short(src)}",
                    lambda n, p: setattr(n, "value", ast.Constant(None))))
    removable = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Raise, ast.Continue, ast.Break)
    if in_function and isinstance(node, removable) and not _is_docstring(node, parents):
        out.append((f"remove {_short(src)}", lambda n, p: _replace(n, p, ast.Pass())))
    return out


def _short(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _replace(node, parents, new):
    parent = parents[node]
    for field, value in ast.iter_fields(parent):
        if value is node:
            setattr(parent, field, new)
            return
        if isinstance(value, list) and any(v is node for v in value):
            value[[i for i, v in enumerate(value) if v is node][0]] = new
            return
    raise AssertionError("node not found in its parent")


def enumerate_mutants(source: str, skip: tuple = ()) -> list[Mutant]:
    tree = ast.parse(source)
    parents = _parents(tree)
    mutants, seen = [], {}
    for index, node in enumerate(ast.walk(tree)):
        if _frozen(node, parents) or _is_docstring(parents.get(node, node), parents):
            continue
        qual = _qualname(node, parents)
        if any(qual == s or qual.startswith(s + ".") for s in skip):
            continue
        for choice, (desc, _) in enumerate(_choices(node, parents)):
            base = f"{qual}: {desc}"
            seen[base] = seen.get(base, 0) + 1
            key = base if seen[base] == 1 else f"{base} #{seen[base]}"
            mutants.append(Mutant(key, getattr(node, "lineno", 0), index, choice))
    return mutants


def mutate(source: str, mutant: Mutant) -> str:
    tree = ast.parse(source)
    nodes = list(ast.walk(tree))
    parents = _parents(tree)
    node = nodes[mutant.node_index]
    _choices(node, parents)[mutant.choice][1](node, parents)
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


# -- running ------------------------------------------------------------------------------------------
def _workdir() -> Path:
    work = Path(os.environ.get("MICROCNN_MUTATION_DIR", Path(tempfile.gettempdir()) / "microcnn-mutation"))
    for part in ("microcnn", "tests", "data"):
        for src in (ROOT / part).rglob("*"):
            if "__pycache__" in src.parts or src.is_dir():
                continue
            dst = work / src.relative_to(ROOT)
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)  # keeps the mtime: Numba's cache index stays valid
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, work / name)
    for pyc in work.rglob("*.pyc"):
        pyc.unlink()
    return work


def _run_tests(work: Path, tests: list[str], extra: list[str], timeout: float) -> tuple[str, float]:
    """'survived' | 'killed' | 'timeout', and the seconds it took, in a forked child."""
    import pytest

    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: fresh import of microcnn from the working copy
        try:
            os.chdir(work)
            sys.path.insert(0, str(work))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            # A failing Hypothesis test would shrink its example for many seconds: a mutant is killed
            # by the first failure, the smallest example is not needed.
            import hypothesis

            hypothesis.settings.register_profile("mutation", phases=[hypothesis.Phase.explicit,
                                                 hypothesis.Phase.reuse, hypothesis.Phase.generate])
            hypothesis.settings.load_profile("mutation")
            rc = pytest.main([*tests, "-x", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                              "-p", "no:nbval", "--hypothesis-seed=0", *extra])
            os._exit(int(rc))
        except BaseException:
            os._exit(99)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        elapsed = time.perf_counter() - start
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code not in (0, 1):  # 2-5: interrupted, internal or usage error, nothing collected
                return f"error {code}", elapsed
            return ("survived" if code == 0 else "killed"), elapsed
        if elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", elapsed
        time.sleep(0.02)


def run_module(name: str, out_dir: Path, rerun: bool = False) -> dict:
    path, tests, skip, extra = MODULES[name]
    work = _workdir()
    target = work / path
    original = (ROOT / path).read_text()
    mutants = enumerate_mutants(original, skip)
    # --rerun: tests were only added since the last run, so a killed mutant stays killed; run the others
    previous = {}
    if rerun and (out_dir / f"{name}.json").exists():
        previous = {m["key"]: m for m in json.loads((out_dir / f"{name}.json").read_text())["mutants"]
                    if m["status"] in ("killed", "timeout")}
    tests = [t for t in tests if (ROOT / t).exists()]
    equivalent = EQUIVALENT.get(name, {})
    unknown = set(equivalent) - {m.key for m in mutants}
    if unknown:
        print(f"warning: EQUIVALENT keys that match no mutant: {sorted(unknown)}", file=sys.stderr)
    results = {"module": path, "tests": tests, "mutants": []}
    try:
        target.write_text(ast.unparse(ast.parse(original)) + "\n")  # the baseline, formatted as mutants are
        status, baseline = _run_tests(work, tests, extra, timeout=1800)
        if status != "survived":
            raise SystemExit(f"{name}: the tests fail on the unmutated module ({status}); fix that first")
        if baseline > 30:  # likely Numba compiling into an empty cache: the timeout follows a warm run
            status, baseline = _run_tests(work, tests, extra, timeout=1800)
        timeout = max(15.0, 3 * baseline)
        print(f"{name}: {len(mutants)} mutants, tests {' '.join(tests)}, baseline {baseline:.1f} s, "
              f"timeout {timeout:.0f} s", flush=True)
        start = time.perf_counter()
        for i, m in enumerate(mutants, 1):
            if m.key in previous:
                results["mutants"].append(previous[m.key] | {"line": m.line, "rerun": False})
                continue
            target.write_text(mutate(original, m))
            status, seconds = _run_tests(work, tests, extra, timeout)
            if m.key in equivalent:
                status = f"equivalent ({status})"
            results["mutants"].append({"key": m.key, "line": m.line, "status": status,
                                       "seconds": round(seconds, 2)})
            if i % 25 == 0:
                print(f"  [{i}/{len(mutants)}] {time.perf_counter() - start:.0f} s", flush=True)
            if not status.startswith("killed"):
                print(f"  [{i}/{len(mutants)}] line {m.line}: {status}: {m.key}", flush=True)
        results["seconds"] = round(time.perf_counter() - start, 1)
        results["baseline_seconds"] = round(baseline, 2)
    finally:
        shutil.copy2(ROOT / path, target)
    summary = summarize(results)
    results["summary"] = summary
    print(f"{name}: {summary}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    return results


def summarize(results: dict) -> dict:
    statuses = [m["status"] for m in results["mutants"]]
    equivalent = sum(s.startswith("equivalent") for s in statuses)
    killed = sum(s in ("killed", "timeout") for s in statuses)
    survived = sum(s == "survived" for s in statuses)
    errors = sum(s.startswith("error") for s in statuses)
    counted = len(statuses) - equivalent
    return {"mutants": len(statuses), "killed": killed, "survived": survived, "errors": errors,
            "equivalent": equivalent, "kill_ratio": round(killed / counted, 4) if counted else 1.0}


def report(names: list[str], out_dir: Path) -> str:
    """Markdown: per-module counts, then every equivalent and surviving mutant."""
    lines = ["| module | mutants | killed | survived | equivalent | kill ratio | mutation run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    details = []
    for name in names:
        path = out_dir / f"{name}.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        for m in results["mutants"]:  # equivalences justified after the run count too
            if m["key"] in EQUIVALENT.get(name, {}) and not m["status"].startswith("equivalent"):
                m["status"] = f"equivalent ({m['status']})"
        s = summarize(results)
        ratio, seconds = f"{100 * s['kill_ratio']:.1f} %", f"{results.get('seconds', 0):.0f} s"
        lines.append(f"| `{results['module']}` | {s['mutants']} | {s['killed']} | {s['survived']} | "
                     f"{s['equivalent']} | {ratio} | {seconds} |")
        for m in results["mutants"]:
            if m["status"].startswith("equivalent"):
                details.append(f"- {name} (line {m['line']}) `{m['key']}`: equivalent -- "
                               f"{EQUIVALENT[name][m['key']]}")
            elif m["status"] not in ("killed", "timeout"):
                details.append(f"- {name} (line {m['line']}) `{m['key']}`: **{m['status']}**")
    return "\n".join(lines + [""] + details)


def _preimport_third_party(paths: list[str]) -> None:
    """Import, once in this process, every third-party package the modules and pytest load: each forked
    child inherits them and imports only microcnn and the tests (pandas alone takes a second)."""
    import importlib
    import subprocess

    modules = [p.removesuffix(".py").replace("/", ".") for p in paths]
    probe = (f"import sys, pytest, hypothesis, {', '.join(modules)}; "
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    names = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in names:
        if name not in ("microcnn", "tests", "__main__") and not name.startswith("_"):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional import failing only costs time
                pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("module", choices=[*MODULES, "all"])
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--show", metavar="KEY", help="print the diff of one mutant and stop")
    parser.add_argument("--rerun", action="store_true",
                        help="run only the mutants not killed in the previous results (tests only added)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "microcnn-mutation-results")
    parser.add_argument("--report", action="store_true", help="print the saved results as Markdown and stop")
    args = parser.parse_args(argv)
    names = list(MODULES) if args.module == "all" else [args.module]
    if args.report:
        print(report(names, args.out))
        return 0
    if args.list or args.show:
        for name in names:
            path, _, skip, _ = MODULES[name]
            source = (ROOT / path).read_text()
            for m in enumerate_mutants(source, skip):
                if args.list:
                    print(f"{name}:{m.line}: {m.key}")
                elif m.key == args.show:
                    base = ast.unparse(ast.parse(source)).splitlines()
                    print("\n".join(difflib.unified_diff(base, mutate(source, m).splitlines(), lineterm="")))
        return 0
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "microcnn-mutation-numba"))
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True
    _preimport_third_party([MODULES[name][0] for name in names])

    summaries = {name: run_module(name, args.out, args.rerun)["summary"] for name in names}
    for name, s in summaries.items():
        print(f"{name:10s} {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
