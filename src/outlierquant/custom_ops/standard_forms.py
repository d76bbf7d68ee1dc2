"""Graph builders for the ``ai.outlierquant`` ops: standard-op forms and kernel nodes.

Each op has two spellings, built on an :class:`onnx_ir.tape.Tape`:

- ``*_standard_form`` computes the op with default-domain ONNX ops only, so the model runs
  on any onnxruntime (slower); it is what passes emit when
  :func:`outlierquant.custom_ops.available` is false.
- ``*_kernel_form`` emits the single ``ai.outlierquant`` node the C++ kernel executes.

Both compute the functions specified in :mod:`outlierquant.custom_ops.reference`.

HadamardTransform's standard form uses the Kronecker structure of the rotation: with
``d = p * q``, ``q = 2^j`` and ``R = L ⊗ (H_q / sqrt(q))``, ``L = M ⊗ (H_{n/q} / sqrt(n/q))``
(Sylvester matrices factor as ``H_n = H_{n/q} ⊗ H_q``), a row reshaped to ``Z [p, q]``
maps to ``L.T @ Z @ H_q / sqrt(q)``: two MatMuls with ``p x p`` and ``q x q`` constants
instead of one ``d x d`` (``q`` is chosen to minimize ``p + q``, e.g. 64 x 64 twice at
``d = 4096``).

The builders add initializers named ``{name}_...``; a caller inserting several forms into
one graph passes distinct names. Initializers are recorded on the tape
(``tape.initializers``) and the tape's ``used_opsets`` lists the domains to import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from outlierquant.custom_ops import DOMAIN
from outlierquant.custom_ops.reference import INT8_MAX, outlier_channel_array
from outlierquant.numerics.int8 import weight_codes
from outlierquant.errors import InputError
from outlierquant.numerics.hadamard import check_hadamard_size, kronecker_split, sylvester_hadamard

logger = logging.getLogger(__name__)

#: Default-domain opset the standard forms are written for; ``opset`` < 18 switches
#: ReduceMax to its attribute spelling. MatMulInteger/Round/Where need >= 11.
DEFAULT_OPSET = 18
MIN_OPSET = 13
CONTRIB_DOMAIN = "com.microsoft"


def _constant(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    return tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name))


def _reduce_max_last_axis(tape: ir.tape.Tape, x: ir.Value, opset: int, name: str, *, axis: int = -1,
                          keepdims: int = 1) -> ir.Value:
    if opset >= 18:
        axes = _constant(tape, np.array([axis], dtype=np.int64), f"{name}_axes")
        return tape.op("ReduceMax", [x, axes], {"keepdims": keepdims})
    return tape.op("ReduceMax", [x], {"axes": [axis], "keepdims": keepdims})


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise InputError(f"standard-op forms need opset >= {MIN_OPSET}, got {opset}")


# --- HadamardTransform ----------------------------------------------------------------


def hadamard_standard_form(
    tape: ir.tape.Tape,
    x: ir.Value,
    dim: int,
    block: np.ndarray | None = None,
    *,
    name: str = "hadamard",
) -> ir.Value:
    """``x @ hadamard_rotation(dim, block)`` with Reshape/MatMul only; ``x`` is ``[..., dim]``."""
    m, n = check_hadamard_size(dim, block)
    p, q = kronecker_split(dim, block)
    mix = np.eye(1) if block is None else np.asarray(block, dtype=np.float64)
    left = np.kron(mix, sylvester_hadamard(n // q) / np.sqrt(n // q))
    right = sylvester_hadamard(q) / np.sqrt(q)

    original_shape = tape.op("Shape", [x])
    grid_shape = _constant(tape, np.array([-1, p, q], dtype=np.int64), f"{name}_grid_shape")
    z = tape.op("Reshape", [x, grid_shape])
    if q > 1:
        z = tape.op("MatMul", [z, _constant(tape, right.astype(np.float32), f"{name}_right")])
    if p > 1:
        z = tape.op("MatMul", [_constant(tape, left.T.astype(np.float32), f"{name}_left"), z])
    return tape.op("Reshape", [z, original_shape])


def hadamard_kernel_form(
    tape: ir.tape.Tape,
    x: ir.Value,
    block: np.ndarray | None = None,
    *,
    name: str = "hadamard",
) -> ir.Value:
    """One ``ai.outlierquant::HadamardTransform`` node (``block`` becomes an initializer)."""
    inputs = [x]
    if block is not None:
        check_hadamard_size(np.asarray(block).shape[0], block)
        inputs.append(_constant(tape, np.asarray(block, dtype=np.float32), f"{name}_block"))
    return tape.op("HadamardTransform", inputs, domain=DOMAIN, version=1)


# --- DynamicQuantizePerToken ----------------------------------------------------------


def _per_token_scale_and_levels(
    tape: ir.tape.Tape, x: ir.Value, opset: int, name: str
) -> tuple[ir.Value, ir.Value]:
    """(scale [..., 1], rounded and clipped levels as float [..., K])."""
    max_abs = _reduce_max_last_axis(tape, tape.op("Abs", [x]), opset, f"{name}_reduce")
    q_max = _constant(tape, np.array(INT8_MAX, dtype=np.float32), f"{name}_qmax")
    q_min = _constant(tape, np.array(-INT8_MAX, dtype=np.float32), f"{name}_qmin")
    zero = _constant(tape, np.array(0, dtype=np.float32), f"{name}_zero")
    one = _constant(tape, np.array(1, dtype=np.float32), f"{name}_one")
    raw_scale = tape.op("Div", [max_abs, q_max])
    scale = tape.op("Where", [tape.op("Equal", [raw_scale, zero]), one, raw_scale])
    levels = tape.op("Clip", [tape.op("Round", [tape.op("Div", [x, scale])]), q_min, q_max])
    return scale, levels


def dynamic_quantize_per_token_standard_form(
    tape: ir.tape.Tape,
    x: ir.Value,
    *,
    opset: int = DEFAULT_OPSET,
    name: str = "per_token_quant",
) -> tuple[ir.Value, ir.Value]:
    """``(Q int8 [..., K], scale float [..., 1])`` via ReduceMax(Abs)/Div/Round/Clip/Cast."""
    _check_opset(opset)
    scale, levels = _per_token_scale_and_levels(tape, x, opset, name)
    quantized = tape.op("Cast", [levels], {"to": int(ir.DataType.INT8)})
    return quantized, scale


def dynamic_quantize_per_token_kernel_form(
    tape: ir.tape.Tape, x: ir.Value, *, name: str = "per_token_quant"
) -> tuple[ir.Value, ir.Value]:
    """One ``ai.outlierquant::DynamicQuantizePerToken`` node."""
    quantized, scale = tape.op_multi_out("DynamicQuantizePerToken", [x], num_outputs=2, domain=DOMAIN, version=1)
    return quantized, scale


# --- MixedInt8MatMul ------------------------------------------------------------------


def _mixed_inputs(weight_q, weight_scale, outlier_channels, outlier_weight):
    weight_q = np.asarray(weight_q)
    weight_scale = np.asarray(weight_scale, dtype=np.float32)
    if weight_q.dtype != np.int8 or weight_q.ndim != 2:
        raise InputError(f"W_q must be a 2-D int8 array, got {weight_q.dtype} {weight_q.shape}")
    k, n = weight_q.shape
    if weight_scale.shape != (n,):
        raise InputError(f"w_scale must have shape ({n},), got {weight_scale.shape}")
    channels = outlier_channel_array(outlier_channels, k)
    if channels.size:
        if outlier_weight is None or np.shape(outlier_weight) != (channels.size, n):
            raise InputError(f"W_outlier must have shape ({channels.size}, {n}) for {channels.size} outlier channels")
        outlier_weight = np.asarray(outlier_weight, dtype=np.float32)
    return weight_q, weight_scale, channels, outlier_weight


def mixed_int8_matmul_standard_form(
    tape: ir.tape.Tape,
    x: ir.Value,
    weight_q: np.ndarray,
    weight_scale: np.ndarray,
    outlier_channels: Sequence[int] | np.ndarray | None = None,
    outlier_weight: np.ndarray | None = None,
    *,
    threshold: float = 0.0,
    use_contrib_ops: bool = False,
    opset: int = DEFAULT_OPSET,
    name: str = "mixed_int8",
) -> ir.Value:
    """MixedInt8MatMul with standard ops: masked per-token quantization, MatMulInteger
    (uint8 activations with zero point 128 x int8 weights), Cast/Mul rescale, plus a float
    MatMul over the gathered outlier channels.

    ``use_contrib_ops=True`` replaces MatMulInteger + Cast + Mul(w_scale) with onnxruntime's
    ``com.microsoft::MatMulIntegerToFloat`` (same numbers, one pass less). ``threshold > 0``
    costs a full float MatMul against ``DequantizeLinear(W_q)`` in this form, whereas the
    kernel touches only the detected columns.
    """
    _check_opset(opset)
    weight_q, weight_scale, channels, outlier_weight = _mixed_inputs(
        weight_q, weight_scale, outlier_channels, outlier_weight
    )
    k, n = weight_q.shape
    codes, w_zero = weight_codes(weight_q)  # the codes this CPU's integer kernels run exactly
    w_q = _constant(tape, codes, f"{name}_weight_q")
    # signed codes need no weight zero point (0 is the default): the form stays as it was
    w_zero_point = _constant(tape, w_zero, f"{name}_weight_zero_point") if codes.dtype == np.uint8 else None
    w_scale = _constant(tape, weight_scale, f"{name}_weight_scale")

    inliers = x
    keep = np.ones(k, dtype=np.float32)
    keep[channels] = 0
    if channels.size:
        inliers = tape.op("Mul", [x, _constant(tape, keep, f"{name}_keep")])
    dynamic_mask = None
    if threshold > 0:
        flat = tape.op("Reshape", [x, _constant(tape, np.array([-1, k], dtype=np.int64), f"{name}_flat_shape")])
        column_max = _reduce_max_last_axis(tape, tape.op("Abs", [flat]), opset, f"{name}_column_max",
                                           axis=0, keepdims=0)
        hit = tape.op("GreaterOrEqual", [column_max, _constant(tape, np.array(threshold, np.float32),
                                                                  f"{name}_threshold")])
        dynamic_mask = tape.op("Mul", [tape.op("Cast", [hit], {"to": int(ir.DataType.FLOAT)}),
                                       _constant(tape, keep, f"{name}_dynamic_keep")])
        inlier_mask = tape.op("Sub", [_constant(tape, np.array(1, np.float32), f"{name}_dyn_one"), dynamic_mask])
        inliers = tape.op("Mul", [inliers, inlier_mask])

    row_scale, levels = _per_token_scale_and_levels(tape, inliers, opset, f"{name}_quant")
    zero_point = _constant(tape, np.array(128, dtype=np.uint8), f"{name}_zero_point")
    shifted = tape.op("Cast", [tape.op("Add", [levels, _constant(tape, np.array(128, np.float32),
                                                                   f"{name}_shift")])],
                      {"to": int(ir.DataType.UINT8)})
    if use_contrib_ops:
        unit = _constant(tape, np.array(1, dtype=np.float32), f"{name}_unit_scale")
        scaled = tape.op("MatMulIntegerToFloat", [shifted, w_q, unit, w_scale, zero_point,
                                                  *([w_zero_point] if w_zero_point is not None else [])],
                         domain=CONTRIB_DOMAIN, version=1)
    else:
        accumulator = tape.op("MatMulInteger", [shifted, w_q, zero_point,
                                                *([w_zero_point] if w_zero_point is not None else [])])
        scaled = tape.op("Mul", [tape.op("Cast", [accumulator], {"to": int(ir.DataType.FLOAT)}), w_scale])
    y = tape.op("Mul", [scaled, row_scale])

    if channels.size:
        gathered = tape.op("Gather", [x, _constant(tape, channels, f"{name}_outlier_channels")], {"axis": -1})
        y = tape.op("Add", [y, tape.op("MatMul", [gathered, _constant(tape, outlier_weight,
                                                                        f"{name}_outlier_weight")])])
    if dynamic_mask is not None:
        zero_points = [] if w_zero_point is None else [
            _constant(tape, np.full(n, w_zero, w_zero.dtype), f"{name}_weight_zero_points")]
        dequantized = tape.op("DequantizeLinear", [w_q, w_scale, *zero_points], {"axis": 1})
        y = tape.op("Add", [y, tape.op("MatMul", [tape.op("Mul", [x, dynamic_mask]), dequantized])])
    return y


def mixed_int8_matmul_kernel_form(
    tape: ir.tape.Tape,
    x: ir.Value,
    weight_q: np.ndarray,
    weight_scale: np.ndarray,
    outlier_channels: Sequence[int] | np.ndarray | None = None,
    outlier_weight: np.ndarray | None = None,
    *,
    threshold: float = 0.0,
    name: str = "mixed_int8",
) -> ir.Value:
    """One ``ai.outlierquant::MixedInt8MatMul`` node with its weights as initializers."""
    weight_q, weight_scale, channels, outlier_weight = _mixed_inputs(
        weight_q, weight_scale, outlier_channels, outlier_weight
    )
    inputs = [x, _constant(tape, weight_q, f"{name}_weight_q"), _constant(tape, weight_scale, f"{name}_weight_scale")]
    if channels.size:
        inputs.append(_constant(tape, channels, f"{name}_outlier_channels"))
        inputs.append(_constant(tape, outlier_weight, f"{name}_outlier_weight"))
    attributes = {"threshold": float(threshold)} if threshold > 0 else None
    return tape.op("MixedInt8MatMul", inputs, attributes, domain=DOMAIN, version=1)


def mixed_int8_matmul_gemm_form(
    tape: ir.tape.Tape,
    x: ir.Value,
    weight_q: np.ndarray,
    weight_scale: np.ndarray,
    outlier_channels: Sequence[int] | np.ndarray | None = None,
    outlier_weight: np.ndarray | None = None,
    *,
    name: str = "mixed_int8",
    shared: dict | None = None,
) -> ir.Value:
    """MixedInt8MatMul without a runtime threshold, as our ``DynamicQuantizePerToken``
    (its uint8 output, codes + 128), onnxruntime's ``com.microsoft::MatMulIntegerToFloat``
    (zero point 128, unit activation scale), the per-token rescale, and the float
    ``Gather`` → ``MatMul`` of the outlier channels: the numbers of the single kernel node.

    Why not the single node: onnxruntime prepacks a constant weight for its own integer
    GEMM at session start, but an op invoked from inside a custom kernel gets the weight as
    a plain input and packs it again on every call. At a few rows (batch-1 decoding, short
    sentences) that packing is most of the cost: a 384 x 1536 linear on 12 rows takes 0.57
    of the kernel node's time in this form; on 12288 rows the node's fused loops win and
    this form takes 1.28x (``python benchmarks/bench_kernels.py --threads 1``,
    onnxruntime 1.32).

    ``shared`` (keyed by input name and float channels) reuses the quantized input and the
    gathered float columns an earlier call wrote for the same tensor (q/k/v): one
    quantization per tensor instead of one per linear. Callers build in graph order, so
    the shared values are defined before every later reader.
    """
    weight_q, weight_scale, channels, outlier_weight = _mixed_inputs(
        weight_q, weight_scale, outlier_channels, outlier_weight
    )
    k, _ = weight_q.shape
    key = (x.name, channels.tobytes())
    if shared is not None and key in shared:
        row_scale, shifted, gathered = shared[key]
    else:
        inliers, gathered = x, None
        if channels.size:
            keep = np.ones(k, dtype=np.float32)
            keep[channels] = 0
            inliers = tape.op("Mul", [x, _constant(tape, keep, f"{name}_keep")])
            gathered = tape.op("Gather", [x, _constant(tape, channels, f"{name}_outlier_channels")], {"axis": -1})
        codes, row_scale, shifted = tape.op_multi_out("DynamicQuantizePerToken", [inliers], num_outputs=3,
                                                      domain=DOMAIN, version=1)
        codes.name = ""  # the int8 codes are not needed: the kernel skips an output left out
        if shared is not None:
            shared[key] = (row_scale, shifted, gathered)
    codes, w_zero = weight_codes(weight_q)  # the codes this CPU's integer kernels run exactly
    scaled = tape.op("MatMulIntegerToFloat", [shifted, _constant(tape, codes, f"{name}_weight_q"),
                                              _constant(tape, np.array(1, np.float32), f"{name}_unit_scale"),
                                              _constant(tape, weight_scale, f"{name}_weight_scale"),
                                              _constant(tape, np.array(128, np.uint8), f"{name}_zero_point"),
                                              *([_constant(tape, w_zero, f"{name}_weight_zero_point")]
                                                if codes.dtype == np.uint8 else [])],
                     domain=CONTRIB_DOMAIN, version=1)
    y = tape.op("Mul", [scaled, row_scale])
    if channels.size:
        y = tape.op("Add", [y, tape.op("MatMul", [gathered, _constant(tape, outlier_weight,
                                                                        f"{name}_outlier_weight")])])
    return y
