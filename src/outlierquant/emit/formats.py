"""Op forms of the number formats of :mod:`outlierquant.numerics.formats`.

What onnxruntime (1.32, CPU execution provider; measured by ``tests/test_formats.py``) runs:

- ``QuantizeLinear`` / ``DequantizeLinear`` with ``float8e4m3fn`` and ``float8e5m2``
  (opset 19+, per tensor and per axis; opset 21 blocked ``DequantizeLinear`` too), and
  ``Cast`` to and from both, with ``saturate``. The results match
  :func:`~outlierquant.numerics.formats.quantize_float` bit for bit. No CPU kernel
  multiplies float8: a float8 ``DequantizeLinear → MatMul`` stays a float32 MatMul (the graph
  optimizer fuses nothing), so FP8 here is real in storage and accuracy, float in speed
  (plus the Q/DQ work).
- Nothing for ``float4e2m1`` (``Cast``, ``QuantizeLinear``, ``DequantizeLinear``: "could not
  find an implementation" at opset 23) and ``float8e8m0`` only as a ``Cast`` at opset 24.
  ONNX has no FP6 type. FP4, FP6 and the MX / BFP activation formats are therefore
  *simulated*: the same rounding written with float ops.

Forms written here:

- **float8 weights** (:func:`emit_float8_weight`): float8 initializer (1 byte a weight) and a
  per-channel or per-tensor scale, ``MatMul(x, DequantizeLinear(W8, s, axis))``.
- **blocked weights** (:func:`emit_blocked_weight`, opset 21): MXFP8 elements as float8 and
  MXINT8 / BFP8 mantissas as int8, with one float32 power-of-two scale per block of 32 (16)
  input rows, ``MatMul(x, DequantizeLinear(E, 2^s, axis=0, block_size))``. The values are the
  format's exactly; the scale is stored as float32, not as the one-byte E8M0.
- **float8 activations** (:func:`insert_float8_qdq`): ``QuantizeLinear → DequantizeLinear``
  with a static per-tensor scale and a float8 zero point of 0.
- **simulated scalar activations** (:func:`insert_float_round`, FP4 / FP6 with a static
  scale): ``v = x / s``; the element quantum ``q = 2^(max(⌊log2|v|⌋, emin) − m)`` is built
  without a logarithm as ``q_min + Σ_j 2^(emin+j−1−m) · [|v| ≥ 2^(emin+j)]`` over the
  format's few binades; ``y = sign(v) · min(round(|v| / q) · q, max) · s`` (``Round`` is
  half-to-even, as the reference).
- **simulated block activations** (:func:`insert_block_round`, MX and BFP at run time):
  ``x`` → ``[-1, blocks, block]`` (zero-padded), ``a = ReduceMax(|x|)`` per block, and the
  shared exponent without ``Log2``: ``e₀ = ⌊ln a / ln 2⌋`` can be off by one near powers of
  two, so ``e = e₀ + [a ≥ 2·2^e₀] − [a < 2^e₀]`` (``Pow(2, ·)`` is exact for integers);
  then ``s = clamp(e − emax_elem, −127, 127)`` (MX) or ``clamp(e, −126, 127) − (M − 2)``
  (BFP), elements rounded as above (MXFP8 elements by a saturating float8 ``Cast``,
  MXINT8 / BFP by ``Round`` and ``Clip``), times ``2^s``, reshaped back. Blocks run along
  the last axis — the reduction axis of the MatMul that reads ``x``, as MX prescribes.

Where the graph and the reference part: a block maximum below 2^−126 (float32
subnormal) is read as 2^−126 by the graph (MX formats clamp such blocks to the smallest
scale anyway; MXINT8 gets ``s = −127`` through an explicit ``Where``). NaN and
infinities (measured): the reference makes such a block NaN (the E8M0 NaN scale); in the
graph a NaN stays in its own element only (onnxruntime's ``ReduceMax`` skips it and the
rest of the block is rounded as if it were absent), and an infinity gives its block the
scale 2^127, flushing the block's other elements to zero.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx_ir as ir

from outlierquant.graph.values import add_initializer, opset_version, unique_name
from outlierquant.numerics.formats import (BFP_EXP_MAX, BFP_EXP_MIN, E8M0_MAX, E8M0_MIN, FP8_E4M3, FP8_E5M2,
                                           MX_INT8, MXINT8_FRACTION_BITS, FloatFormat, float_format, mx_element,
                                           mx_emax)

#: the first default-domain opset with float8 types (QuantizeLinear, DequantizeLinear, Cast)
FLOAT8_OPSET = 19
#: the first default-domain opset whose DequantizeLinear takes ``block_size``
BLOCKED_DQ_OPSET = 21

FLOAT8_TYPES = {FP8_E4M3.name: ir.DataType.FLOAT8E4M3FN, FP8_E5M2.name: ir.DataType.FLOAT8E5M2}
FLOAT8_NUMPY = {FP8_E4M3.name: ml_dtypes.float8_e4m3fn, FP8_E5M2.name: ml_dtypes.float8_e5m2}


def is_float8(fmt: str | FloatFormat | None) -> bool:
    return fmt is not None and fmt != MX_INT8 and float_format(fmt).name in FLOAT8_TYPES


# -- weights (builders for graph.edit.replace_linear: build(tape, x) -> y) -----------------


def emit_float8_weight(tape: ir.tape.Tape, x: ir.Value, elements: np.ndarray, scale: np.ndarray,
                       fmt: str | FloatFormat, label: str) -> ir.Value:
    """``MatMul(x, DequantizeLinear(W8, scale, axis=1))`` for a ``[K, N]`` weight whose
    ``elements`` (float values already on the float8 grid) are stored as float8."""
    name = float_format(fmt).name
    levels = np.ascontiguousarray(elements.astype(np.float32).astype(FLOAT8_NUMPY[name]))
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    inputs = [tape.initializer(ir.tensor(levels), name=f"{label}_float8"),
              tape.initializer(ir.tensor(scale), name=f"{label}_scale")]
    weight = tape.op("DequantizeLinear", inputs, {"axis": 1} if scale.ndim else None)
    weight.type = ir.TensorType(ir.DataType.FLOAT)
    weight.shape = ir.Shape(elements.shape)
    return tape.op("MatMul", [x, weight])


def emit_blocked_weight(tape: ir.tape.Tape, x: ir.Value, elements: np.ndarray, scales: np.ndarray, block: int,
                        label: str) -> ir.Value:
    """``MatMul(x, DequantizeLinear(E, scales, axis=0, block_size=block))`` (opset 21).

    ``elements`` is the ``[K, N]`` array in its storage type (float8 or int8), ``scales``
    the ``[ceil(K / block), N]`` float32 block scales."""
    inputs = [tape.initializer(ir.tensor(np.ascontiguousarray(elements)), name=f"{label}_elements"),
              tape.initializer(ir.tensor(np.ascontiguousarray(scales, dtype=np.float32)), name=f"{label}_scales")]
    weight = tape.op("DequantizeLinear", inputs, {"axis": 0, "block_size": int(block)})
    weight.type = ir.TensorType(ir.DataType.FLOAT)
    weight.shape = ir.Shape(elements.shape)
    return tape.op("MatMul", [x, weight])


def float8_storage(elements: np.ndarray, fmt: str | FloatFormat) -> np.ndarray:
    """Float values already on ``fmt``'s grid, as the ml_dtypes float8 array ONNX stores."""
    return elements.astype(np.float32).astype(FLOAT8_NUMPY[float_format(fmt).name])


