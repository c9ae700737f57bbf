"""The modules the first round of ``tools/mutate_python.py`` left for later (issue 19): the bounded JSON
reader, the CLI functions that build what the commands report, and the safetensors reader/writer of
``io.py``. Same runner, same options; this file only adds modules and their justified equivalents:

    python tools/mutate_python_extra.py jsonutil
    python tools/mutate_python_extra.py cli
    python tools/mutate_python_extra.py io
    python tools/mutate_python_extra.py datasets

Run it with ``MICROCNN_MUTATION_DIR`` and ``NUMBA_CACHE_DIR`` of its own while another mutation run is
going: the runner's default working copy is shared. Results: docs/mutation-python.md (sections
"Second part" and "datasets.py").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mutate_python as runner  # noqa: E402


def _all_but(path: str, keep: set) -> tuple:
    """Skip list (for MODULES) that leaves only the top-level functions and classes in ``keep``: every
    other one, and the module level, is skipped."""
    import ast

    tree = ast.parse((runner.ROOT / path).read_text())
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    return ("<module>", *[n for n in names if n not in keep])


# cli.py: only the functions that build what the commands report (results, precision).
_CLI_SKIPPED = _all_but("microcnn/cli.py", {"_stored_precision", "_precision_of", "_model_at_precision",
                                            "cmd_eval", "precision_list"})
# io.py, first part: the safetensors reader and writer (header checks, tiling of the data section). The
# .raw format, save_model/load_model and the architecture checks are left for a later round.
_IO_SKIPPED = _all_but("microcnn/io.py", {"write_safetensors", "_refuse_foreign", "SafetensorsFile",
                                          "read_safetensors", "_validated_entry"})

# io.py, second part: the .raw format, non-finite refusals, and the architecture / size / weight checks
# every loaded file goes through (issue 18's guards).
_IO_FILES_SKIPPED = _all_but("microcnn/io.py", {
    "_file_size", "check_finite", "_refuse_nonfinite_save", "save_raw", "load_raw", "save_model",
    "architecture_of", "_declared_parameters", "check_declared_sizes", "_default_input_shape", "_fit_input",
    "check_activation_sizes", "check_weights", "read_model_state"})

# datasets.py: the parts that carry numerics and validation -- the IDX reader/writer and header checks,
# load_dataset's cross-checks and ``samples``, the download checksum, batching and the box filter. Paths,
# mirrors, the network and the dataset tables are left for a later round (564 mutants in all).
_DATASETS_SKIPPED = _all_but("microcnn/datasets.py", {
    "_read_upto", "_IdxReader", "read_idx", "_check_items", "write_idx", "_verify_download",
    "_decode_pair", "load_dataset", "batches", "_iterate_batches", "box_weights"})

EXTRA_MODULES = {
    "jsonutil": ("microcnn/jsonutil.py", ["tests/test_jsonutil_exact.py"], (), []),
    "cli": ("microcnn/cli.py", ["tests/test_cli_results.py"], _CLI_SKIPPED, []),
    "io": ("microcnn/io.py", ["tests/test_io_exact.py", "tests/test_io.py"], _IO_SKIPPED, []),
    "io-files": ("microcnn/io.py", ["tests/test_io_exact.py", "tests/test_io.py"],
                 _IO_FILES_SKIPPED, []),
    "datasets": ("microcnn/datasets.py", ["tests/test_datasets_exact.py", "tests/test_datasets.py",
                                          "tests/test_hostile_idx.py"],
                 _DATASETS_SKIPPED, []),
}

_PARITY = ("only the parity of this value is ever used (``% 2``), and a - b has the parity of a + b "
           "(NumPy's remainder of a negative number by 2 is 0 or 1, as Python's)")
EXTRA_EQUIVALENT = {
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

runner.MODULES.update(EXTRA_MODULES)
for _name, _reasons in EXTRA_EQUIVALENT.items():
    runner.EQUIVALENT.setdefault(_name, {}).update(_reasons)

if __name__ == "__main__":
    sys.exit(runner.main())
