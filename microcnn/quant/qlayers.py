"""Quantized layers ("stages") of a QuantizedSequential. Each stage maps its input domain (float32, or
an activation in a uint8 container described by an ``ActQuant``) to its output domain and says which
layers of the FP32 network it implements, so traces line up with the original layer names.

Stages store exactly the arrays in ``tensors()``; that is what ``nbytes`` counts and what the model file
holds. Everything else (requantization multipliers, clamp bounds) is derived on construction.
"""

from __future__ import annotations

import numpy as np

from ..checks import int_pair
from ..errors import InputError
from ..graph import Add, Concat
from ..kernels import integer as ki
from ..kernels import pool, program
from ..kernels.elementwise import all_finite
from ..kernels.packing import pack_bits, unpack_bits
from ..kernels.shapes import conv_output_size
from ..layers import MaxPool2d, layer_from_config
from .params import ActQuant, check_bits, fixed_point_multiplier, qrange

REQUANT_MODES = {"fixedpoint": ki.MODE_FIXEDPOINT, "float": ki.MODE_FLOAT}
ACC_LIMIT = 2**31 - 1
ADD_FRACTION_BITS = 16  # fractional bits QAdd keeps of each rescaled input before its final rounding


class Stage:
    """One step of a ``QuantizedSequential``: runs one or several fused FP32 layers (``layers``) on
    integer or real input, with the output quantization ``out_act`` (None: real-valued output)."""

    kind = "stage"
    stores_act = False  # whether out_act is stored by this stage (else inherited from the input)

    def __init__(self, layers: tuple = (), in_act: ActQuant | None = None, out_act: ActQuant | None = None):
        self.layers = tuple(int(i) for i in layers)
        self.in_act = in_act
        self.out_act = out_act

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def program_ops(self, chw: tuple, keep: list):
        """(rows of ``kernels.program``, output (C, H, W)) for inputs of sample shape ``chw``, or None
        when the stage has no ops there. Arrays the rows point at that the stage does not hold go to
        ``keep``, which must outlive the rows."""
        return None

    def tensors(self) -> dict:
        """Arrays this stage stores, by short name."""
        if self.stores_act and self.out_act is not None:
            return _act_tensors(self.out_act)
        return {}

    def spec(self) -> dict:
        """JSON description (everything but the arrays)."""
        return {"kind": self.kind, "layers": list(self.layers)}

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors().values())

    @property
    def kernel_nbytes(self) -> int:
        """Bytes of the arrays derived on construction for the kernels (not stored, not in ``nbytes``)."""
        return 0

    @property
    def precision(self) -> str:
        return "-"

    @property
    def input_acts(self) -> tuple:
        """The quantization of each input (None: a real-valued input)."""
        return (self.in_act,)

    def dequantize(self, y: np.ndarray) -> np.ndarray:
        """This stage's output as float32 real values."""
        if self.out_act is None:
            return y
        return ki.dequantize_u8(y.reshape(-1), self.out_act.scale, self.out_act.zero_point).reshape(y.shape)


def _act_tensors(act: ActQuant) -> dict:
    return {"out_scale": np.array([act.scale], np.float32),
            "out_zero_point": np.array([act.zero_point], np.uint8)}


def refuse_nonfinite(x: np.ndarray) -> None:
    """NaN/Inf cannot be quantized: rounding would clamp them to a code and the network would answer
    with confidence. The FP32 network propagates them (and ``predict`` refuses); every precision
    refuses rather than answer. Raised at each float -> integer boundary, so an FP32 layer of a mixed
    network that overflows is caught too."""
    bad = ~np.isfinite(x.reshape(len(x), -1))
    first = int(np.flatnonzero(bad.any(axis=1))[0])
    raise InputError(f"images: expected finite float32 values, found {int(bad.sum())} NaN/Inf entering a "
                     f"quantized layer (first in image {first}); integer codes cannot represent them")


def refuse_nonfinite_input(x) -> None:
    """NaN/Inf input gets no answer at any precision. Checked at the input because an FP32 first layer
    of a mixed network can hide it (ReLU and max pooling drop NaN); each quantize stage checks again
    for values that overflow inside the network."""
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        return
    if not (all_finite(x.reshape(-1)) if x.dtype == np.float32 else np.isfinite(x).all()):
        refuse_nonfinite(x)