# -- activations (inserted before ``anchor``; the returned value replaces ``x``) ---------------


class _Ops:
    """Nodes written on a tape, then named and inserted before an anchor node."""

    def __init__(self, model: ir.Model, label: str) -> None:
        self.model = model
        self.graph = model.graph
        self.label = label
        self.tape = ir.tape.Tape()

    def const(self, tag: str, array) -> ir.Value:
        array = np.asarray(array)
        return add_initializer(self.graph, f"{self.label}_{tag}", array)

    def f32(self, tag: str, value) -> ir.Value:
        return self.const(tag, np.asarray(value, dtype=np.float32))

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes or None)

    def floats(self, boolean: ir.Value) -> ir.Value:
        return self.op("Cast", boolean, to=int(ir.DataType.FLOAT))

    def reduce_max_last(self, x: ir.Value) -> ir.Value:
        if opset_version(self.model) >= 18:  # axes became an input in opset 18
            return self.op("ReduceMax", x, self.const("axes", np.array([-1], np.int64)), keepdims=1)
        return self.op("ReduceMax", x, axes=[-1], keepdims=1)

    def finish(self, x: ir.Value, y: ir.Value, anchor: ir.Node) -> ir.Value:
        for index, node in enumerate(self.tape.nodes):
            node.name = unique_name(self.graph, f"{self.label}/{node.op_type}_{index}")
            for j, output in enumerate(node.outputs):
                if not output.name:
                    output.name = unique_name(self.graph, f"{self.label}/{node.op_type}_{index}_out{j}")
        y.type = x.type
        y.shape = x.shape
        self.graph.insert_before(anchor, list(self.tape.nodes))
        return y


