"""Fuzzing the IDX reader: whatever the bytes, it returns an array or raises FileFormatError, quickly.

Run with ``pytest -s`` to see how many inputs each test tried and how they ended.
"""

from __future__ import annotations

import gzip
import struct
import time
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microcnn.datasets import read_idx
from microcnn.errors import FileFormatError

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MAX_SECONDS_PER_INPUT = 2.0
_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def _valid_idx(code: int, shape: tuple[int, ...], seed: int) -> bytes:
    """A well-formed IDX file built from the format description, independent of write_idx."""
    payload = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * _ITEMSIZE[code], np.uint8)
    return bytes((0, 0, code, len(shape))) + struct.pack(f">{len(shape)}I", *shape) + payload.tobytes()


class _Outcomes:
    """Feeds bytes to read_idx and tallies what happened; any other exception fails the test."""

    def __init__(self, path):
        self.path = path
        self.counts: Counter[str] = Counter()
        self.slowest = 0.0

    def parse(self, data: bytes, compress: bool):
        self.path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
        start = time.perf_counter()
        try:
            result = read_idx(self.path)
        except FileFormatError as err:
            assert str(self.path) in str(err)
            self.counts["FileFormatError"] += 1
            result = None
        else:
            assert isinstance(result, np.ndarray) and result.dtype.isnative
            self.counts["array"] += 1
        self.slowest = max(self.slowest, time.perf_counter() - start)
        return result

    def report(self, label: str, minimum: int) -> None:
        total = sum(self.counts.values())
        print(f"\n{label}: {total} inputs tried, {dict(self.counts)}, slowest {self.slowest * 1e3:.1f} ms")
        assert total >= minimum
        assert self.slowest < MAX_SECONDS_PER_INPUT


def test_random_bytes(tmp_path):
    outcomes = _Outcomes(tmp_path / "random.idx")

    @FUZZ
    @given(data=st.binary(max_size=200), compress=st.booleans())
    def run(data, compress):
        outcomes.parse(data, compress)

    run()
    outcomes.report("random bytes", minimum=100)


def test_random_bytes_behind_a_plausible_header(tmp_path):
    # Pure random bytes almost never pass the magic check; this drives the parser into the dims and
    # data checks, including declared sizes far beyond what follows.
    outcomes = _Outcomes(tmp_path / "header.idx")

    @FUZZ
    @given(
        code=st.sampled_from(sorted(_ITEMSIZE)),
        dims=st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)), min_size=1, max_size=5),
        tail=st.binary(max_size=300),
        compress=st.booleans(),
    )
    def run(code, dims, tail, compress):
        data = bytes((0, 0, code, len(dims))) + struct.pack(f">{len(dims)}I", *dims) + tail
        result = outcomes.parse(data, compress)
        if result is not None:
            # An accepted file is exactly header + declared data, and the data is what was stored.
            assert result.shape == tuple(dims) and result.nbytes == len(tail)
            assert result.astype(result.dtype.newbyteorder(">")).tobytes() == tail

    run()
    outcomes.report("plausible header + random tail", minimum=100)
    assert outcomes.counts["array"] > 0 and outcomes.counts["FileFormatError"] > 0


def test_truncation_at_every_header_boundary(tmp_path):
    outcomes = _Outcomes(tmp_path / "cut.idx")
    for code in sorted(_ITEMSIZE):
        for shape in [(3,), (2, 3, 4)]:
            valid = _valid_idx(code, shape, seed=code)
            header_len = 4 + 4 * len(shape)
            cuts = set(range(0, header_len + 1)) | {len(valid) - 1}
            for compress in (False, True):
                assert outcomes.parse(valid, compress).shape == shape
                for cut in sorted(cuts):
                    assert outcomes.parse(valid[:cut], compress) is None, (code, shape, cut)
    outcomes.report("truncated files", minimum=300)
    assert outcomes.counts["array"] == 6 * 2 * 2


def test_mutated_valid_files(tmp_path):
    outcomes = _Outcomes(tmp_path / "mutated.idx")

    @FUZZ
    @given(
        code=st.sampled_from(sorted(_ITEMSIZE)),
        shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
        flips=st.lists(st.tuples(st.integers(0, 63), st.integers(1, 255)), min_size=1, max_size=3),
        extra=st.binary(max_size=8),
        compress=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def run(code, shape, flips, extra, compress, seed):
        valid = _valid_idx(code, shape, seed)
        header_len = 4 + 4 * len(shape)
        mutated = bytearray(valid)
        for position, mask in flips:
            # Mostly header bytes; positions past the header land in the data.
            mutated[position % len(mutated)] ^= mask
        mutated = bytes(mutated) + extra
        result = outcomes.parse(mutated, compress)
        if mutated[:header_len] == valid[:header_len]:
            # Only data bytes changed: accepted exactly when nothing was appended.
            assert (result is not None) == (extra == b"")

    run()
    outcomes.report("mutated valid files", minimum=100)