def run_if_compiled(prog, x, stages: list, max_batch: int):
    """The output of the compiled program ``prog`` (stages, sample shape, output shape, op table, kept
    arrays) of a quantized network on ``x``, or None when it does not apply: no program, a program built
    for other stages or another sample shape, or not a small batch (1 .. max_batch - 1) of a C-contiguous,
    writeable float32 array (read-only arrays take the stage path: one compiled program serves one type)."""
    if not (prog is not None and type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 4
            and x.shape[1:] == prog[1] and 0 < x.shape[0] < max_batch and x.flags.c_contiguous
            and x.flags.writeable and prog[0] == stages):
        return None
    refuse_nonfinite_input(x)
    return program.run_program(x, prog[3]).reshape(x.shape[0], *prog[2])


class _StoredAct(Stage):
    """A stage that stores its output quantization and has no weights: its precision is A<bits>."""

    stores_act = True

    def spec(self):
        return {**super().spec(), "bits": self.out_act.bits}

    @property
    def precision(self):
        return f"A{self.out_act.bits}"


class QuantizeStage(_StoredAct):
    """float32 -> uint8 at the network input (or after an FP32 layer)."""

    kind = "quantize"

    def __init__(self, act: ActQuant):
        super().__init__((), None, act)

    def run(self, x):
        a = self.out_act
        refuse_nonfinite_input(x)
        return ki.quantize_u8(x.reshape(-1), a.scale, a.zero_point, a.qmax).reshape(x.shape)

    def program_ops(self, chw, keep):
        a = self.out_act
        scale = np.array([a.scale], np.float32)  # what quantize_u8 rounds the float scale to
        keep.append(scale)
        row = program.integer_row(program.OP_QUANTIZE, scale=scale, zero_point=a.zero_point, qmax=a.qmax)
        return [row], chw


class DequantizeStage(Stage):
    """uint8 -> float32 before an FP32 layer (or at the end of a network that ends on integers)."""

    kind = "dequantize"

    def __init__(self, act: ActQuant):
        super().__init__((), act, None)

    def run(self, x):
        a = self.in_act
        return ki.dequantize_u8(x.reshape(-1), a.scale, a.zero_point).reshape(x.shape)

    def program_ops(self, chw, keep):
        scale = np.array([self.in_act.scale], np.float32)
        keep.append(scale)
        return [program.integer_row(program.OP_DEQUANTIZE, scale=scale, zero_point=self.in_act.zero_point)], \
            chw


