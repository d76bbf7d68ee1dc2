"""Weight formats: int4/int8 blocks as onnxruntime's ``MatMulNBits`` (packed levels, scales,
zero points) or as a blocked ``DequantizeLinear`` (opset 21) feeding a float MatMul, and
group-quantized weights with float outlier rows and bias correction written back.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from outlierquant.graph.edit import replace_linear
from outlierquant.graph.records import Linear
from outlierquant.graph.values import MS_DOMAIN, constant_array, set_input_constant
from outlierquant.numerics.grids import BlockwiseWeight, GroupGrid, pack_levels

logger = logging.getLogger(__name__)

#: the first default-domain opset whose DequantizeLinear takes ``block_size`` and int4
BLOCKED_DQ_OPSET = 21


def matmul_nbits_tensors(quantized: BlockwiseWeight) -> dict[str, np.ndarray | None]:
    """``B``, ``scales``, ``zero_points`` (None when symmetric) in MatMulNBits' layout."""
    k, n = quantized.levels.shape
    g = quantized.block_size
    blocks = -(-k // g)
    padded = np.zeros((blocks * g, n), np.uint8)
    padded[:k] = quantized.levels
    if k < blocks * g:  # padding rows dequantize to 0: give them the zero point
        z_rows = np.repeat(quantized.grid.zero, g, axis=0)
        padded[k:] = z_rows[k:]
    bits = quantized.bits
    b = pack_levels(padded.T.reshape(n, blocks, g), bits)
    scales = np.ascontiguousarray(quantized.grid.scale.T.reshape(-1), dtype=np.float32)
    zeros = None
    if not quantized.symmetric or bits == 3:  # the implicit zero point is 2^(container bits − 1)
        zeros = np.ascontiguousarray(pack_levels(quantized.grid.zero.T, bits).reshape(-1))
    return {"B": np.ascontiguousarray(b), "scales": scales, "zero_points": zeros}


def emit_matmul_nbits(tape: ir.tape.Tape, x: ir.Value, quantized: BlockwiseWeight, label: str, *,
                      accuracy_level: int = 0) -> ir.Value:
    """``com.microsoft::MatMulNBits(x, B, scales[, zero_points])`` computing ``x @ Ŵ``."""
    k, n = quantized.levels.shape
    tensors = matmul_nbits_tensors(quantized)
    inputs = [x]
    for key in ("B", "scales", "zero_points"):
        if tensors[key] is not None:
            inputs.append(tape.initializer(ir.tensor(tensors[key]), name=f"{label}_{key}"))
    attributes: dict[str, Any] = {"K": k, "N": n, "bits": 4 if quantized.bits == 3 else quantized.bits,
                                  "block_size": quantized.block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    return tape.op("MatMulNBits", inputs, attributes, domain=MS_DOMAIN, version=1)


def blocked_dequantize_tensors(quantized: BlockwiseWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x, scale, zero_point)`` of a blocked DequantizeLinear (axis 0) reproducing ``Ŵ``.

    Symmetric: signed levels ``q − 2^(b−1)`` (int4 / int8) without a zero point;
    asymmetric: uint4 / uint8 levels with a zero point per block.
    """
    container = 4 if quantized.bits == 3 else quantized.bits
    scale = np.ascontiguousarray(quantized.grid.scale, dtype=np.float32)
    if quantized.symmetric:
        signed = quantized.levels.astype(np.int16) - 2 ** (quantized.bits - 1)
        dtype = ml_dtypes.int4 if container == 4 else np.int8
        return signed.astype(dtype), scale, None
    dtype = ml_dtypes.uint4 if container == 4 else np.uint8
    return quantized.levels.astype(dtype), scale, quantized.grid.zero.astype(dtype)


def emit_blocked_dequantize(tape: ir.tape.Tape, x: ir.Value, quantized: BlockwiseWeight, label: str) -> ir.Value:
    """Standard ops (opset >= 21): ``MatMul(x, DequantizeLinear(q, s, z, axis=0, block_size=G))``."""
    levels, scale, zero = blocked_dequantize_tensors(quantized)
    inputs = [tape.initializer(ir.tensor(levels), name=f"{label}_levels"),
              tape.initializer(ir.tensor(scale), name=f"{label}_scale")]
    if zero is not None:
        inputs.append(tape.initializer(ir.tensor(zero), name=f"{label}_zero_point"))
    weight = tape.op("DequantizeLinear", inputs, {"axis": 0, "block_size": quantized.block_size})
    weight.type = ir.TensorType(ir.DataType.FLOAT)
    weight.shape = ir.Shape(quantized.levels.shape)
    return tape.op("MatMul", [x, weight])


def require_opset(model: ir.Model, version: int) -> bool:
    """Raise the default-domain opset to ``version`` (and the IR version to 10 for int4); True if raised."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return False
    model.opset_imports[""] = version
    model.ir_version = max(model.ir_version or 0, 10)
    for node in model.graph:
        if node.domain in ("", "ai.onnx") and node.version is not None and node.version < version:
            node.version = None
    logger.info("default opset raised from %d to %d for blocked DequantizeLinear", current, version)
    return True


def _blocked_dequant_matmul(tape: ir.tape.Tape, x: ir.Value, q: np.ndarray, grid: GroupGrid, label: str) -> ir.Value:
    """Standard-op form for per_ic groups: unpack uint4 pairs, ``(q − z) · s`` per group, MatMul."""

    k, n = q.shape
    g = grid.group_size
    groups = grid.scale.shape[1]
    if groups * g == n:
        padded = q
    else:
        padded = np.zeros((k, groups * g), np.uint8)
        padded[:, :n] = q
    packed = pack_levels(padded, 4)  # [K, groups*G/2]; 3-bit levels in 4-bit containers

    def const(array, suffix):
        return tape.initializer(ir.tensor(np.ascontiguousarray(array)), name=f"{label}_{suffix}")

    packed_v = const(packed, "packed")
    four = const(np.array(4, np.uint8), "four")
    high = tape.op("BitShift", [packed_v, four], {"direction": "RIGHT"})
    low = tape.op("Sub", [packed_v, tape.op("BitShift", [high, four], {"direction": "LEFT"})])
    axes = const(np.array([-1], np.int64), "axes")
    pairs = tape.op("Concat", [tape.op("Unsqueeze", [low, axes]), tape.op("Unsqueeze", [high, axes])], {"axis": -1})
    levels = tape.op("Cast", [tape.op("Reshape", [pairs, const(np.array([k, groups, g], np.int64), "shape")])],
                     {"to": int(ir.DataType.FLOAT)})
    zero = const(grid.zero.astype(np.float32)[:, :, None], "zero")
    scale = const(grid.scale.astype(np.float32)[:, :, None], "scale")
    weight = tape.op("Mul", [tape.op("Sub", [levels, zero]), scale])
    weight = tape.op("Reshape", [weight, const(np.array([k, groups * g], np.int64), "flat_shape")])
    if groups * g != n:
        weight = tape.op("Slice", [weight, const(np.array([0], np.int64), "start"),
                                   const(np.array([n], np.int64), "end"), const(np.array([1], np.int64), "axis")])
    return tape.op("MatMul", [x, weight])


def correct_bias(graph: ir.Graph, linear: Linear, correction: np.ndarray) -> str:
    """Add ``correction`` to the linear's constant bias (``"folded"``) or say an Add is needed."""
    if linear.bias is None or linear.bias_node is None or len(linear.bias.uses()) != 1:
        return "inserted Add"
    bias = np.asarray(constant_array(linear.bias), np.float64)
    if bias.size != correction.size:
        return "inserted Add"
    index = next(i for i, v in enumerate(linear.bias_node.inputs) if v is linear.bias)
    set_input_constant(graph, linear.bias_node, index, (bias.reshape(-1) + correction).reshape(bias.shape),
                       f"{linear.name}_bias_corrected")
    return "folded"


def emit_grouped_weight(graph: ir.Graph, linear: Linear, q: np.ndarray, grid: GroupGrid,
                        side: tuple[np.ndarray, np.ndarray] | None, label: str,
                        correction: np.ndarray | None = None) -> None:
    """The grouped low-bit linear, plus the float side path ``side = (rows, values)`` (the
    input rows that hold an outlier and their ``[len(rows), N]`` float weights; rows whose
    values are all zero are left out), plus a bias correction."""
    # weight_only imports this module (GroupGrid, group_grid): import its writer lazily
    rows, values = side if side is not None else (np.zeros(0, np.int64), None)
    if values is not None:
        nonzero = np.any(values != 0, axis=1)
        if not nonzero.all():
            rows, values = rows[nonzero], values[nonzero]

    def build(tape: ir.tape.Tape, x: ir.Value) -> ir.Value:
        if grid.dimension == "per_oc":  # the MatMulNBits writer of weight_only, shared with RTN
            y = emit_matmul_nbits(tape, x, BlockwiseWeight(q, grid, symmetric=False), label)
        else:
            y = _blocked_dequant_matmul(tape, x, q, grid, label)
        if rows.size:
            gathered = tape.op("Gather", [x, tape.initializer(ir.tensor(rows.astype(np.int64)),
                                                              name=f"{label}_outlier_rows")], {"axis": -1})
            dense = np.ascontiguousarray(values, dtype=np.float32)  # no copy when it is already
            y = tape.op("Add", [y, tape.op("MatMul", [gathered, tape.initializer(ir.tensor(dense),
                                                                                 name=f"{label}_outlier_weight")])])
        if correction is not None:
            y = tape.op("Add", [y, tape.initializer(ir.tensor(correction.astype(np.float32)),
                                                    name=f"{label}_bias_correction")])
        return y

    replace_linear(graph, linear, build, label)