def insert_float8_qdq(model: ir.Model, x: ir.Value, anchor: ir.Node, fmt: str | FloatFormat, scale: float,
                      label: str) -> ir.Value:
    """``DequantizeLinear(QuantizeLinear(x, s, z8), s, z8)`` with a float8 zero point (opset 19)."""
    name = float_format(fmt).name
    ops = _Ops(model, label)
    s = ops.f32("scale", scale)
    zero = ops.const("zero_point", np.zeros((), FLOAT8_NUMPY[name]))
    q = ops.op("QuantizeLinear", x, s, zero)
    q.type = ir.TensorType(FLOAT8_TYPES[name])
    return ops.finish(x, ops.op("DequantizeLinear", q, s, zero), anchor)


def _round_elements(ops: _Ops, v: ir.Value, fmt: FloatFormat) -> ir.Value:
    """``v`` rounded to ``fmt`` (ties to even, saturating) with float ops (see module docstring)."""
    if is_float8(fmt):  # a real saturating float8 Cast
        cast = ops.op("Cast", v, to=int(FLOAT8_TYPES[fmt.name]), saturate=1)
        return ops.op("Cast", cast, to=int(ir.DataType.FLOAT))
    m = fmt.mantissa_bits
    a = ops.op("Abs", v)
    quantum = ops.f32("quantum_min", math.ldexp(1.0, fmt.emin - m))
    for j in range(1, fmt.emax - fmt.emin + 1):
        reached = ops.floats(ops.op("GreaterOrEqual", a, ops.f32(f"binade{j}", math.ldexp(1.0, fmt.emin + j))))
        step = ops.op("Mul", reached, ops.f32(f"quantum_step{j}", math.ldexp(1.0, fmt.emin + j - 1 - m)))
        quantum = ops.op("Add", quantum, step)
    r = ops.op("Mul", ops.op("Round", ops.op("Div", a, quantum)), quantum)
    r = ops.op("Min", r, ops.f32("max_finite", fmt.max_finite))
    return ops.op("Mul", r, ops.op("Sign", v))


def insert_float_round(model: ir.Model, x: ir.Value, anchor: ir.Node, fmt: str | FloatFormat, scale: float,
                       label: str) -> ir.Value:
    """Simulated ``fmt`` quantize-dequantize of ``x`` with a static scale, in float ops."""
    fmt = float_format(fmt)
    ops = _Ops(model, label)
    s = ops.f32("scale", scale)
    return ops.finish(x, ops.op("Mul", _round_elements(ops, ops.op("Div", x, s), fmt), s), anchor)


