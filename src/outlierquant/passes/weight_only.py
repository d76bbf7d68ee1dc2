"""Group-wise weight-only quantization (W4A16 / W3A16 / W8A16) with MatMulNBits.

A linear ``y = x @ W`` (``W [K, N]``) keeps float activations; its weight is stored as
``b``-bit levels in blocks of ``G`` consecutive input rows (along K) per output column::

    Ŵ[k, n] = (q[k, n] − z[g, n]) · s[g, n],   g = ⌊k / G⌋,   q ∈ {0 … 2^b − 1}

- asymmetric (round-to-nearest, RTN): the block range ``[min(w, 0), max(w, 0)]`` is
  spread over the ``2^b`` levels, ``s = (hi − lo) / (2^b − 1)``, ``z = round(−lo / s)``;
- symmetric: onnxruntime's choice, so every level is used: ``m`` is the block value of
  largest magnitude (sign kept), ``s = m / −2^(b−1)`` (``m`` lands exactly on the lowest
  level), ``z = 2^(b−1)`` (MatMulNBits' implicit zero point when none is given).

Optionally each block's range is shrunk by the factor of ``clip_ratios`` that minimises
its squared error weighted by the calibrated ``E[x_k²]`` of the rows (an output-error
proxy: ``E||x (Ŵ − W)||² ≈ Σ_k E[x_k²] ||Ŵ_k − W_k||²``).

Two emissions of the same numbers:

- ``com.microsoft::MatMulNBits`` (onnxruntime's native kernel; ``B`` is
  ``uint8 [N, K/G, G·b/8]`` with the first element of a byte in its low bits, scales
  ``[N · K/G]``, packed zero points ``[N · ⌈(K/G)·b/8⌉]``, see onnxruntime's
  ``quantization/matmul_nbits_quantizer.py``); 3-bit levels travel in the 4-bit layout;
- a blocked ``DequantizeLinear`` (opset 21: ``uint4``/``int4``/``uint8``/``int8`` weight,
  ``axis=0``, ``block_size=G``) → ``MatMul``, for runtimes without the contrib op (the
  model's default opset is raised to 21 when it is lower; the ops between 18 and 21 only
  gained types). Note: onnxruntime's graph optimizer fuses ``DequantizeLinear(int4,
  blocked) → MatMul`` back into MatMulNBits at session start, with the session option
  ``session.qdq_matmulnbits_accuracy_level`` (default 4: int8 compute, which also rounds
  the activations); set it to ``0`` for float compute.

This is the last step of **SmoothQuant+** (Pan et al. 2023, "SmoothQuant+: Accurate and
Efficient 4-bit Post-Training Weight Quantization for LLM"): activation outliers are first
migrated into the weights by a SmoothQuant scale whose α is searched for the error of the
4-bit group-wise layer (``smoothquant`` pass with ``weight_bits: 4, weight_block: 32,
activation_bits: 0``), then the weights are rounded here. The block grid search and the
levels reuse :func:`outlierquant.passes.weight_rounding.group_grid` /
:class:`~outlierquant.passes.weight_rounding.GroupGrid` (AdaDim/QuantEase work on the same
grid); this module adds the symmetric grid, any bit width, the packing for every width
and the ``DequantizeLinear`` emission. :func:`emit_matmul_nbits` is the project's one
MatMulNBits writer: the AdaDim/QuantEase passes emit their per_oc layers through it too.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from outlierquant.passes.analysis import analyze_graph
from outlierquant.passes.base import OutlierPass
from outlierquant.passes.split import _excluded, _label, replace_linear, splittable
from outlierquant.passes.weight_rounding import GroupGrid, group_grid

logger = logging.getLogger(__name__)

__all__ = [
    "BlockwiseWeight",
    "QuantizeWeightOnlyPass",
    "WeightOnlyQuantOptions",
    "emit_blocked_dequantize",
    "emit_matmul_nbits",
    "pack_levels",
    "quantize_blockwise",
    "unpack_levels",
]

MS_DOMAIN = "com.microsoft"
#: the first default-domain opset whose DequantizeLinear takes ``block_size`` and int4
BLOCKED_DQ_OPSET = 21


@dataclasses.dataclass(frozen=True)
class WeightOnlyQuantOptions:
    """Options of :class:`QuantizeWeightOnlyPass`.

    ``bits``: 3, 4 or 8. ``block_size``: rows of K per scale (a power of two >= 16, as
    MatMulNBits requires). ``symmetric``: onnxruntime's symmetric grid (no zero points)
    instead of asymmetric min/max. ``clip_ratios``: block range shrink factors searched
    with the calibrated ``E[x²]`` (``[1.0]``: plain RTN, no calibration needed).
    ``emit``: ``matmul_nbits`` (onnxruntime's kernel) or ``dequantize_linear`` (blocked
    DQ → MatMul, standard ops, opset 21). ``accuracy_level``: MatMulNBits' attribute (0:
    float compute; 4: int8 compute, which also rounds the activations). ``exclude``:
    substrings of node names left in float.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    clip_ratios: tuple[float, ...] = (1.0,)
    emit: Literal["matmul_nbits", "dequantize_linear"] = "matmul_nbits"
    accuracy_level: int = 0
    exclude: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise ValueError(f"bits={self.bits}: allowed 3, 4, 8")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size}: a power of two >= 16")
        if not self.clip_ratios or any(not 0.0 < r <= 1.0 for r in self.clip_ratios):
            raise ValueError("clip_ratios: a non-empty list of numbers in (0, 1]")
        if self.emit not in ("matmul_nbits", "dequantize_linear"):
            raise ValueError(f"emit={self.emit!r}: allowed 'matmul_nbits', 'dequantize_linear'")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level={self.accuracy_level}: allowed 0, 1, 2, 3, 4")


