"""OutlierTune: per-channel activation scales pre-executed into the weights.

**OutlierTune** (2024, "OutlierTune: Efficient Channel-Wise Quantization for Large
Language Models"): quantize activations *per channel* and pre-execute the per-channel
dequantization into the weights, so the integer kernel still sees one per-tensor
activation scale. With channel ``j`` quantized as ``x_j ≈ d_j (q_j − z_j)`` (``q`` uint8,
scale ``d_j``, zero point ``z_j`` — one per channel, which symmetrizes each channel's
range around its own center)::

    x @ W  ≈  q @ (diag(d) · W)  −  (d ∘ z) @ W

:class:`QuantizeOutlierTunePass` writes that with standard ops:
``Mul(x, 1/d)`` [→ ``Add(·, z)``] → ``QuantizeLinear(·, 1, 0)`` → ``DequantizeLinear(q, 1, 0)``
→ ``MatMul`` with the int8 per-output-channel weight ``Q(diag(d)·W)``; the constant
``(d ∘ z) @ Q(diag(d)·W)`` is subtracted from the linear's bias (a linear without a
bias — or ``zero_point: shared`` — uses one zero point for all channels, so no ``Add``
and no correction). onnxruntime fuses ``DequantizeLinear → MatMul ← DequantizeLinear``
into ``MatMulIntegerToFloat`` as for plain static QDQ; the cost is the inserted
elementwise ``Mul`` (+ ``Add``) per group, counted in the record. Why not a per-axis
``QuantizeLinear(x, d, z, axis=-1)``, which would need no extra op: onnxruntime 1.32's
kernel for a per-axis scale on the innermost axis is ~100x slower than per-tensor
(measured: 128 ms vs 1.2 ms for 16×128×1536; ``Mul`` + per-tensor Q: 2.8 ms), which made
the whole model 2.7x *slower* than fp32. It applies to every linear group, whether or
not a producer could absorb a scale (post-norm BERT, the FFN down projection after GELU).

Putting all of the per-channel spread into ``W`` makes the weights harder (SmoothQuant
with α = 1); the per-channel scales are therefore ``d_j = Δ · t_j`` with
``t_j = smoothing_scales(α)`` of SmoothQuant and ``α`` searched per group with the same
error estimate (:func:`outlierquant.numerics.estimates.estimated_output_error`, per-channel
zero points). α = 1 is pure per-channel activation quantization.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ChannelStats
from outlierquant.emit.qdq import (
    QuantConfig,
    insert_qdq,
    per_channel_weight_dequantize,
    plan_quantization,
    quantize_dequantize_nodes,
)
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import (
    bias_input_index,
    check_group,
    group_weight_rows,
    is_excluded,
    rescaled_linear_weight,
    scale_input_vector,
)
from outlierquant.graph.records import LinearGroup
from outlierquant.graph.tags import ONLINE_ROTATION_KEY
from outlierquant.graph.values import add_initializer, first_in_graph, remove_if_unused
from outlierquant.numerics.estimates import DEFAULT_ALPHA_GRID, max_median_ratio, search_alpha, smoothing_scales
from outlierquant.numerics.grids import quantize_weight
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OutlierTuneOptions:
    """Options of :class:`QuantizeOutlierTunePass`.

    ``alpha``: share of the channel spread kept in the per-channel activation scales
    (1: fully per-channel), or ``"search"`` per group. ``relations``: producer relations
    whose groups get per-channel activations (the others get plain per-tensor QDQ).
    ``dynamic_matmuls`` / ``exclude``: as in the ``quantize`` pass, for the rest.
    ``groups``: ``all``, or ``unfoldable``: only groups whose producer cannot absorb a
    scale (a post-norm LayerNorm that also feeds the residual, an activation) and whose
    input is not an online rotation's output — the groups where smoothing needs an op at
    run time anyway, so the per-channel ``Mul`` is the cheapest outlier treatment.
    ``rest``: ``quantize`` the other linears per tensor (and the attention MatMuls with
    ``dynamic_matmuls``), or ``leave`` them in float for a later pass (``llm_int8``; the
    record counts them: ``left_float_linears``).
    """

    alpha: float | str = "search"
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    relations: tuple[str, ...] = ("norm", "linear", "v_to_o", "up_to_down", "none")
    zero_point: Literal["per_channel", "shared"] = "per_channel"
    dynamic_matmuls: bool = True
    exclude: tuple[str, ...] = ()
    groups: Literal["all", "unfoldable"] = "all"
    rest: Literal["quantize", "leave"] = "quantize"
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if self.rest not in ("quantize", "leave"):
            raise ValueError(f"rest={self.rest!r}: allowed 'quantize', 'leave'")
        if isinstance(self.alpha, str):
            if self.alpha != "search":
                raise ValueError(f"alpha={self.alpha!r}: allowed a number in [0, 1] or 'search'")
        elif not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha={self.alpha}: allowed a number in [0, 1] or 'search'")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError("alpha_grid: a non-empty list of numbers in [0, 1]")


def _channel_parameters(st: ChannelStats, t: np.ndarray, per_channel_zero_point: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel uint8 scale ``d = Δ·t`` and zero points for channel ranges (zero included)."""
    lo = np.minimum(st.minimum, 0.0) / t
    hi = np.maximum(st.maximum, 0.0) / t
    if per_channel_zero_point:
        step = float(np.max(hi - lo)) / 255.0
        step = step if step > 0 else 1.0
        zero = np.clip(np.rint(-lo / step), 0, 255)
    else:
        step = (float(hi.max()) - float(lo.min())) / 255.0
        step = step if step > 0 else 1.0
        zero = np.full(t.shape, np.clip(np.rint(-float(lo.min()) / step), 0, 255))
    return (step * t).astype(np.float32), zero.astype(np.uint8)


