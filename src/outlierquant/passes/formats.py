"""Number formats for the linear layers: FP8 (E4M3 / E5M2), FP4 (E2M1), OCP microscaling
(MXFP8, MXFP6, MXFP4, MXINT8) and block floating point (BFP8), for weights and activations.

Sources: "FP8 Formats for Deep Learning" (Micikevicius et al., 2022) and the OCP 8-bit
Floating Point Specification (OFP8) for E4M3 / E5M2; the OCP Microscaling Formats (MX)
Specification v1.0 for the MX formats and FP6 / FP4 elements.

For every linear ``y = x @ W`` found by :func:`~outlierquant.graph.analysis.analyze_graph`
the pass rounds ``W`` and (through inserted ops) ``x`` to the chosen formats; the math of
each format is in :mod:`outlierquant.numerics.formats`, its op form in
:mod:`outlierquant.emit.formats`:

- scalar formats (``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``): ``Ŵ = s_n · round(W / s_n)``
  with ``s_n = max_k |W_kn| / max_finite`` per output channel (or one ``s`` per tensor); the
  activation gets one static scale ``s = clip · max|x| / max_finite`` from the calibrated
  range (the pass reads statistics only then);
- MX formats: blocks of 32 consecutive input channels (rows ``k`` of ``W``, the last axis
  of ``x``: the MatMul's reduction axis) share a power-of-two scale
  ``2^(⌊log2 max|block|⌋ − emax_elem)``; activation scales are computed at run time per
  token and block;
- ``bfp8``: blocks of 16 or 32 input channels share the exponent of their largest value,
  8-bit sign-magnitude mantissas.

Which forms are real (``simulated: false``): float8 weights (``DequantizeLinear`` of a
float8 initializer), float8 activations (``QuantizeLinear`` / ``DequantizeLinear``), MXFP8 /
MXINT8 / BFP8 weights (blocked ``DequantizeLinear`` of float8 / int8 elements). FP4, FP6 and
every MX / BFP activation are simulated: rounded in float ops, or, for weights, stored
already dequantized in float32. In every case the MatMul itself runs in float32:
onnxruntime's CPU provider has no float8 or block-scaled GEMM, so no form is faster than
fp32 and none is reported as a speed-up. Attention's activation × activation MatMuls are
left in float.

**Channel reordering** (``reorder: true``; Trukhanov & Soloveychik 2024, "Accurate Block
Quantization in LLMs with Outliers"). A block format gives every block the exponent of its
largest member, so one outlier channel costs its 31 neighbours their precision. Before
rounding, the pass permutes the input channels of each linear group so that channels of
similar calibrated magnitude (``max|x_j|``, sorted descending:
:func:`~outlierquant.numerics.formats.block_order`) share blocks. The permutation ``π`` is
exact where the channels come from linears through elementwise ops only::

    y = x @ W = (x P) @ (Pᵀ W),   x P = act(z @ W₀ P + b₀ P)

— the producing linears' columns and biases are permuted (the gate and up projections of a
gated MLP together), the consumers' weight rows too, and every elementwise op on the way
(GELU, SiLU, the gate product) commutes with a permutation. :func:`reorder_for_blocks`
finds these regions (:func:`permutable_region`) and records for every other group why it
was left: a norm's output is the residual stream normalised — permuting γ/β alone does not
move its channels — and attention's V → O path crosses heads.

The norm-fed groups get their order from the **residual stream** instead
(:func:`permute_residual_stream`): a permutation is orthogonal, and unlike a general
rotation it commutes with LayerNorm as well as RMSNorm (mean and variance over the channels
do not depend on their order). With ``P`` applied to every embedding table's columns, every
writer's output columns and bias (attention output, FFN down projection), every norm's γ/β
and every reader's weight rows (q/k/v, gate/up, lm_head), the model computes the same
function and every norm output arrives sorted. One order serves the whole stream, so it
ranks channels by their mean log-magnitude relative to each reader input's largest channel
over all layers (the outlier channels of a residual stream are the same in every layer).
A model without such a stream (post-norm BERT: the norm sits on the residual path; a graph
output on the stream) keeps its order, with the reason recorded. The record gives the mean number of binades each channel sits below its
block's shared exponent (:func:`~outlierquant.numerics.formats.block_exponent_gap`),
before and after.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.emit.formats import (BLOCKED_DQ_OPSET, FLOAT8_OPSET, emit_blocked_weight, emit_float8_weight,
                                       float8_storage, insert_block_round, insert_float8_qdq, insert_float_round)
from outlierquant.emit.weights import require_opset
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import (bias_input_index, is_excluded, linear_label, replace_linear, splittable,
                                     write_bias, write_linear_weight)
from outlierquant.graph.residual import embedding_table, find_residual_stream
from outlierquant.graph.records import Linear, LinearGroup
from outlierquant.graph.values import SHAPE_ONLY_OPS, constant_array, is_constant, set_input_constant
from outlierquant.numerics.formats import (MX_BLOCK, MXINT8_FRACTION_BITS, absmax_scale, bfp_blocks, block_exponent_gap,
                                           block_order, float_format, float_weight, integer_levels, mx_blocks,
                                           quantize_float)
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

FormatName = Literal["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "mxfp8", "mxfp6", "mxfp4", "mxint8", "bfp8", "none"]
SCALAR_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1")
BFP_MANTISSA_BITS = 8


@dataclasses.dataclass(frozen=True)
class FormatQuantizeOptions:
    """Options of :class:`QuantizeFormatPass`.

    ``weights`` / ``activations``: the format of each side (``none``: left in float).
    ``weight_per_channel``: scalar formats scale each output channel of a weight (else one
    scale per tensor). ``activation_clip``: scalar activation formats map
    ``clip · max|x|`` (calibrated) onto the format's largest value. ``bfp_block``: the
    block of ``bfp8`` (MX blocks are 32, as the specification fixes). ``mxfp8_element`` /
    ``mxfp6_element``: the element variant of MXFP8 / MXFP6. ``real_types``: write float8 /
    int8 initializers with ``DequantizeLinear`` where onnxruntime runs them (False: every
    weight is stored dequantized in float32). ``skip_output_layers``: leave linears whose
    output is a graph output (an lm_head) in float. ``exclude``: node-name patterns left in
    float. ``reorder``: permute channels so that those of similar calibrated magnitude share
    blocks (block formats only; the module docstring says where it is exact).
    """

    weights: FormatName = "fp8_e4m3"
    activations: FormatName = "fp8_e4m3"
    weight_per_channel: bool = True
    activation_clip: float = 1.0
    bfp_block: Literal[16, 32] = 16
    mxfp8_element: Literal["e4m3", "e5m2"] = "e4m3"
    mxfp6_element: Literal["e2m3", "e3m2"] = "e2m3"
    real_types: bool = True
    skip_output_layers: bool = True
    exclude: tuple[str, ...] = ()
    reorder: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.weights == "none" and self.activations == "none":
            raise ValueError("weights and activations are both 'none': nothing to quantize")
        if not 0.0 < float(self.activation_clip) <= 1.0:
            raise ValueError(f"activation_clip={self.activation_clip!r}: in (0, 1]")
        if self.reorder and not any(self.block(side) for side in (self.weights, self.activations)):
            raise ValueError("reorder: only for block formats (mx*, bfp8): scalar formats have no blocks")

    def block(self, fmt: str) -> int:
        """The block size of a format (0 for scalar formats and none)."""
        if fmt.startswith("mx"):
            return MX_BLOCK
        return self.bfp_block if fmt == "bfp8" else 0

    def mx_name(self, fmt: str) -> str:
        """The concrete MX format (``mxfp8_e4m3``, ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``)."""
        if fmt == "mxfp8":
            return f"mxfp8_{self.mxfp8_element}"
        if fmt == "mxfp6":
            return f"mxfp6_{self.mxfp6_element}"
        return fmt


def _is_mx(fmt: str) -> bool:
    return fmt.startswith("mx")


class QuantizeFormatPass(OutlierPass):
    """Round linear weights and activations to FP8 / FP4 / MX / BFP formats."""

    name = "format-quantize"
    options_type = FormatQuantizeOptions
    needs_stats = True  # static scales of scalar activation formats

    def reads(self) -> frozenset[str]:
        wanted = self.options.activations in SCALAR_FORMATS or self.options.reorder
        return frozenset({"stats"}) if wanted else frozenset()

    # -- which linears -------------------------------------------------------------------

    def _select(self, model: ir.Model) -> tuple[list[Linear], list[dict[str, str]]]:
        layers: list[Linear] = []
        skipped: list[dict[str, str]] = []
        for linear in analyze_graph(model).linears:
            reason = ""
            weight = constant_array(linear.weight)
            if linear.op_type == "Conv":
                reason = "Conv is not rewritten"
            elif weight is None or weight.dtype != np.float32 or weight.ndim != 2:
                reason = "weight is not a 2-D float32 constant"
            elif self.options.skip_output_layers and linear.output.is_graph_output():
                reason = "output layer (skip_output_layers)"
            elif is_excluded(linear, self.options.exclude):
                reason = "excluded"
            if reason:
                skipped.append({"linear": linear.name, "skipped": reason})
            else:
                layers.append(linear)
        return layers, skipped

    def calibration_targets(self, model: ir.Model) -> list:
        return sorted({linear.input.name for linear in self._select(model)[0]})

    # -- forms ---------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Each side's format, op form and whether it is simulated (for the record)."""
        options = self.options
        weight, activation = options.weights, options.activations
        if weight == "none":
            wform = {"format": "none"}
        elif weight in ("fp8_e4m3", "fp8_e5m2") and options.real_types:
            wform = {"format": weight, "form": "float8 DequantizeLinear", "onnx_type": float_format(weight).onnx_type,
                     "scale": "per_channel" if options.weight_per_channel else "per_tensor", "simulated": False}
        elif weight in ("mxfp8", "mxint8", "bfp8") and options.real_types:
            element = "INT8" if weight in ("mxint8", "bfp8") else float_format(f"fp8_{options.mxfp8_element}").onnx_type
            wform = {"format": options.mx_name(weight), "form": "blocked DequantizeLinear (opset 21)",
                     "onnx_type": element, "scale": "float32 power of two per block (the E8M0 value, 4 bytes)",
                     "simulated": False}
        else:
            wform = {"format": options.mx_name(weight), "form": "stored dequantized (float32)", "simulated": True}
        if activation == "none":
            aform = {"format": "none"}
        elif activation in ("fp8_e4m3", "fp8_e5m2"):
            aform = {"format": activation, "form": "float8 QuantizeLinear/DequantizeLinear, static per-tensor scale",
                     "onnx_type": float_format(activation).onnx_type, "simulated": False}
        elif activation == "fp4_e2m1":
            aform = {"format": activation, "form": "float ops, static per-tensor scale", "simulated": True}
        else:
            block = MX_BLOCK if _is_mx(activation) else options.bfp_block
            aform = {"format": options.mx_name(activation), "form": f"float ops, run-time scale per token and "
                     f"block of {block}", "simulated": True}
        return {"weights": wform, "activations": aform}

    def _weight(self, model: ir.Model, linear: Linear, label: str) -> tuple[str, float]:
        """Rewrite the weight; returns (form, relative Frobenius error of Ŵ)."""
        options = self.options
        fmt = options.weights
        weight = np.asarray(linear.weight_array(), dtype=np.float32)  # [K, N]
        real = options.real_types and splittable(linear) is None
        if fmt in SCALAR_FORMATS:
            elements, scale = float_weight(weight, fmt, per_channel=options.weight_per_channel, axis=1)
            dequantized = quantize_float(weight, fmt, scale.reshape(1, -1) if scale.ndim else scale)
            if real and fmt != "fp4_e2m1":
                require_opset(model, FLOAT8_OPSET)
                replace_linear(model.graph, linear,
                               lambda tape, x: emit_float8_weight(tape, x, elements, scale, fmt, label), label)
                form = "float8"
            else:
                write_linear_weight(model.graph, linear, dequantized, f"{label}_weight")
                form = "dequantized"
        else:
            if _is_mx(fmt):
                parts = mx_blocks(weight, options.mx_name(fmt), MX_BLOCK, axis=0)
            else:
                parts = bfp_blocks(weight, BFP_MANTISSA_BITS, options.bfp_block, axis=0)
            dequantized = parts.dequantized()
            k = weight.shape[0]
            blocked = real and fmt in ("mxfp8", "mxint8", "bfp8") and k % parts.block == 0
            if blocked:
                require_opset(model, BLOCKED_DQ_OPSET)
                if fmt == "mxfp8":
                    storage, scales = float8_storage(parts.elements, f"fp8_{options.mxfp8_element}"), parts.scales()
                else:
                    fraction = MXINT8_FRACTION_BITS if fmt == "mxint8" else BFP_MANTISSA_BITS - 2
                    levels, scales = integer_levels(parts, fraction)
                    storage = levels.astype(np.int8)
                replace_linear(model.graph, linear,
                               lambda tape, x: emit_blocked_weight(tape, x, storage, scales, parts.block, label), label)
                form = "blocked"
            else:
                write_linear_weight(model.graph, linear, dequantized, f"{label}_weight")
                form = "dequantized"
        norm = float(np.linalg.norm(weight)) or 1.0
        return form, float(np.linalg.norm(dequantized.astype(np.float64) - weight) / norm)

    def _activation(self, model: ir.Model, linear: Linear, label: str) -> ir.Value | str:
        """The rounded input of ``linear`` (inserted before it), or why it was left in float."""
        options = self.options
        fmt = options.activations
        x = linear.input
        if fmt in SCALAR_FORMATS:
            stats = self.require_stats()
            if x.name not in stats:
                return f"no calibration statistics for {x.name!r}"
            st = stats[x.name]
            amax = max(abs(st.tensor_min), abs(st.tensor_max)) * float(options.activation_clip)
            scale = float(absmax_scale(amax, fmt))
            if fmt == "fp4_e2m1":
                return insert_float_round(model, x, linear.node, fmt, scale, f"{label}_fp4")
            require_opset(model, FLOAT8_OPSET)
            return insert_float8_qdq(model, x, linear.node, fmt, scale, f"{label}_fp8")
        if _is_mx(fmt):
            if options.mx_name(fmt).startswith("mxfp8"):
                require_opset(model, FLOAT8_OPSET)  # float8 Cast of the elements
            return insert_block_round(model, x, linear.node, linear.in_features, f"{label}_{fmt}",
                                      mx_format=options.mx_name(fmt), block=MX_BLOCK)
        return insert_block_round(model, x, linear.node, linear.in_features, f"{label}_{fmt}",
                                  bfp_mantissa_bits=BFP_MANTISSA_BITS, block=options.bfp_block)

    # -- run -----------------------------------------------------------------------------

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        reordered = None
        if options.reorder:
            block = max(options.block(options.weights), options.block(options.activations))
            residual = permute_residual_stream(model, self.require_stats(), block)
            chosen = {id(linear.node) for linear in self._select(model)[0]}
            reordered = reorder_for_blocks(model, self.require_stats(), block, linears=chosen)
            reordered["residual_stream"] = residual
        layers, skipped = self._select(model)  # after the reorder: its weights are new values
        shared: dict[str, ir.Value | str] = {}
        entries: list[dict[str, Any]] = []
        for linear in layers:
            label = linear_label(linear, options.weights if options.weights != "none" else options.activations)
            entry: dict[str, Any] = {"linear": linear.name}
            if options.activations != "none":
                source = linear.input.name
                if source not in shared:
                    shared[source] = self._activation(model, linear, label)
                rounded = shared[source]
                if isinstance(rounded, str):
                    entry["activation_skipped"] = rounded
                else:
                    linear.node.replace_input_with(0, rounded)
            if options.weights != "none":
                entry["weight_form"], entry["weight_relative_error"] = self._weight(model, linear, label)
            entries.append(entry)
        formats = self.describe()
        fallback = [e["linear"] for e in entries if e.get("weight_form") == "dequantized"]
        if fallback and formats["weights"].get("simulated") is False:
            # e.g. a weight whose rows are not whole blocks, or a Gemm with transA / alpha / beta
            formats["weights"]["stored_dequantized"] = fallback
            formats["weights"]["simulated"] = True
        simulated = any(side.get("simulated", False) for side in formats.values())
        errors = [e["weight_relative_error"] for e in entries if "weight_relative_error" in e]
        record: dict[str, Any] = {
            "options": dataclasses.asdict(options),
            "formats": formats,
            "simulated": simulated,
            "matmul": "float32 (onnxruntime's CPU provider has no float8 or block-scaled GEMM: no speed-up)",
            "attention_matmuls": "float",
            "linear_layers": len(entries),
            "activation_tensors": sum(1 for v in shared.values() if not isinstance(v, str)),
            "weight_relative_error_mean": float(np.mean(errors)) if errors else None,
            "weight_relative_error_max": float(np.max(errors)) if errors else None,
            "layers": entries,
            "skipped": skipped,
            "opset": model.opset_imports.get("", None),
        }
        if reordered is not None:
            record["reorder"] = reordered
        logger.info("format-quantize: W %s / A %s on %d linears (%s)", formats["weights"].get("format"),
                    formats["activations"].get("format"), len(entries), "simulated" if simulated else "real types")
        return bool(entries), record