# -- quantization math -------------------------------------------------------------------------


@dataclasses.dataclass
class BlockwiseWeight:
    """Levels ``q [K, N]`` (uint8, ``0 … 2^b − 1``) on a per-block ``grid`` (blocks along K)."""

    levels: np.ndarray
    grid: GroupGrid
    symmetric: bool

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def block_size(self) -> int:
        return self.grid.group_size

    def dequantize(self) -> np.ndarray:
        """``(q − z) · s`` in float64 with the float32 scales that are stored."""
        k, n = self.levels.shape
        s, z = self.grid.expand(k, n)
        return (self.levels.astype(np.float64) - z.astype(np.float64)) * s.astype(np.float64)


def _blocks(a: np.ndarray, block: int) -> np.ndarray:
    """``[K, N]`` → ``[K/G, G, N]`` (zero-padded rows)."""
    k, n = a.shape
    padded = -(-k // block) * block
    out = np.zeros((padded, n), a.dtype)
    out[:k] = a
    return out.reshape(padded // block, block, n)


def _symmetric_grid(weight: np.ndarray, bits: int, block: int, row_weight: np.ndarray,
                    clip_ratios: tuple[float, ...]) -> GroupGrid:
    """onnxruntime's symmetric grid: the signed extreme of a block maps to level 0 (``−2^(b−1)``)."""
    half = 2 ** (bits - 1)
    blocks = _blocks(weight, block)
    k, n = weight.shape
    weights = _blocks(np.broadcast_to(row_weight[:, None], (k, n)).copy(), block)
    hi = blocks.max(axis=1, keepdims=True)
    lo = blocks.min(axis=1, keepdims=True)
    extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    best_err = best_scale = None
    for ratio in clip_ratios:
        scale = (extreme * ratio / -half).astype(np.float32).astype(np.float64)
        safe = np.where(scale != 0, scale, 1.0)
        q = np.clip(np.rint(blocks / safe), -half, half - 1)
        err = ((q * safe - blocks) ** 2 * weights).sum(axis=1, keepdims=True)
        if best_err is None:
            best_err, best_scale = err, safe
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, safe, best_scale)
    scale = best_scale.squeeze(1).astype(np.float32)
    return GroupGrid("per_oc", block, bits, scale, np.full(scale.shape, half, np.uint8))


def quantize_blockwise(weight: np.ndarray, bits: int = 4, block: int = 32, *, symmetric: bool = False,
                       clip_ratios: tuple[float, ...] = (1.0,), row_weight: np.ndarray | None = None,
                       axis: int = 0) -> BlockwiseWeight:
    """Quantize ``weight`` in blocks of ``block`` along ``axis`` (0: K of a ``[K, N]`` weight).

    ``row_weight`` (``E[x_k²]``) weights the clip search; ``axis=1`` quantizes the
    transpose (blocks along the last axis) and returns levels in that transposed layout.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight has rank {w.ndim}: expected 2")
    if axis == 1:
        w = w.T
    elif axis != 0:
        raise ValueError(f"axis={axis}: allowed 0, 1")
    k, _ = w.shape
    rw = np.ones(k) if row_weight is None else np.maximum(np.asarray(row_weight, np.float64), 1e-12)
    if symmetric:
        grid = _symmetric_grid(w, bits, block, rw, tuple(clip_ratios))
    else:
        grid = group_grid(w, "per_oc", block, bits, row_weight=rw, clip_ratios=tuple(clip_ratios))
    s, z = grid.expand(*w.shape)
    levels = grid.levels(w, s.astype(np.float64), z.astype(np.float64)).astype(np.uint8)
    return BlockwiseWeight(levels, grid, symmetric)


def pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis, ``8 // bits`` per byte, first element in the lowest bits.

    3-bit levels use the 4-bit layout (MatMulNBits and int4 tensors have no 3-bit one).
    """
    container = 4 if bits == 3 else bits
    if container == 8:
        return np.ascontiguousarray(levels, dtype=np.uint8)
    per_byte = 8 // container
    levels = levels.astype(np.uint8)
    pad = -levels.shape[-1] % per_byte
    if pad:
        levels = np.concatenate([levels, np.zeros(levels.shape[:-1] + (pad,), np.uint8)], axis=-1)
    grouped = levels.reshape(levels.shape[:-1] + (-1, per_byte))
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] & (2**container - 1)) << (i * container)
    return packed