class QWeighted(Stage):
    """Shared part of QConv2d and QLinear: integer weights, per-channel scales, int32 bias, the fused
    ReLU clamp and the requantization parameters. ``out_act`` None means float output (logits)."""

    stores_act = True
    in_act: ActQuant  # never None here: the weighted stages read integer input

    def __init__(self, layers, weight_q: np.ndarray, weight_bits: int, weight_scale, bias_q, in_act: ActQuant,
                 out_act: ActQuant | None, relu: bool, requant: str = "fixedpoint", weight_zero_point=None):
        super().__init__(layers, in_act, out_act)
        weight_bits = check_bits(weight_bits, "weight bits")
        for what, act in (("input", in_act), ("output", out_act)):
            if act is not None:
                check_bits(act.bits, f"{what} activation bits")
        if requant not in REQUANT_MODES:
            raise InputError(f"requant: expected one of {sorted(REQUANT_MODES)}, found {requant!r}")
        weight_q = np.asarray(weight_q)
        lo_w, hi_w = qrange(weight_bits, signed=True)
        if weight_q.size and (weight_q.min() < lo_w or weight_q.max() > hi_w):
            raise InputError(f"weights: {weight_bits}-bit values must lie in {lo_w}..{hi_w}")
        self.weight_shape = tuple(weight_q.shape)
        self.weight_bits = weight_bits
        codes = np.ascontiguousarray(weight_q, np.int8).reshape(-1)
        self.weight_bytes = pack_bits(codes, weight_bits)  # what is stored: the codes at their bit width
        self.weight_zero_point = self._zero_point(weight_zero_point, lo_w, hi_w)
        # The kernels take one int8 code per weight (zero point 0): real = scale * (q - zp), so the
        # centred codes q - zp are what they multiply; unpacked once here, not per call.
        centred = codes.reshape(self.weight_shape[0], -1).astype(np.int16) - self.weight_zero_point[:, None]
        self.weight_codes = np.ascontiguousarray(centred.reshape(-1), np.int8)
        # Largest |centred code| the grid allows: 2**(b-1) symmetric, 2**b - 1 asymmetric.
        self.code_limit = (1 << (weight_bits - 1)) if self.symmetric else (1 << weight_bits) - 1
        self.weight_scale = np.ascontiguousarray(weight_scale, np.float32)
        self.bias_q = np.ascontiguousarray(bias_q, np.int32)
        self.relu = bool(relu)
        self.requant = requant
        n_out = self.weight_shape[0]
        if self.weight_scale.shape not in ((n_out,), (1,)) or self.bias_q.shape != (n_out,):
            raise InputError(f"weight_scale and bias: expected shapes ({n_out},) or (1,), and ({n_out},), "
                             f"found {self.weight_scale.shape} and {self.bias_q.shape}")
        if not (np.isfinite(self.weight_scale).all() and (self.weight_scale > 0).all()):
            raise InputError("weight_scale: expected positive finite scales")
        worst = self._check_accumulator()
        channel_scale = np.broadcast_to(self.weight_scale, (n_out,)).astype(np.float64)  # per tensor: (1,)
        acc_scale = np.float64(in_act.scale) * channel_scale
        with np.errstate(over="ignore"):
            self.acc_scale = acc_scale.astype(np.float32)  # real value of one accumulator unit, per channel
            # float32(acc) * acc_scale is monotonic in |acc|: finite at the worst case, finite everywhere
            largest = np.float32(worst) * self.acc_scale
        if not np.isfinite(largest).all():
            raise InputError(f"layer {self.layers}: scales overflow float32: worst-case accumulator {worst} "
                             f"x accumulator scale {acc_scale.max():g} (input scale {in_act.scale:g} x "
                             f"weight scale {channel_scale.max():g}) exceeds {np.finfo(np.float32).max:g}")
        if out_act is None:
            # Real-valued output straight from the accumulators; the ReLU clamps them at 0.
            self.mode = ki.MODE_DEQUANT
            self.fmult = self.acc_scale
            self.m0 = np.zeros(n_out, np.int32)
            self.shift = np.ones(n_out, np.int32)
            self.zp, self.lo, self.hi = 0, (0 if relu else -ACC_LIMIT - 1), ACC_LIMIT
        else:
            mult = acc_scale / out_act.scale
            self.mode = REQUANT_MODES[requant]
            self.m0, self.shift = fixed_point_multiplier(mult)
            self.fmult = mult.astype(np.float32)
            self.zp = out_act.zero_point
            self.lo = max(0, out_act.zero_point) if relu else 0
            self.hi = out_act.qmax
        # What the kernels read, derived once: the epilogues of run and preactivation.
        self.requant_run = ki.requant_params(self.m0, self.shift, self.fmult, self.mode, self.zp, self.lo,
                                             self.hi)
        self.requant_pre = ki.requant_params(self.m0, self.shift, self.acc_scale, ki.MODE_DEQUANT, 0,
                                             -ACC_LIMIT - 1, ACC_LIMIT)

    @property
    def reduction(self) -> int:
        return int(np.prod(self.weight_shape[1:]))

    def _check_accumulator(self) -> int:
        """The worst case |acc| = |bias| + K * max|x - zp| * max|w|, refused unless it fits int32 with no
        wrap-around."""
        worst = (int(np.abs(self.bias_q.astype(np.int64)).max(initial=0))
                 + self.reduction * ((1 << self.in_act.bits) - 1) * self.code_limit)
        if worst > ACC_LIMIT:
            raise InputError(f"layer {self.layers}: worst-case accumulator {worst} exceeds int32 "
                             f"(K={self.reduction}, {self.in_act.bits}-bit activations)")
        return worst

    def _zero_point(self, zero_point, lo_w: int, hi_w: int) -> np.ndarray:
        """Per-row int16 weight zero points (all 0 when symmetric, ``zero_point`` None)."""
        n_out = self.weight_shape[0]
        self.symmetric = zero_point is None
        if self.symmetric:
            return np.zeros(n_out, np.int16)
        zp = np.asarray(zero_point)
        if zp.shape not in ((n_out,), (1,)) or zp.dtype.kind not in "iu" or (zp.size and (
                zp.min() < lo_w or zp.max() > hi_w)):
            raise InputError(f"weight zero point: expected integers in {lo_w}..{hi_w} of shape ({n_out},) or "
                             f"(1,), found {zp.dtype} {zp.shape}")
        if self.weight_bits > 7:  # q - zp spans -(2**b - 1)..2**b - 1: int8 holds it up to 7 bits
            raise InputError(f"asymmetric weights: expected at most 7 bits (the kernels' int8 codes hold "
                             f"q - zero_point), found {self.weight_bits}")
        self.weight_zp_stored = np.ascontiguousarray(zp, np.int8)
        return np.broadcast_to(zp.astype(np.int16), (n_out,)).copy()

    @property
    def weight_values(self) -> np.ndarray:
        """The signed integer weight codes as stored (unpacked, zero point not subtracted)."""
        n = int(np.prod(self.weight_shape))
        return unpack_bits(self.weight_bytes, self.weight_bits, n, True).reshape(self.weight_shape)

    @property
    def weight_real(self) -> np.ndarray:
        """The real weights the stage computes with: scale * (q - zero_point), float64."""
        codes = self.weight_codes.reshape(self.weight_shape[0], -1).astype(np.float64)
        scale = np.broadcast_to(self.weight_scale.astype(np.float64), (self.weight_shape[0],))
        return (codes * scale[:, None]).reshape(self.weight_shape)

    def tensors(self):
        # 8-bit weights stay an int8 tensor of the weight's shape (files of earlier versions); narrower
        # ones are the packed stream.
        stored = (self.weight_bytes.view(np.int8).reshape(self.weight_shape) if self.weight_bits == 8
                  else self.weight_bytes)
        out = {"weight": stored, "weight_scale": self.weight_scale, "bias": self.bias_q}
        if not self.symmetric:
            out["weight_zero_point"] = self.weight_zp_stored
        if self.out_act is not None:
            out.update(_act_tensors(self.out_act))
        return out

    def spec(self):
        return {**super().spec(), "weight_bits": self.weight_bits, "weight_shape": list(self.weight_shape),
                "weight_symmetric": self.symmetric,
                "relu": self.relu, "requant": self.requant, "act_bits": self.in_act.bits,
                "float_output": self.out_act is None}

    @property
    def precision(self):
        return f"W{self.weight_bits}A{self.in_act.bits}"

    @property
    def kernel_nbytes(self):
        # the unpacked int8 codes and their repacked copies (words, lanes, corrected bias) for each layout
        packs = [getattr(self, name, None) for name in ("packed", "packed_dense")]
        return int(self.weight_codes.nbytes) + sum(int(p.quads.nbytes + p.bias.nbytes + p.lanes.nbytes)
                                                   for p in packs if p is not None)

    def run(self, x):
        return self._run(x, self.requant_run)

    def _run(self, x, rq) -> np.ndarray:
        """The layer on uint8 input ``x`` with the epilogue ``rq`` (QConv2d and QLinear define it)."""
        raise NotImplementedError

    def preactivation(self, x) -> np.ndarray:
        """Real value of the integer accumulators (bias included, no clamp); bias correction uses it."""
        return self._run(x, self.requant_pre)

    def _pack_dense(self) -> ki.PackedWeights:
        """The weights as (O, K) rows for the dense kernel (a conv over its whole input is one too)."""
        w = self.weight_codes.reshape(self.weight_shape[0], -1)
        return ki.pack_linear(w, self.bias_q, self.in_act.zero_point, self.in_act.qmax)

    def _check_input(self, x, ndim: int, channels: int | None = None):
        # The kernels index the weights by the input's sizes and have no bounds checks: an input that
        # does not fit would make them read past the weight buffer.
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != ndim:
            raise InputError(f"{self.kind} {self.layers}: expected a uint8 array of {ndim} dimensions, found "
                             f"{type(x).__name__} {getattr(x, 'dtype', '')} {np.shape(x)}")
        channels = self.weight_shape[1] if channels is None else channels
        if x.shape[1] != channels:
            raise InputError(f"{self.kind} {self.layers}: input has {x.shape[1]} "
                             f"{'channels' if ndim == 4 else 'features'}, the weights expect "
                             f"{channels} (found shape {x.shape})")

    @staticmethod
    def _outputs(shape, mode):
        if mode == ki.MODE_DEQUANT:
            return np.empty((0,) * len(shape), np.uint8), np.empty(shape, np.float32)
        return np.empty(shape, np.uint8), np.empty((0,) * len(shape), np.float32)


