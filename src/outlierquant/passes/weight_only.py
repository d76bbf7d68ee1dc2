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
levels reuse :func:`outlierquant.numerics.rounding.group_grid` /
:class:`~outlierquant.passes.weight_rounding.GroupGrid` (AdaDim/QuantEase work on the same
grid); this module adds the symmetric grid, any bit width, the packing for every width
and the ``DequantizeLinear`` emission. :func:`emit_matmul_nbits` is the project's one
MatMulNBits writer: the AdaDim/QuantEase passes emit their per_oc layers through it too.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.emit.weights import BLOCKED_DQ_OPSET, emit_blocked_dequantize, emit_matmul_nbits, require_opset
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import is_excluded, linear_label, replace_linear, splittable
from outlierquant.graph.values import MS_DOMAIN
from outlierquant.numerics.grids import quantize_blockwise
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

__all__ = [
    "QuantizeWeightOnlyPass",
    "WeightOnlyQuantOptions",
]


@dataclasses.dataclass(frozen=True)
class WeightOnlyQuantOptions:
    """Options of :class:`QuantizeWeightOnlyPass`.

    ``bits``: 3, 4 or 8. ``group_size``: rows of K per scale (a power of two >= 16, as
    MatMulNBits requires). ``symmetric``: onnxruntime's symmetric grid (no zero points)
    instead of asymmetric min/max. ``clip_ratios``: block range shrink factors searched
    with the calibrated ``E[x²]`` (``[1.0]``: plain RTN, no calibration needed).
    ``emit``: ``matmul_nbits`` (onnxruntime's kernel) or ``dequantize_linear`` (blocked
    DQ → MatMul, standard ops, opset 21). ``accuracy_level``: MatMulNBits' attribute (0:
    float compute; 4: int8 compute, which also rounds the activations). ``exclude``:
    substrings of node names left in float. ``layers``: ``all`` linears, or only the
    ``output`` ones (a linear whose output is a graph output: an LM head), so that a
    recipe which quantizes the other linears in its own way can still store the head as
    int8 weights: at batch-1 decode a float head is the largest weight read per token.
    """

    bits: Literal[3, 4, 8] = 4
    group_size: int = 32
    symmetric: bool = False
    clip_ratios: tuple[float, ...] = (1.0,)
    emit: Literal["matmul_nbits", "dequantize_linear"] = "matmul_nbits"
    accuracy_level: int = 0
    exclude: tuple[str, ...] = ()
    layers: Literal["all", "output"] = "all"
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size={self.group_size}: a power of two >= 16")
        if not self.clip_ratios or any(not 0.0 < r <= 1.0 for r in self.clip_ratios):
            raise ValueError("clip_ratios: a non-empty list of numbers in (0, 1]")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level={self.accuracy_level}: allowed 0, 1, 2, 3, 4")


# -- quantization math -------------------------------------------------------------------------


# -- emission -----------------------------------------------------------------------------------


# -- the pass -----------------------------------------------------------------------------------


class QuantizeWeightOnlyPass(OutlierPass):
    """Round every MatMul/Gemm weight to ``bits`` in blocks along K; MatMulNBits or blocked DQ."""

    name = "weight-only"
    options_type = WeightOnlyQuantOptions

    needs_stats = True  # the clip search reads E[x²]; plain RTN needs no calibration

    def reads(self) -> frozenset[str]:
        ratios = self.options.clip_ratios
        return frozenset({"stats"}) if len(ratios) > 1 or ratios[0] != 1.0 else frozenset()

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        stats = self.stats if "stats" in self.reads() else None
        graph = model.graph
        layers: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        float_bytes = packed_bytes = 0
        for linear in analyze_graph(model).linears:
            if options.layers == "output" and not linear.output.is_graph_output():
                continue  # not asked for: neither quantized nor listed as skipped
            reason = splittable(linear)
            if reason is None and is_excluded(linear, options.exclude):
                reason = "excluded by option"
            if reason is None and linear.in_features < 16:
                reason = f"K={linear.in_features} < 16 (MatMulNBits needs K >= 16)"
            if reason:
                skipped.append({"linear": linear.name, "reason": reason})
                logger.info("%s: skip %s: %s", self.name, linear.name, reason)
                continue
            weight = linear.weight_array()  # float32: quantize_blockwise widens a column chunk at a time
            row_weight = None
            if stats is not None and linear.input.name in stats and \
                    stats[linear.input.name].channels == linear.in_features:
                row_weight = np.maximum(stats[linear.input.name].mean_sq, 0.0)
            quantized = quantize_blockwise(weight, options.bits, options.group_size, symmetric=options.symmetric,
                                           clip_ratios=options.clip_ratios, row_weight=row_weight)
            label = linear_label(linear, "weight_only")  # node names predate the kebab-case pass key

            def build(tape: ir.tape.Tape, x: ir.Value, quantized=quantized, label=label) -> ir.Value:
                if options.emit == "matmul_nbits":
                    return emit_matmul_nbits(tape, x, quantized, label, accuracy_level=options.accuracy_level)
                return emit_blocked_dequantize(tape, x, quantized, label)

            replace_linear(graph, linear, build, label)
            k, n = weight.shape
            blocks = -(-k // options.group_size)
            container = 4 if options.bits == 3 else options.bits
            float_bytes += k * n * 4
            packed_bytes += (blocks * options.group_size * n * container) // 8 + blocks * n * 4 + \
                (0 if options.symmetric and options.bits != 3 else n * -(-blocks * container // 8))
            error, reference = quantized.weighted_error(weight, row_weight)
            layers.append({"linear": linear.name, "shape": [k, n], "relative_weight_error": error / (reference or 1.0)})
        if layers:
            if options.emit == "matmul_nbits":
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            else:
                require_opset(model, BLOCKED_DQ_OPSET)
        logger.info("%s: %d linears to %d bits (block %d, %s, %s), %d skipped", self.name, len(layers), options.bits,
                    options.group_size, "symmetric" if options.symmetric else "asymmetric", options.emit, len(skipped))
        return bool(layers), {
            "options": dataclasses.asdict(options),
            "quantized_linears": len(layers),
            "layers": layers,
            "skipped": skipped,
            "weight_bytes": {"float": float_bytes, "quantized": packed_bytes},
            "storage_bits": 4 if options.bits == 3 else options.bits,
            "simulated": False,
        }