def unpack_levels(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_levels` (``count`` elements along the last axis)."""
    container = 4 if bits == 3 else bits
    if container == 8:
        return packed[..., :count].copy()
    per_byte = 8 // container
    parts = [(packed >> (i * container)) & (2**container - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count].astype(np.uint8)


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


# -- emission -----------------------------------------------------------------------------------


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


# -- the pass -----------------------------------------------------------------------------------


class QuantizeWeightOnlyPass(OutlierPass):
    """Round every MatMul/Gemm weight to ``bits`` in blocks along K; MatMulNBits or blocked DQ."""

    name = "weight_only"
    options_type = WeightOnlyQuantOptions

    def __init__(self, options: WeightOnlyQuantOptions | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.options = options or WeightOnlyQuantOptions(**kwargs)
        # the clip search reads E[x²]; plain RTN needs no calibration
        self.needs_stats = len(self.options.clip_ratios) > 1 or self.options.clip_ratios[0] != 1.0

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        stats = self.stats if self.needs_stats else None
        graph = model.graph
        layers: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        float_bytes = packed_bytes = 0
        for linear in analyze_graph(model).linears:
            reason = splittable(linear)
            if reason is None and _excluded(linear, options.exclude):
                reason = "excluded by option"
            if reason is None and linear.in_features < 16:
                reason = f"K={linear.in_features} < 16 (MatMulNBits needs K >= 16)"
            if reason:
                skipped.append({"linear": linear.name, "reason": reason})
                logger.info("%s: skip %s: %s", self.name, linear.name, reason)
                continue
            weight = np.asarray(linear.weight_array(), dtype=np.float64)
            row_weight = None
            if stats is not None and linear.input.name in stats and \
                    stats[linear.input.name].channels == linear.in_features:
                row_weight = np.maximum(stats[linear.input.name].mean_sq, 0.0)
            quantized = quantize_blockwise(weight, options.bits, options.block_size, symmetric=options.symmetric,
                                           clip_ratios=options.clip_ratios, row_weight=row_weight)
            delta = quantized.dequantize() - weight
            label = _label(linear, self.name)

            def build(tape: ir.tape.Tape, x: ir.Value, quantized=quantized, label=label) -> ir.Value:
                if options.emit == "matmul_nbits":
                    return emit_matmul_nbits(tape, x, quantized, label, accuracy_level=options.accuracy_level)
                return emit_blocked_dequantize(tape, x, quantized, label)

            replace_linear(graph, linear, build, label)
            k, n = weight.shape
            blocks = -(-k // options.block_size)
            container = 4 if options.bits == 3 else options.bits
            float_bytes += k * n * 4
            packed_bytes += (blocks * options.block_size * n * container) // 8 + blocks * n * 4 + \
                (0 if options.symmetric and options.bits != 3 else n * -(-blocks * container // 8))
            relative = float(np.sum(delta**2 * (row_weight[:, None] if row_weight is not None else 1.0)))
            reference = float(np.sum(weight**2 * (row_weight[:, None] if row_weight is not None else 1.0))) or 1.0
            layers.append({"linear": linear.name, "shape": [k, n], "relative_weight_error": relative / reference})
        if layers:
            if options.emit == "matmul_nbits":
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            else:
                require_opset(model, BLOCKED_DQ_OPSET)
        logger.info("%s: %d linears to %d bits (block %d, %s, %s), %d skipped", self.name, len(layers), options.bits,
                    options.block_size, "symmetric" if options.symmetric else "asymmetric", options.emit, len(skipped))
        return bool(layers), {
            "options": dataclasses.asdict(options),
            "quantized_linears": len(layers),
            "layers": layers,
            "skipped": skipped,
            "weight_bytes": {"float": float_bytes, "quantized": packed_bytes},
            "storage_bits": 4 if options.bits == 3 else options.bits,
            "simulated": False,
        }