def _block_exponent(ops: _Ops, amax: ir.Value) -> ir.Value:
    """``⌊log2 a⌋`` per block for ``a = max(amax, 2^−126)``, exact (Log, then one correction)."""
    a = ops.op("Max", amax, ops.f32("min_normal", math.ldexp(1.0, -126)))
    e0 = ops.op("Floor", ops.op("Mul", ops.op("Log", a), ops.f32("inv_ln2", 1.0 / math.log(2.0))))
    two = ops.f32("two", 2.0)
    p = ops.op("Pow", two, e0)
    up = ops.floats(ops.op("GreaterOrEqual", a, ops.op("Mul", p, two)))
    down = ops.floats(ops.op("Less", a, p))
    return ops.op("Sub", ops.op("Add", e0, up), down)


def insert_block_round(model: ir.Model, x: ir.Value, anchor: ir.Node, channels: int, label: str, *,
                       mx_format: str | FloatFormat | None = None, bfp_mantissa_bits: int | None = None,
                       block: int = 32) -> ir.Value:
    """Simulated MX (``mx_format``) or BFP (``bfp_mantissa_bits``) rounding of ``x`` at run
    time, blocks of ``block`` along the last axis of ``channels`` values."""
    if (mx_format is None) == (bfp_mantissa_bits is None):
        raise ValueError("give exactly one of mx_format, bfp_mantissa_bits")
    ops = _Ops(model, label)
    blocks = -(-channels // block)
    padded = blocks * block
    flat = ops.op("Reshape", x, ops.const("flat_shape", np.array([-1, channels], np.int64)))
    if padded != channels:
        flat = ops.op("Pad", flat, ops.const("pads", np.array([0, 0, 0, padded - channels], np.int64)))
    xb = ops.op("Reshape", flat, ops.const("block_shape", np.array([-1, blocks, block], np.int64)))
    amax = ops.reduce_max_last(ops.op("Abs", xb))
    e = _block_exponent(ops, amax)
    if mx_format is not None:
        element = mx_element(mx_format)
        s = ops.op("Clip", ops.op("Sub", e, ops.f32("emax_elem", mx_emax(element))),
                   ops.f32("s_min", E8M0_MIN), ops.f32("s_max", E8M0_MAX))
        if mx_emax(element) == 0:  # a block below 2^-126 takes the smallest scale, 2^-127
            tiny = ops.op("Less", amax, ops.f32("normal_min", math.ldexp(1.0, -126)))
            s = ops.op("Where", tiny, ops.f32("s_smallest", E8M0_MIN), s)
        if element == MX_INT8:
            fraction, qmax = MXINT8_FRACTION_BITS, 127
        else:
            fraction = qmax = None
    else:
        element = None
        fraction, qmax = bfp_mantissa_bits - 2, 2 ** (bfp_mantissa_bits - 1) - 1
        s = ops.op("Clip", e, ops.f32("e_min", BFP_EXP_MIN), ops.f32("e_max", BFP_EXP_MAX))
    scale = ops.op("Pow", ops.f32("base", 2.0), s)
    v = ops.op("Div", xb, scale)
    if fraction is not None:  # two's-complement / sign-magnitude mantissas with `fraction` bits
        step = ops.f32("fraction_step", math.ldexp(1.0, fraction))
        levels = ops.op("Clip", ops.op("Round", ops.op("Mul", v, step)), ops.f32("q_min", -qmax),
                        ops.f32("q_max", qmax))
        elements = ops.op("Div", levels, step)
    else:
        elements = _round_elements(ops, v, element)
    y = ops.op("Reshape", ops.op("Mul", elements, scale), ops.const("padded_shape", np.array([-1, padded], np.int64)))
    if padded != channels:
        y = ops.op("Slice", y, ops.const("start", np.array([0], np.int64)),
                   ops.const("end", np.array([channels], np.int64)), ops.const("axis", np.array([1], np.int64)))
    y = ops.op("Reshape", y, ops.op("Shape", x))
    return ops.finish(x, y, anchor)
