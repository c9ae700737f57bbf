"""The precision vocabulary: one name per (weight bits, activation bits) pair, used by the command line,
the benchmarks, the comparison with other systems and the analysis tables.

Names: ``fp32``; ``int8`` (= ``w8a8``); ``w4a8``; ``int4`` (= ``w4a4``, 4-bit weights *and*
activations, as in the reference tool). Any other pair is spelled ``wXaY`` (``w8a4``). Names are
case-insensitive. Nothing here imports more than the standard library until a model is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # annotations only
    from ..graph import Graph
    from ..network import Sequential
    from .calibrate import Calibration
    from .qgraph import QuantizedGraph
    from .qnetwork import QuantizedSequential

FLOAT_BITS = 32


@dataclass(frozen=True)
class Precision:
    """What a model computes in: ``weight_bits``-bit weights and ``act_bits``-bit activations.

    Args:
        name: the canonical lower-case name (``"int8"``, ``"w4a8"``, ``"w8a4"``, ``"fp32"``).
        weight_bits, act_bits: bit widths; 32 and 32 mean FP32 (nothing quantized).
        aliases: other accepted spellings.

    Example::

        >>> parse_precision("W4A4")
        Precision(name='int4', weight_bits=4, act_bits=4, aliases=('w4a4',))
        >>> parse_precision("int4").label
        'W4A4'
    """

    name: str
    weight_bits: int
    act_bits: int
    aliases: tuple[str, ...] = ()

    @property
    def is_float(self) -> bool:
        """True for FP32 (nothing quantized)."""
        return self.weight_bits == FLOAT_BITS and self.act_bits == FLOAT_BITS

    @property
    def label(self) -> str:
        """Table label: ``FP32``, ``INT8``, else ``W{w}A{a}`` (``W4A4`` for ``int4``: no ambiguity)."""
        if self.is_float or self.name == "int8":
            return self.name.upper()
        return f"W{self.weight_bits}A{self.act_bits}"


FP32 = Precision("fp32", FLOAT_BITS, FLOAT_BITS)
# The named precisions, in table order; the command line offers exactly these.
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    FP32,
    Precision("int8", 8, 8, aliases=("w8a8",)),
    Precision("w4a8", 4, 8),
    Precision("int4", 4, 4, aliases=("w4a4",)),
)}
QUANTIZED_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if not p.is_float)
_BY_BITS = {(p.weight_bits, p.act_bits): p for p in PRECISIONS.values()}
_WXAY = re.compile(r"w(\d{1,3})a(\d{1,3})")


def precision_of_bits(weight_bits: int, act_bits: int) -> Precision:
    """The precision of a bit-width pair: a named one (``(4, 4)`` is ``int4``) or ``wXaY``.

    Example::

        >>> precision_of_bits(4, 4).name, precision_of_bits(8, 4).name
        ('int4', 'w8a4')
    """
    found = _BY_BITS.get((weight_bits, act_bits))
    return found if found is not None else Precision(f"w{weight_bits}a{act_bits}", weight_bits, act_bits)


def parse_precision(text: str) -> Precision:
    """A precision from its name, an alias or a ``wXaY`` spelling (case and surrounding blanks ignored).

    Raises:
        InputError: for anything else (the message lists the names).

    Example::

        >>> parse_precision(" INT8 ").name, parse_precision("w4a8").label
        ('int8', 'W4A8')
    """
    from .params import MAX_BITS, MIN_BITS  # (numpy: loaded only when a precision is parsed)

    key = str(text).strip().lower()
    for p in PRECISIONS.values():
        if key == p.name or key in p.aliases:
            return p
    match = _WXAY.fullmatch(key)
    if match:
        bits = int(match[1]), int(match[2])
        for b, what in zip(bits, ("weight", "activation"), strict=True):
            if not MIN_BITS <= b <= MAX_BITS:
                raise InputError(f"precision {text!r}: {what} bits outside {MIN_BITS}..{MAX_BITS} "
                                 f"(found {b})")
        return precision_of_bits(*bits)
    raise InputError(f"precision: expected one of {', '.join(PRECISIONS)} or wXaY (X, Y in "
                     f"{MIN_BITS}..{MAX_BITS}), found {text!r}")


def parse_precision_list(text: str) -> tuple[list[Precision], list[str]]:
    """The precisions of a comma-separated list (blank parts skipped, order and repeats kept), and the
    parts ``parse_precision`` refuses.

    Example::

        >>> [p.name for p in parse_precision_list("int8, w4a4,,w2a4")[0]], parse_precision_list("fp16")[1]
        (['int8', 'int4', 'w2a4'], ['fp16'])
    """
    found, unknown = [], []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        try:
            found.append(parse_precision(part))
        except InputError:
            unknown.append(part)
    return found, unknown


def stored_precision(model: Any) -> Precision | None:
    """The precision a quantized model (read from a file or built here) computes in, from its own
    ``settings``; None for a model that computes in FP32 (plain or storage-compressed)."""
    settings = getattr(model, "settings", None)
    if not settings:
        return None
    return precision_of_bits(settings.get("weight_bits"), settings.get("act_bits"))


def precision_of(model: Any) -> Precision:
    """What ``model`` computes in, read from the model itself (never from how it was asked for)."""
    return stored_precision(model) or FP32


def build_precision(net: Sequential | Graph, precision: str | Precision,
                    calibration: Calibration | None = None,
                    **options: Any) -> Sequential | Graph | QuantizedSequential | QuantizedGraph:
    """The model that runs ``precision``: the FP32 ``net`` itself, or a copy quantized with
    ``calibration`` (a ``microcnn.quant.Calibration``) at the precision's bit widths (``options``: the
    other arguments of ``quantize``, e.g. ``rounding="adaround"``).

    Args:
        net: the FP32 network.
        precision: a name of ``PRECISIONS`` or a ``Precision``.
        calibration: activation ranges of ``net`` (``microcnn.quant.calibrate``); needed unless FP32.

    Returns:
        ``net`` itself for FP32, else a ``QuantizedSequential`` (``QuantizedGraph`` for a Graph).

    Example::

        >>> import numpy as np
        >>> from microcnn import lenet
        >>> from microcnn.quant import calibrate
        >>> net = lenet(weights="bundled")
        >>> images = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
        >>> int4 = build_precision(net, "int4", calibrate(net, images, progress=False))
        >>> precision_of(int4).label, build_precision(net, "fp32") is net
        ('W4A4', True)
    """
    if isinstance(precision, str):
        precision = parse_precision(precision)
    if precision.is_float:
        return net
    if calibration is None:
        raise InputError(f"precision {precision.name}: expected a calibration (microcnn.quant.calibrate), "
                         "found None")
    from .quantize import quantize

    return quantize(net, calibration, weight_bits=precision.weight_bits, act_bits=precision.act_bits,
                    **options)