# -- channel reordering for block formats (Trukhanov & Soloveychik 2024) ----------------------

#: default-domain ops that act on each element alone (scalar constants broadcast): they
#: commute with any permutation of the channel axis
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Abs", "Exp", "Log", "Erf", "Tanh", "Sigmoid",
                   "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Softplus", "HardSigmoid", "HardSwish", "Mish",
                   "Sign", "Min", "Max", "Clip", "Cast", "Identity"}


def permutable_region(group: LinearGroup, linears: list[Linear]) -> tuple[list[Linear], str]:
    """The linears whose output columns carry ``group``'s input channels through elementwise
    ops alone (so permuting their columns permutes the input exactly), or ``([], why not)``.

    Every value on the way must be read only by the region's ops, the group's linears or
    shape-only ops, and not be a graph output; constants on the way must be scalars.
    """
    producer = group.producer
    if producer.kind == "norm":
        return [], (f"the channels are the residual stream normalised by {producer.norm.name}: permuting γ/β does not "
                    "move them, that needs the whole residual stream permuted")
    by_output = {id(linear.output): linear for linear in linears}
    inside = {id(linear.node) for linear in group.linears}
    sources: list[Linear] = []
    values: list[ir.Value] = []
    seen: set[int] = set()
    stack = [group.input]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        values.append(value)
        if value.is_graph_output():
            return [], f"{value.name} is a graph output"
        source = by_output.get(id(value))
        if source is not None:
            sources.append(source)
            continue
        node = value.producer()
        if node is None:
            return [], f"{value.name} is a graph input"
        if node.domain not in ("", "ai.onnx") or node.op_type not in ELEMENTWISE_OPS:
            what = "crosses attention heads" if producer.relation == "v_to_o" else "does not act per element"
            return [], f"{node.op_type} {node.name} on the path {what}"
        inside.add(id(node))
        for item in node.inputs:
            if item is None:
                continue
            if is_constant(item):
                array = constant_array(item)
                if array is None or array.size != 1:
                    return [], f"{node.op_type} {node.name} reads a non-scalar constant"
            else:
                stack.append(item)
    if not sources:
        return [], "no producing linear"
    for value in values:
        for use in value.uses():
            if id(use.node) not in inside and use.node.op_type not in SHAPE_ONLY_OPS:
                return [], f"{value.name} also feeds {use.node.op_type} {use.node.name}"
    for linear in sources:
        reason = splittable(linear)
        if reason:
            return [], f"producer {linear.name}: {reason}"
        if linear.out_features != group.in_features:
            return [], f"producer {linear.name} has {linear.out_features} outputs, the group reads {group.in_features}"
        if len(linear.weight.uses()) != 1 or (linear.bias is not None and len(linear.bias.uses()) != 1):
            return [], f"the weight or bias of {linear.name} is shared with another node"
    return sources, ""


