"""What the register micro-kernels (``gemm``'s FP32 one, ``integer``'s int16-pair one) share: the vector
width they are built for, and the LLVM IR loop that keeps their accumulators in registers.

Numba compiles loops through LLVM's vectorisers, which only keep a reduction in registers when it runs
over the innermost loop, and which on this CPU family default to 256-bit vectors. A micro-kernel that
holds a block of outputs in vector registers across a whole reduction has to be written as IR; these
helpers keep that IR short.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # llvmlite is imported where IR is built, never at import time
    from llvmlite import ir


def host_simd() -> int:
    """Vector width the micro-kernels may use: 16 32-bit lanes (AVX-512), 8 (AVX2), 0 (portable IR).

    x86 intrinsics are only emitted when Numba compiles for the host CPU (no NUMBA_CPU_NAME override).
    MICROCNN_SIMD=0|8|16 lowers the width (tests use it to exercise every path). Every width computes the
    same bits; the width only changes the machine code (see ``_cache_folder``)."""
    width = _hardware_simd()
    requested = os.environ.get("MICROCNN_SIMD", "").strip()
    if requested in ("0", "8", "16"):
        width = min(width, int(requested))
    return width


def _hardware_simd() -> int:
    from numba.core import config

    if platform.machine().lower() not in ("x86_64", "amd64") or config.CPU_NAME not in (None, "host"):
        return 0
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except Exception:  # feature detection unavailable: portable vector code
        return 0
    return 16 if features.get("avx512bw", False) else (8 if features.get("avx2", False) else 0)


def host_vnni(width: int) -> bool:
    """Whether the integer kernels may use vpdpbusd (AVX512-VNNI; at 8 lanes also AVX512VL) at ``width``.
    MICROCNN_VNNI=0 turns it off, so tests can run the AVX-512BW / AVX2 fallback on VNNI hardware."""
    if width == 0 or os.environ.get("MICROCNN_VNNI", "").strip() == "0":
        return False
    from llvmlite import binding

    try:
        features = binding.get_host_cpu_features()
    except Exception:  # feature detection unavailable: no VNNI
        return False
    return bool(features.get("avx512vnni", False) and (width == 16 or features.get("avx512vl", False)))


def host_block_pairs(width: int) -> bool:
    """Whether the FP32 blocked convolution runs two channel blocks per micro-kernel call
    (``conv_blocked.PAIR_PIXELS``). Only at 16 lanes, and not on cores that split a 512-bit FMA into two
    256-bit halves (AMD Zen 4: there the single block with 12 pixels was 15-20 % faster on the imported
    CNNs; on an Intel Xeon with two 512-bit FMA units the pairs were 19-33 % faster). MICROCNN_PAIRS=0|1
    overrides the choice (tests run both kernels on any AVX-512 machine). Either way the same bits."""
    requested = os.environ.get("MICROCNN_PAIRS", "").strip()
    if width < 16 or requested == "0":
        return False
    if requested == "1":
        return True
    from llvmlite import binding

    try:
        name = binding.get_host_cpu_name()
    except Exception:  # unknown core: the single block, which no measured core ran badly
        return False
    return name not in _HALF_WIDTH_FMA512


# Cores with AVX-512 whose 512-bit multiply-adds issue at one per cycle (two 256-bit halves, or one port);
# only znver4 was measured here, the Intel client cores are listed by their published port layout.
_HALF_WIDTH_FMA512 = frozenset({"znver4", "icelake-client", "tigerlake", "rocketlake", "cannonlake"})


def _sources_digest() -> str:
    """A digest of every kernel source file. Numba validates a cached function against its own file's
    timestamp only, so a kernel inlined from another file (softmax into the program, the GEMM into a
    convolution) would keep running stale machine code after that other file changed (seen after a
    merge: softmax off by one ulp); keying the cache folder on all kernel sources rules that out.
    (threads.py compiles nothing: editing it needs no new cache.)"""
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "threads.py"):
        with open(os.path.join(folder, name), "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()[:16]


def _cache_folder(width: int, vnni: bool = False, pairs: bool = False) -> None:
    """Point Numba's cache at a folder keyed on the kernel sources and on the SIMD width (inside
    NUMBA_CACHE_DIR if set). Numba keys cached machine code on the target CPU and its features, not on
    this width (nor on VNNI or block-pair use), so a width lowered by MICROCNN_SIMD (or MICROCNN_VNNI=0) would
    otherwise load code compiled for the full one (whose block layouts differ). Runs before any kernel
    is defined, which is when Numba picks where its cache lives. (The setting is process-wide: other
    packages' cached Numba functions land there too.)"""
    from numba.core import config

    base = config.CACHE_DIR
    if not base:  # beside the sources, as Numba does; a read-only install caches in the user's folder
        base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
        try:
            os.makedirs(base, exist_ok=True)
            writable = os.access(base, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            base = os.path.join(user_cache, "microcnn", "numba")
    suffix = f"-simd{width}{'-vnni' * vnni}{'-pairs' * pairs}"
    config.CACHE_DIR = os.path.join(base, _sources_digest() + suffix)


SIMD = host_simd()
VNNI = host_vnni(SIMD)
PAIRS = host_block_pairs(SIMD)
_cache_folder(SIMD, VNNI, PAIRS)
LANES = SIMD or 8  # 32-bit lanes per vector; the portable IR uses 8, which LLVM splits as the target needs


def splat(builder: ir.IRBuilder, value: ir.Value, vector_type: ir.VectorType) -> ir.Value:
    """A vector of ``vector_type`` with every lane set to the scalar ``value``."""
    from llvmlite import ir

    undef = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(first, undef, zeros)


def fmuladd(builder: ir.IRBuilder, vector_type: ir.VectorType) -> ir.Function:
    """llvm.fmuladd on vectors: a fused multiply-add where the target has one, as ``contract`` allows."""
    from llvmlite import ir
    from numba.core import cgutils

    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type] * 3),
                                          f"llvm.fmuladd.v{vector_type.count}f32")


def register_loop(builder: ir.IRBuilder, count: ir.Value, init: Sequence[ir.Value],
                  body: Callable[[ir.Value, list[ir.Value]], list[ir.Value]], name: str) -> list[ir.Value]:
    """Emit ``for i in range(count): values = body(i, values)`` with ``values`` (a list of IR values,
    starting as ``init``) carried in phi nodes, i.e. in registers; return the values after the loop.
    ``count`` is an i64 that may be 0."""
    from llvmlite import ir

    i64 = ir.IntType(64)
    entry = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), entry)
    current = []
    for value in init:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        current.append(phi)
    new = body(i, current)
    i_next = builder.add(i, ir.Constant(i64, 1))
    body_end = builder.block
    i.add_incoming(i_next, body_end)
    for phi, value in zip(current, new, strict=True):
        phi.add_incoming(value, body_end)
    builder.cbranch(builder.icmp_signed("<", i_next, count), loop, done)
    builder.position_at_end(done)
    finals = []
    for start, value in zip(init, new, strict=True):
        phi = builder.phi(value.type)
        phi.add_incoming(start, entry)
        phi.add_incoming(value, body_end)
        finals.append(phi)
    return finals