def _foldable_or_rotated(group: LinearGroup) -> str:
    """Why ``groups: unfoldable`` leaves ``group`` to a later pass ("" when it takes it)."""
    producer = group.input.producer()
    if producer is not None and ONLINE_ROTATION_KEY in producer.metadata_props:
        return "input is an online rotation's output (groups: unfoldable)"
    if group.producer.foldable:
        return f"producer ({group.producer.relation}) can absorb a scale (groups: unfoldable)"
    return ""


class QuantizeOutlierTunePass(OutlierPass):
    """Static W8A8 with per-channel activation scales pre-executed into the weights."""

    name = "outliertune"
    needs_stats = True
    options_type = OutlierTuneOptions

    def calibration_targets(self, model: ir.Model) -> list:
        """Every linear input when it quantizes the rest too; with ``rest: leave`` only the
        inputs of the groups it may rewrite (the statistics of the others are not read)."""
        if self.options.rest != "leave":
            return super().calibration_targets(model)
        groups = analyze_graph(model).groups
        return sorted({group.input.name for group in groups
                       if self.options.groups == "all" or not _foldable_or_rotated(group)})

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        stats = self.require_stats()
        options = self.options
        graph = model.graph
        analysis = analyze_graph(model)
        handled: list[str] = []
        inserted = 0
        groups_record = []
        for group in analysis.groups:
            entry: dict[str, Any] = {"linears": [l.name for l in group.linears], "relation": group.producer.relation}
            reason = check_group(group, stats, allow_insert=True, relations=options.relations)
            if not reason and any(is_excluded(l, options.exclude) for l in group.linears):
                reason = "a linear of the group is excluded"
            if not reason and options.groups == "unfoldable":
                reason = _foldable_or_rotated(group)
            if not reason and any(l.op_type not in ("MatMul", "Gemm") for l in group.linears):
                reason = "only MatMul/Gemm groups"
            if reason:
                entry["skipped"] = reason
                groups_record.append(entry)
                continue
            st = stats[group.input.name]
            weights = group_weight_rows(group)
            per_channel_zp = options.zero_point == "per_channel" and all(l.bias is not None for l in group.linears)

            def scales(alpha: float) -> np.ndarray:
                return smoothing_scales(st.absmax, weights, alpha)

            if options.alpha == "search":
                alpha, t, _ = search_alpha(st, weights, options.alpha_grid, scale_fn=scales,
                                           per_channel_zero_point=per_channel_zp)
            else:
                alpha = float(options.alpha)
                t = scales(alpha)
            d, zero = _channel_parameters(st, t, per_channel_zp)
            inserted += self._rewrite(graph, group, d, zero, per_channel_zp)
            handled.extend(l.node.name for l in group.linears)
            entry.update(alpha=alpha, per_channel_zero_point=per_channel_zp,
                         max_median_before=max_median_ratio(st.absmax),
                         max_median_after=max_median_ratio(st.absmax / t))
            groups_record.append(entry)
        counts = {"weights": 0, "activations": 0}
        left = 0
        if options.rest == "leave":
            left = len(analyze_graph(model).linears)
            logger.info("outliertune: %d linears left in float for a later pass (rest: leave)", left)
        else:
            config = QuantConfig(dynamic_matmuls=options.dynamic_matmuls,
                                 exclude=options.exclude, exclude_nodes=tuple(sorted(handled)))
            plan = plan_quantization(model, config)
            counts = insert_qdq(model, plan, stats, config)
        logger.info("outliertune: %d linears with per-channel activations, %d more per-tensor",
                    len(handled), counts["weights"])
        return bool(handled) or options.rest == "quantize", {
            "options": dataclasses.asdict(options),
            "groups": groups_record,
            "per_channel_linears": len(handled),
            "per_tensor_weights": counts["weights"],
            "per_tensor_activation_qdq": counts["activations"],
            "left_float_linears": left,
            "inserted_ops": inserted,
        }

    @staticmethod
    def _rewrite(graph: ir.Graph, group: LinearGroup, d: np.ndarray, zero: np.ndarray, per_channel_zp: bool) -> int:
        x = group.input
        first = first_in_graph(graph, [linear.node for linear in group.linears])
        base = x.name
        one = add_initializer(graph, f"{base}_unit_scale", np.array(1.0, np.float32))
        inverse = add_initializer(graph, f"{base}_channel_inv_scale", (1.0 / d.astype(np.float64)).astype(np.float32))
        mul = ir.node("Mul", inputs=[x, inverse], name=f"{base}_ChannelScale")
        mul.outputs[0].name = f"{base}_channel_scaled"
        nodes = [mul]
        levels = mul.outputs[0]
        if per_channel_zp:
            offsets = add_initializer(graph, f"{base}_channel_zero_point", zero.astype(np.float32))
            add = ir.node("Add", inputs=[levels, offsets], name=f"{base}_ChannelZeroPoint")
            add.outputs[0].name = f"{base}_channel_offset"
            nodes.append(add)
            levels = add.outputs[0]
            shared_zero = np.array(0, np.uint8)
        else:
            shared_zero = np.array(zero[0], np.uint8)
        for node_ in nodes:
            node_.outputs[0].type = x.type
            node_.outputs[0].shape = x.shape
        zero0 = add_initializer(graph, f"{base}_shared_zero_point", shared_zero)
        q, dq = quantize_dequantize_nodes(levels, one, zero0, base, like=x)
        nodes += [q, dq]
        graph.insert_before(first, nodes)
        for linear in group.linears:
            # diag(d)·W in float64, cast to float32 in the stored layout, a slab at a time
            stored = rescaled_linear_weight(linear, rows=d.astype(np.float64), dtype=np.float32)
            axis = 1 if linear.weight_layout == "in_out" else 0
            qw, ws = quantize_weight(stored, axis)
            del stored
            if per_channel_zp:
                deq = qw.astype(np.float64) * (ws[None, :] if axis == 1 else ws[:, None])
                deq_kn = deq if axis == 1 else deq.T
                correction = zero.astype(np.float64) @ deq_kn
                scale_input_vector(linear.bias_node or linear.node, bias_input_index(linear), np.ones_like(correction),
                              graph, f"{linear.name}_bias_outliertune", correction)
            wname = linear.weight.name or f"{linear.name}_weight"
            wdq = per_channel_weight_dequantize(graph, qw, ws, axis, wname)
            graph.insert_before(linear.node, [wdq])
            old = linear.weight
            linear.node.replace_input_with(1, wdq.outputs[0])
            linear.node.replace_input_with(0, dq.outputs[0])
            remove_if_unused(graph, old)
        return len(nodes) - 2  # the Mul (and Add) beside the usual Q/DQ pair