def _permute_bias(graph: ir.Graph, linear: Linear, order: np.ndarray) -> None:
    bias = linear.bias_array()
    flat = np.asarray(bias).reshape(-1)
    if flat.size == 1:  # a scalar bias broadcasts: nothing to move
        return
    set_input_constant(graph, linear.bias_node or linear.node, bias_input_index(linear),
                       flat[order].reshape(bias.shape), f"{linear.name}_bias_reordered")


def reorder_for_blocks(model: ir.Model, stats, block: int, *, linears: set[int] | None = None) -> dict[str, Any]:
    """Permute the input channels of every group of linears (``linears``: node ids allowed,
    default all) where that is exact, sorting them by calibrated ``max|x|`` so that blocks
    of ``block`` consecutive channels hold channels of similar magnitude. Returns the record.
    """
    graph = model.graph
    analysis = analyze_graph(model)
    entries: list[dict[str, Any]] = []
    gaps_before: list[float] = []
    gaps_after: list[float] = []
    for group in analysis.groups:
        entry: dict[str, Any] = {"linears": [linear.name for linear in group.linears],
                                 "relation": group.producer.relation}
        entries.append(entry)
        if linears is not None and not all(id(linear.node) in linears for linear in group.linears):
            entry["skipped"] = "a linear of the group is not quantized"
            continue
        name = group.input.name
        if name not in stats or stats[name].channels != group.in_features:
            entry["skipped"] = f"no calibration statistics for {name}"
            continue
        if any(splittable(linear) or len(linear.weight.uses()) != 1 for linear in group.linears):
            entry["skipped"] = "a consumer's weight is not a 2-D float32 MatMul/Gemm weight of its own"
            continue
        sources, reason = permutable_region(group, analysis.linears)
        if reason:
            entry["skipped"] = reason
            continue
        magnitude = np.asarray(stats[name].absmax, dtype=np.float64)
        order = block_order(magnitude)
        before, after = block_exponent_gap(magnitude, block), block_exponent_gap(magnitude[order], block)
        if np.array_equal(order, np.arange(order.size)) or after >= before:
            entry["skipped"] = "the channels are already in magnitude order"
            continue
        for linear in sources:
            write_linear_weight(graph, linear, linear.weight_array()[:, order], f"{linear.name}_weight_reordered")
            if linear.bias is not None:
                _permute_bias(graph, linear, order)
        for linear in group.linears:
            write_linear_weight(graph, linear, linear.weight_array()[order, :], f"{linear.name}_weight_reordered")
        gaps_before.append(before)
        gaps_after.append(after)
        entry.update({"producers": [linear.name for linear in sources], "block_exponent_gap_before": before,
                      "block_exponent_gap_after": after})
        logger.info("reorder [%s]: mean binades below the block exponent %.2f -> %.2f",
                    ", ".join(entry["linears"]), before, after)
    return {"block": block, "groups": entries, "reordered_groups": len(gaps_after),
            "block_exponent_gap_before_mean": float(np.mean(gaps_before)) if gaps_before else None,
            "block_exponent_gap_after_mean": float(np.mean(gaps_after)) if gaps_after else None}