class QConv2d(QWeighted):
    """Quantized convolution; ``relu`` fuses a following ReLU (a clamp) and ``pool`` = (kernel, stride)
    a following MaxPool2d (taken on the accumulators, before the monotonic requantization)."""

    kind = "qconv2d"

    def __init__(self, layers, weight_q, weight_bits, weight_scale, bias_q, in_act, out_act, relu,
                 stride=(1, 1), padding=(0, 0), pool=None, requant="fixedpoint", weight_zero_point=None,
                 groups: int = 1):
        super().__init__(layers, weight_q, weight_bits, weight_scale, bias_q, in_act, out_act, relu, requant,
                         weight_zero_point)
        if len(self.weight_shape) != 4:
            raise InputError(f"conv weight: expected (O, C, KH, KW), found {self.weight_shape}")
        if type(groups) is not int or groups < 1 or self.weight_shape[0] % groups:
            raise InputError(f"qconv2d: groups must be a positive integer dividing the {self.weight_shape[0]}"
                             " "
                             f"output channels, found {groups!r}")
        self.groups = groups
        self.stride, self.padding = int_pair(stride, "stride"), int_pair(padding, "padding")
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise InputError(f"qconv2d: expected stride >= 1 and padding >= 0, found {self.stride}, "
                             f"{self.padding}")
        if pool is None:
            self.pool = None
        else:  # the FP32 layer's own checks (pairs of ints >= 1)
            if not isinstance(pool, list | tuple) or len(pool) != 2:
                raise InputError(f"pool: expected (kernel_size, stride), found {pool!r}")
            fused = MaxPool2d(*pool)
            self.pool = (fused.kernel_size, fused.stride)
        # The int8 codes repacked once for the kernels (derived, never stored); a convolution that
        # covers its whole unpadded input runs as a dense layer (see _run).
        self.packed = ki.pack_conv(self.weight_codes.reshape(self.weight_shape), self.bias_q, self.stride[0],
                                   in_act.zero_point, in_act.qmax)
        whole = self.pool is None and self.padding == (0, 0) and groups == 1
        self.packed_dense = self._pack_dense() if whole else None
        # A grouped (depthwise too) convolution runs group by group through the same integer kernel: its
        # own output channels, weights and per-channel epilogue each (``grouped_parts``), exact.
        self.parts = grouped_parts(self.weight_codes.reshape(self.weight_shape), self.bias_q, groups,
                                   self.stride[0], in_act) if groups > 1 else None

    def spec(self):
        return {**super().spec(), "stride": list(self.stride), "padding": list(self.padding),
                "pool": None if self.pool is None else [list(self.pool[0]), list(self.pool[1])],
                **({"groups": self.groups} if self.groups > 1 else {})}

    def geometry(self) -> ki.QConvGeometry:
        pool = (1, 1, 1, 1) if self.pool is None else (*self.pool[0], *self.pool[1])
        kh, kw = self.weight_shape[2:]
        return ki.QConvGeometry(kh, kw, *self.stride, *self.padding, *pool)

    def program_ops(self, chw, keep):
        o = self.weight_shape[0]
        if self.groups > 1:
            return None  # the program has no grouped op: the stage runs as a call of its own
        if self.packed_dense is not None and tuple(chw[1:]) == self.weight_shape[2:]:
            row = program.integer_row(program.OP_QLINEAR, self.packed_dense, self.requant_run, o)
            return [row], (o, 1, 1)
        geo = self.geometry()
        h = conv_output_size(chw[1], geo.kh, geo.sh, geo.ph)
        w = conv_output_size(chw[2], geo.kw, geo.sw, geo.pw)
        if h < max(1, geo.pkh) or w < max(1, geo.pkw):
            return None  # the layer path reports the error
        out = (o, conv_output_size(h, geo.pkh, geo.psh), conv_output_size(w, geo.pkw, geo.psw))
        return [program.integer_row(program.OP_QCONV, self.packed, self.requant_run, o, geo[:2], geo[2:4],
                                    geo[4:6], geo[6:])], out

    def _run(self, x, rq):
        self._check_input(x, 4, self.weight_shape[1] * self.groups)
        n, c, h, w = x.shape
        o, _, kh, kw = self.weight_shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        pkh, pkw = (1, 1) if self.pool is None else self.pool[0]
        oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
        if h + 2 * ph < kh or w + 2 * pw < kw or oh < pkh or ow < pkw:
            raise InputError(f"qconv2d {self.layers}: input {x.shape} is smaller than the kernel {(kh, kw)} "
                             f"(padding {self.padding}, stride {self.stride}, pool {self.pool})")
        if self.pool is None and (kh, kw) == (h, w) and (ph, pw) == (0, 0):
            # One output position per image: a dense layer over the flattened input, which the linear
            # kernel runs along the batch instead of along the (single) positions.
            q, f = self._outputs((n, o), rq.mode)
            ki.linear_packed(np.ascontiguousarray(x).reshape(n, -1), self.packed_dense, rq, q, f)
            return (f if rq.mode == ki.MODE_DEQUANT else q).reshape(n, o, 1, 1)
        geo = self.geometry()
        oh, ow = conv_output_size(oh, geo.pkh, geo.psh), conv_output_size(ow, geo.pkw, geo.psw)
        q, f = self._outputs((n, o, oh, ow), rq.mode)
        if self.parts is None:
            ki.conv2d_packed(np.ascontiguousarray(x), self.packed, geo, rq, q, f)
        else:
            run_grouped(x, self.parts, geo, rq, q, f)
        return f if rq.mode == ki.MODE_DEQUANT else q


def grouped_parts(codes: np.ndarray, bias_q: np.ndarray, groups: int, stride_h: int,
                  in_act: ActQuant) -> list:
    """Per group of a grouped convolution: (its input channels, its output channels, its weights packed
    for ``ki.conv2d_packed``); the per-channel epilogue is sliced per call (``run_grouped``)."""
    o, c = codes.shape[0] // groups, codes.shape[1]
    return [(slice(g * c, (g + 1) * c), slice(g * o, (g + 1) * o),
             ki.pack_conv(codes[g * o:(g + 1) * o], bias_q[g * o:(g + 1) * o], stride_h, in_act.zero_point,
                          in_act.qmax)) for g in range(len(codes) // o)]


def run_grouped(x, parts: list, geo, rq, out_q, out_f) -> None:
    """A grouped convolution as one ``ki.conv2d_packed`` call per group, each on its input channels with
    its channels' multipliers, into its slice of the output: the integer arithmetic of a dense conv."""
    dequant = rq.mode == ki.MODE_DEQUANT
    for cin, cout, packed in parts:
        part_rq = rq._replace(m0=rq.m0[cout].copy(), shift=rq.shift[cout].copy(), fmult=rq.fmult[cout].copy())
        shape = (len(x), cout.stop - cout.start, *(out_f if dequant else out_q).shape[2:])
        q, f = QWeighted._outputs(shape, rq.mode)
        ki.conv2d_packed(np.ascontiguousarray(x[:, cin]), packed, geo, part_rq, q, f)
        (out_f if dequant else out_q)[:, cout] = f if dequant else q


class _Merge(_StoredAct):
    """Shared part of QAdd and QConcat: inputs of their own quantizations, one output quantization, a
    fixed-point multiplier per input (``2**extra_bits * scale_in / scale_out``)."""

    extra_bits = 0

    def __init__(self, layers, in_acts: list[ActQuant], out_act: ActQuant):
        super().__init__(layers, in_acts[0], out_act)
        self.in_acts = tuple(in_acts)
        mult = np.array([a.scale / out_act.scale for a in in_acts], np.float64) * 2.0 ** self.extra_bits
        self.m0, self.shift = fixed_point_multiplier(mult)

    @property
    def input_acts(self) -> tuple:
        return self.in_acts

    def _check(self, xs) -> None:
        if len(xs) != len(self.in_acts) or not all(isinstance(x, np.ndarray) and x.dtype == np.uint8
                                                   for x in xs):
            raise InputError(f"{self.kind} {self.layers}: expected {len(self.in_acts)} uint8 arrays, found "
                             f"{[getattr(x, 'dtype', type(x).__name__) for x in xs]}")

    def _rescaled(self, xs, at: slice, lo: int) -> np.ndarray:
        """The inputs ``xs[at]`` (one shape) rescaled to the output grid, summed, rounded and clamped to
        [lo, qmax] (``kernels.integer.rescaled_sum``)."""
        act = self.out_act
        assert act is not None  # a merge always has its own output quantization (_Merge.__init__)
        out = np.empty(xs[0].shape, np.uint8)
        # one array type for the kernel's tuple: C-contiguous and writeable (Numba types read-only apart)
        flat = tuple(np.require(x, requirements=["C", "W"]).reshape(-1) for x in xs)
        ki.rescaled_sum(flat, np.array([a.zero_point for a in self.in_acts[at]], np.int64),
                        self.m0[at].astype(np.int64), self.shift[at].astype(np.int64), self.extra_bits,
                        act.zero_point, lo, act.qmax, out.reshape(-1))
        return out


class QAdd(_Merge):
    """Integer residual addition; ``relu`` fuses a following ReLU as the clamp at the zero point."""

    kind = "qadd"
    extra_bits = ADD_FRACTION_BITS

    def __init__(self, layers, in_acts, out_act, relu: bool = False):
        super().__init__(layers, in_acts, out_act)
        self.relu = bool(relu)
        self.lo = out_act.zero_point if relu else 0

    def run(self, *xs):
        self._check(xs)
        Add().output_shape(*(x.shape for x in xs))
        return self._rescaled(xs, slice(None), self.lo)

    def program_row(self, slot: int, current: int, keep: list) -> list[int] | None:
        """The ``kernels.program`` row adding input ``current`` (0 or 1: the program's current codes) and
        the other input, kept in ``slot``; None for more than two inputs."""
        if len(self.in_acts) != 2:
            return None
        order = [current, 1 - current]
        zps, m0, shift = (np.array(v, np.int64)[order] for v in
                          ([a.zero_point for a in self.in_acts], self.m0, self.shift))
        keep += [zps, m0, shift]
        row = program.op_row(program.OP_QADD, out=slot, kernel=(self.extra_bits, 0))
        row[program.WEIGHT], row[program.M0], row[program.SHIFT] = (a.ctypes.data for a in (zps, m0, shift))
        act = self.out_act
        assert act is not None  # a merge always has its own output quantization (_Merge.__init__)
        row[program.ZERO_POINT], row[program.LO], row[program.HI] = act.zero_point, self.lo, act.qmax
        return row


class QConcat(_Merge):
    """Integer concatenation along ``axis``: each input requantized to the output's grid."""

    kind = "qconcat"

    def __init__(self, layers, in_acts, out_act, axis: int = 1):
        super().__init__(layers, in_acts, out_act)
        self.layer = Concat(axis)

    def run(self, *xs):
        self._check(xs)
        return self.layer.forward(*(self._rescaled((x,), slice(k, k + 1), 0) for k, x in enumerate(xs)))


class QLinear(QWeighted):
    """A Linear layer (and a following ReLU) on quantized input with integer weights."""

    kind = "qlinear"

    def __init__(self, layers, weight_q, weight_bits, weight_scale, bias_q, in_act, out_act, relu,
                 requant="fixedpoint", weight_zero_point=None):
        super().__init__(layers, weight_q, weight_bits, weight_scale, bias_q, in_act, out_act, relu, requant,
                         weight_zero_point)
        if len(self.weight_shape) != 2:
            raise InputError(f"linear weight: expected (O, F), found {self.weight_shape}")
        self.packed_dense = self._pack_dense()

    def program_ops(self, chw, keep):
        o = self.weight_shape[0]
        return [program.integer_row(program.OP_QLINEAR, self.packed_dense, self.requant_run, o)], (o, 1, 1)

    def _run(self, x, rq):
        self._check_input(x, 2)
        q, f = self._outputs((x.shape[0], self.weight_shape[0]), rq.mode)
        ki.linear_packed(np.ascontiguousarray(x), self.packed_dense, rq, q, f)
        return f if rq.mode == ki.MODE_DEQUANT else q


class QMaxPool2d(Stage):
    """Max pooling directly on the integers: quantization is monotonic, so it commutes with max."""

    kind = "qmaxpool2d"

    def __init__(self, layers, act: ActQuant, kernel_size, stride):
        super().__init__(layers, act, act)
        self.layer = MaxPool2d(kernel_size, stride)  # its checks: pairs of ints >= 1, input >= kernel
        self.kernel_size, self.stride = self.layer.kernel_size, self.layer.stride

    def run(self, x):
        self.layer._check_input(x)
        return pool.maxpool2d(x, *self.kernel_size, *self.stride)

    def program_ops(self, chw, keep):
        out = self.layer.output_shape(tuple(chw))
        return [program.op_row(program.OP_QMAXPOOL, kernel=self.kernel_size, stride=self.stride)], out

    def spec(self):
        return {**super().spec(), "kernel_size": list(self.kernel_size), "stride": list(self.stride)}


class QReLU(Stage):
    """An unfused ReLU on integers: a clamp at the zero point."""

    kind = "qrelu"

    def __init__(self, layers, act: ActQuant):
        super().__init__(layers, act, act)

    def run(self, x):
        return np.maximum(x, np.uint8(self.in_act.zero_point))

    def program_ops(self, chw, keep):
        return [program.integer_row(program.OP_QRELU, zero_point=self.in_act.zero_point)], chw


class FlattenStage(Stage):
    """Flatten is a reshape in either domain: free."""

    kind = "flatten"

    def __init__(self, layers, act: ActQuant | None):
        super().__init__(layers, act, act)

    def run(self, x):
        return x.reshape(x.shape[0], -1)

    def program_ops(self, chw, keep):
        return [], (int(np.prod(chw)), 1, 1)


class FloatStage(Stage):
    """An FP32 layer running as in the FP32 network (Softmax, Sigmoid, AvgPool, or a layer mixed
    precision keeps in FP32). Stores its float32 parameters, if any."""

    kind = "float"

    def __init__(self, layers, layer):
        super().__init__(layers, None, None)
        self.layer = layer

    def run(self, x):
        return self.layer.forward(x)

    def program_ops(self, chw, keep):
        if self.layer.type == "Softmax":
            return [program.op_row(program.OP_SOFTMAX)], chw
        if self.layer.type == "GlobalAvgPool2d":  # the same kernel as the layer's forward: same bits
            return [program.op_row(program.OP_GLOBALAVG)], (chw[0], 1, 1)
        return None

    def tensors(self):
        return {pname: p.data for pname, p in zip(("weight", "bias"), self.layer.parameters(), strict=False)}

    @property
    def precision(self):
        return "FP32" if self.layer.parameters() else "-"


def integer_pool(layer) -> bool:
    """A max pool the integer stages run: they take kernel and stride only, so a padded or ceil-mode
    pool runs in FP32 (between a dequantize and a quantize) rather than wrongly in integers."""
    return isinstance(layer, MaxPool2d) and layer.padding == (0, 0) and not layer.ceil_mode


def copy_layer(layer):
    """A detached copy of an FP32 layer (the quantized network must not change when the FP32 one does)."""
    copy = layer_from_config({"type": layer.type, **layer.config()})
    for (_, dst), (_, src) in zip(copy.named_state(), layer.named_state(), strict=True):
        dst[...] = src
    return copy