def _stream_order(profiles: list[np.ndarray]) -> np.ndarray:
    """One channel order for the residual stream: by mean ``log2(a_j / max a)`` over the
    reader inputs' calibrated ranges (largest first)."""
    logs = []
    for absmax in profiles:
        a = np.maximum(np.asarray(absmax, dtype=np.float64), 1e-30)
        logs.append(np.log2(a / a.max()))
    return block_order(np.mean(logs, axis=0))


def permute_residual_stream(model: ir.Model, stats, block: int) -> dict[str, Any]:
    """Permute the whole residual stream (see the module docstring) so that every norm
    output has its channels in one magnitude order. Returns the record (``skipped``: why
    the stream was left)."""
    graph = model.graph
    stream = find_residual_stream(analyze_graph(model))
    if isinstance(stream, str):
        return {"skipped": stream}
    readers = [group for norm in stream.norms for group in stream.readers[id(norm)]]
    for group in readers:
        for linear in group.linears:
            reason = splittable(linear)
            if reason:
                return {"skipped": f"reader {linear.name}: {reason}"}
    for writer in stream.writers:
        reason = splittable(writer)
        if reason:
            return {"skipped": f"writer {writer.name}: {reason}"}
    profiles = [np.asarray(stats[g.input.name].absmax) for g in readers
                if g.input.name in stats and stats[g.input.name].channels == stream.width]
    if not profiles:
        return {"skipped": "no calibration statistics for the norm outputs"}
    order = _stream_order(profiles)
    before = float(np.mean([block_exponent_gap(p, block) for p in profiles]))
    after = float(np.mean([block_exponent_gap(p[order], block) for p in profiles]))
    if after >= before:
        return {"skipped": "the order would not lower the block exponent gap", "block_exponent_gap_before": before,
                "block_exponent_gap_after": after}
    for writer in stream.writers:
        write_linear_weight(graph, writer, writer.weight_array()[:, order], f"{writer.name}_weight_reordered")
        if writer.bias is not None:
            write_bias(graph, writer, np.asarray(writer.bias_array()).reshape(-1)[order], f"{writer.name}_bias_reordered")
    for node in stream.embeddings:
        set_input_constant(graph, node, 0, embedding_table(node)[:, order], f"{node.inputs[0].name}_reordered")
    for norm in stream.norms:
        for vector in (norm.gamma, norm.beta):
            if vector is None:
                continue
            array = constant_array(vector)
            if array.size == 1:
                continue
            for node in norm.nodes:
                index = next((i for i, value in enumerate(node.inputs) if value is vector), None)
                if index is not None:
                    set_input_constant(graph, node, index, array.reshape(-1)[order].reshape(array.shape),
                                       f"{vector.name}_reordered")
                    break
    for group in readers:
        for linear in group.linears:
            write_linear_weight(graph, linear, linear.weight_array()[order, :], f"{linear.name}_weight_reordered")
    logger.info("reorder: residual stream of width %d, mean binades below the block exponent %.2f -> %.2f",
                stream.width, before, after)
    return {"width": stream.width, "writers": len(stream.writers), "embeddings": len(stream.embeddings),
            "norms": len(stream.norms), "readers": sum(len(g.linears) for g in readers),
            "block_exponent_gap_before": before, "block_exponent_gap_after": after}
