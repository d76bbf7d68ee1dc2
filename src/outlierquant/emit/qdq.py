"""Q/DQ: the one place that writes QuantizeLinear / DequantizeLinear nodes.

Two phases, as in onnxruntime's QDQ quantizer: :func:`plan_quantization` *declares* which
tensors are quantized, how and along which axis (one :class:`TensorQuant` each);
:func:`insert_qdq` writes the nodes. Passes add or change declarations, not nodes. Also
here: the residual int8 MatMul on the attention probabilities' rounding residual.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.numerics.int8 import weight_codes
from outlierquant.errors import CalibrationError
from outlierquant.graph.attention import is_attention_matmul, probs_step, quantized_source
from outlierquant.graph.edit import name_excluded
from outlierquant.graph.values import add_initializer, constant_array, is_constant, remove_if_unused, weight_input
from outlierquant.numerics.grids import activation_scale_zero_point, quantize_weight
from outlierquant.options import check_fields

if TYPE_CHECKING:  # statistics are read, never built, here
    from outlierquant.calibration.stats import ActivationStats

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. Frozen so a recipe round-trips exactly."""

    weight_bits: int = 8
    activations: ActivationMode = "static"
    #: static activations: "uint8" (fast on x86 MLAS) or "int8"
    activation_type: Literal["uint8", "int8"] = "uint8"
    #: quantize the MatMul outputs too (onnxruntime's default; costs accuracy)
    quantize_outputs: bool = False
    #: quantize activation × activation MatMuls (attention QK^T and probs·V)
    dynamic_matmuls: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    #: node-name patterns left in float (e.g. a sensitive lm_head): the ``exclude`` of every
    #: pass (:func:`outlierquant.graph.edit.name_excluded`)
    exclude: tuple[str, ...] = ()
    #: exact node names left in float, for passes that handled those linears themselves
    exclude_nodes: tuple[str, ...] = ()
    #: leave linears whose output is a graph output (an lm_head) in float, as QuaRot and
    #: bitsandbytes' LLM.int8() integration do
    skip_output_layers: bool = False
    #: per-token activations: ``qdq`` fake-quantizes in float (simulated); ``integer``
    #: rewrites each linear as real int8 arithmetic with standard ops (per-row scales by
    #: Abs/ReduceMax, MatMulInteger u8 x s8, rescale: the LLM.int8() vector-wise form with
    #: no float channels, ``passes/llm_int8.py``); ``auto`` the same arithmetic as our
    #: per-token quantizer (once per input tensor) feeding onnxruntime's
    #: MatMulIntegerToFloat when the kernel library loads, else ``integer`` (MiniLM
    #: quarot-w8a8, one thread: about 14 standard ops per linear become 2, and onnxruntime
    #: prepacks the weight). Activation x activation MatMuls stay QDQ.
    per_token_form: Literal["qdq", "integer", "auto"] = "qdq"
    #: int8 weight rounding: ``rtn`` (round to nearest) or ``quantease`` (QuantEase
    #: coordinate descent on tr(ΔᵀΣΔ) against each linear's calibration covariance, on the
    #: same symmetric per-channel grid; GPTQ-class, as QuaRot pairs with rotated weights)
    weight_rounding: Literal["rtn", "quantease"] = "rtn"
    #: QuantEase sweeps and relative diagonal damping of Σ (``weight_rounding: quantease``)
    quantease_iterations: int = 4
    quantease_damp: float = 0.01
    #: onnxruntime's layout: every consumer of a quantized tensor (a residual Add, say)
    #: reads the QDQ value, not only the quantized MatMuls. Off by default: it rounds
    #: the residual stream for nothing; on, it reproduces onnxruntime's model exactly.
    qdq_all_consumers: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.weight_bits != 8:
            raise ValueError(f"weight_bits={self.weight_bits}: the QDQ quantizer writes 8-bit weights")
        if self.activation_type not in ("uint8", "int8"):
            raise ValueError(f"activation_type={self.activation_type!r}: allowed 'uint8', 'int8'")
        if not isinstance(self.quantease_iterations, int) or self.quantease_iterations < 1:
            raise ValueError(f"quantease_iterations={self.quantease_iterations!r}: an integer >= 1")
        if not float(self.quantease_damp) >= 0.0:
            raise ValueError(f"quantease_damp={self.quantease_damp!r}: must be >= 0")
        if self.per_token_form in ("integer", "auto") and self.activations != "per_token":
            raise ValueError(f"per_token_form={self.per_token_form!r} needs activations: per_token")
        unknown = set(self.op_types) - {"MatMul", "Gemm"}
        if unknown:
            raise ValueError(f"op_types {sorted(unknown)} not supported: allowed MatMul, Gemm")


@dataclasses.dataclass(frozen=True)
class TensorQuant:
    """A declaration: quantize ``tensor`` where ``consumer`` reads it at ``input_index``."""

    tensor: str
    role: Literal["weight", "activation", "output"]
    mode: Literal["static", "per_token", "per_channel"]
    consumer: str | None = None
    input_index: int | None = None
    #: per-channel weights: the output-channel axis of the weight tensor
    axis: int | None = None


def plan_quantization(model: ir.Model, config: QuantConfig) -> list[TensorQuant]:
    """Declare every tensor to quantize under ``config`` (phase one)."""
    plan: list[TensorQuant] = []
    excluded = set(config.exclude_nodes)
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in config.op_types:
            continue
        if node.name in excluded or name_excluded(node.name, config.exclude):
            continue
        if config.skip_output_layers and node.outputs[0].is_graph_output():
            continue
        weight = weight_input(node)
        if weight is not None:
            index, axis = weight
            plan.append(TensorQuant(node.inputs[index].name, "weight", "per_channel", node.name, index, axis))
            if config.activations != "none":
                plan.append(TensorQuant(node.inputs[0].name, "activation", config.activations, node.name, 0))
        elif node.op_type == "MatMul" and config.dynamic_matmuls and config.activations != "none":
            declared = _attention_inputs(node, config.activations)
            if not declared:
                continue
            plan.extend(declared)
        else:
            continue
        if config.quantize_outputs and config.activations == "static":
            plan.append(TensorQuant(node.outputs[0].name, "output", "static", node.name, None))
    return plan


def _attention_inputs(node: ir.Node, mode: str) -> list[TensorQuant]:
    """Both inputs of an attention MatMul (activation x activation), else nothing."""
    if len(node.inputs) != 2 or any(v is None or is_constant(v) for v in node.inputs) or not is_attention_matmul(node):
        return []
    return [TensorQuant(value.name, "activation", mode, node.name, index) for index, value in enumerate(node.inputs)]


def attention_matmul_declarations(model: ir.Model, mode: str = "static") -> list[TensorQuant]:
    """Declarations for both inputs of every attention QKᵀ / probs·V MatMul in ``model``."""
    return [decl for node in model.graph if node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
            for decl in _attention_inputs(node, mode)]


def add_probs_residual(graph: ir.Graph, node: ir.Node, index: int) -> ir.Node:
    """Rewrite the quantized probs·V ``node`` as ``P̂·V̂ + R̂·V̂`` (``index``: the probabilities'
    input); returns the ``Add`` that now produces its old output."""
    p_hat = node.inputs[index]
    probs = quantized_source(p_hat)
    step = probs_step(node, index) if probs is not None else None
    if step is None:
        raise ValueError(f"{node.name}: input {index} is not a static zero-point-0 QDQ of probabilities")
    # named after the MatMul (node names are unique; one probability tensor may feed two)
    base = node.name
    dtype = constant_array(p_hat.producer().inputs[1]).dtype  # the probabilities' float type
    scale = add_initializer(graph, f"{base}_residual_scale", np.array(step / 254, dtype))
    zero = add_initializer(graph, f"{base}_residual_zero_point", np.array(0, np.int8))

    def make(op_type: str, inputs: list, suffix: str, like: ir.Value | None = None) -> ir.Node:
        made = ir.node(op_type, inputs=inputs, name=f"{base}_residual_{suffix}")
        made.outputs[0].name = f"{base}_residual_{suffix}_out"
        if like is not None:
            made.outputs[0].type, made.outputs[0].shape = like.type, like.shape
        return made

    out = node.outputs[0]
    residual = make("Sub", [probs, p_hat], "sub", probs)
    quantized = make("QuantizeLinear", [residual.outputs[0], scale, zero], "quantize")
    dequantized = make("DequantizeLinear", [quantized.outputs[0], scale, zero], "dequantize", probs)
    operands = list(node.inputs)
    operands[index] = dequantized.outputs[0]
    product = make("MatMul", operands, "matmul", out)
    uses = list(out.uses())
    total = make("Add", [out, product.outputs[0]], "add", out)
    graph.insert_after(node, [residual, quantized, dequantized, product, total])
    for use in uses:
        use.node.replace_input_with(use.idx, total.outputs[0])
    return total


class _Inserter:
    def __init__(self, model: ir.Model, stats: ActivationStats | None, config: QuantConfig):
        self.model = model
        self.graph = model.graph
        self.stats = stats
        self.config = config
        self.nodes_by_name = {node.name: node for node in self.graph}
        self.shared_activation: dict[tuple[str, str], ir.Value] = {}
        self.counts = {"weights": 0, "activations": 0, "outputs": 0, "per_token": 0}
        #: (consumer, input index) -> (int8 weight, scales) chosen before insertion
        self.rounded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def _range(self, tensor: str) -> tuple[float, float]:
        if self.stats is None or tensor not in self.stats:
            raise CalibrationError(f"no calibration statistics for tensor {tensor!r} (recalibrate this model)")
        st = self.stats[tensor]
        return st.tensor_min, st.tensor_max

    def _insert_before(self, anchor: ir.Node, nodes: list[ir.Node]) -> None:
        self.graph.insert_before(anchor, nodes)

    def weight(self, decl: TensorQuant) -> None:
        node = self.nodes_by_name[decl.consumer]
        value = node.inputs[decl.input_index]
        array = constant_array(value)
        if array is None or array.dtype != np.float32:
            logger.info("skip %s: weight %s is not a float32 constant", node.name, value.name)
            return
        rounded = self.rounded.get((node.name, decl.input_index))
        q, scale = rounded if rounded is not None else quantize_weight(array, decl.axis)
        # signed activations keep signed weights (s8s8); uint8 ones get the codes the CPU
        # runs exactly (numerics/int8.py)
        codes, zero = weight_codes(q, scale.shape, "signed" if self.config.activation_type == "int8" else None,
                                   reuse=rounded is None)  # fresh levels: their buffer becomes the codes
        base = value.name or f"{node.name}_weight"
        q_value = add_initializer(self.graph, f"{base}_quantized", codes)
        s_value = add_initializer(self.graph, f"{base}_scale", scale)
        z_value = add_initializer(self.graph, f"{base}_zero_point", zero)
        dq = ir.node(
            "DequantizeLinear",
            inputs=[q_value, s_value, z_value],
            attributes={"axis": decl.axis},
            name=f"{base}_DequantizeLinear",
        )
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].shape = ir.Shape(array.shape)
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        self._insert_before(node, [dq])
        node.replace_input_with(decl.input_index, dq.outputs[0])
        if value.name in self.graph.initializers:
            remove_if_unused(self.graph, value)
        self.counts["weights"] += 1

    def _first_consumer(self, value: ir.Value, consumers: set[str]) -> ir.Node:
        for node in self.graph:
            if node.name in consumers:
                return node
        raise AssertionError(f"no consumer of {value.name} found")

    def activation(self, decl: TensorQuant, consumers: set[str]) -> None:
        """Insert one QDQ pair for ``decl.tensor`` shared by every declared consumer."""
        node = self.nodes_by_name[decl.consumer]
        value = node.inputs[decl.input_index]
        key = (decl.tensor, decl.mode)
        if key in self.shared_activation and value is self.shared_activation[key]:
            return  # already rewired (qdq_all_consumers)
        if key not in self.shared_activation:
            if self.config.qdq_all_consumers and decl.mode == "static":
                consumers = {use.node.name for use in value.uses()}
            anchor = self._first_consumer(value, consumers)
            if decl.mode == "static":
                self.shared_activation[key] = self._static_qdq(value, anchor)
                self.counts["activations"] += 1
                if self.config.qdq_all_consumers:
                    dq_node = self.shared_activation[key].producer()
                    q_node = dq_node.inputs[0].producer()
                    for use in list(value.uses()):
                        if use.node is not q_node:
                            use.node.replace_input_with(use.idx, self.shared_activation[key])
            else:
                self.shared_activation[key] = self._per_token_qdq(value, anchor)
                self.counts["per_token"] += 1
        node.replace_input_with(decl.input_index, self.shared_activation[key])

    def _static_qdq(self, value: ir.Value, anchor: ir.Node) -> ir.Value:
        rmin, rmax = self._range(value.name)
        scale, zero_point = activation_scale_zero_point(rmin, rmax, self.config.activation_type)
        base = value.name
        s_value = add_initializer(self.graph, f"{base}_scale", scale)
        z_value = add_initializer(self.graph, f"{base}_zero_point", zero_point)
        q = ir.node("QuantizeLinear", inputs=[value, s_value, z_value], name=f"{base}_QuantizeLinear")
        q.outputs[0].name = f"{base}_quantized"
        dq = ir.node("DequantizeLinear", inputs=[q.outputs[0], s_value, z_value], name=f"{base}_DequantizeLinear")
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].type = value.type
        dq.outputs[0].shape = value.shape
        self._insert_before(anchor, [q, dq])
        return dq.outputs[0]

    def _per_token_qdq(self, value: ir.Value, anchor: ir.Node) -> ir.Value:
        """Symmetric per-row int8 fake quantization with standard ops (simulated)."""
        base = value.name
        opset = self.model.opset_imports.get("", 13)
        qmax = add_initializer(self.graph, f"{base}_pt_qmax", np.array(127.0, np.float32))
        qmin = add_initializer(self.graph, f"{base}_pt_qmin", np.array(-127.0, np.float32))
        tiny = add_initializer(self.graph, f"{base}_pt_eps", np.array(1e-12, np.float32))
        nodes = []

        def op(op_type, *inputs, **attributes):
            node = ir.node(op_type, inputs=list(inputs), attributes=attributes, name=f"{base}_pt_{op_type}_{len(nodes)}")
            node.outputs[0].name = f"{base}_pt_{op_type}_{len(nodes)}_out"
            nodes.append(node)
            return node.outputs[0]

        if opset >= 18:  # axes became an input of ReduceMax in opset 18
            axes = add_initializer(self.graph, f"{base}_pt_axes", np.array([-1], np.int64))
            absmax = op("ReduceMax", op("Abs", value), axes, keepdims=1)
        else:
            absmax = op("ReduceMax", op("Abs", value), axes=[-1], keepdims=1)
        scale = op("Div", op("Max", absmax, tiny), qmax)
        q = op("Clip", op("Round", op("Div", value, scale)), qmin, qmax)
        out = op("Mul", q, scale)
        out.name = f"{base}_per_token_dequantized"
        out.type = value.type
        out.shape = value.shape
        self._insert_before(anchor, nodes)
        return out

    def output(self, decl: TensorQuant) -> None:
        node = self.nodes_by_name[decl.consumer]
        value = node.outputs[0]
        users = [(use.node, use.idx) for use in value.uses()]
        if not users or value.is_graph_output():
            return
        after = users[0][0]
        for candidate in self.graph:
            if any(candidate is user for user, _ in users):
                after = candidate
                break
        dq_value = self._static_qdq(value, after)
        for user, index in users:
            user.replace_input_with(index, dq_value)
        self.counts["outputs"] += 1


def insert_qdq(model: ir.Model, plan: list[TensorQuant], stats: ActivationStats | None, config: QuantConfig,
               rounded: dict | None = None) -> dict:
    """Write the Q/DQ nodes for ``plan`` (phase two). Returns counts for the report.

    ``rounded``: ``(consumer, input index) -> (int8 weight, scales)`` to store instead of
    round-to-nearest (in the weight's own layout).
    """
    inserter = _Inserter(model, stats, config)
    inserter.rounded = dict(rounded or {})
    consumers_of: dict[tuple[str, str], set[str]] = {}
    for decl in plan:
        if decl.role == "activation":
            consumers_of.setdefault((decl.tensor, decl.mode), set()).add(decl.consumer)
    # Activations first: they anchor on the consumer before the weight DQ is placed.
    for decl in plan:
        if decl.role == "activation":
            inserter.activation(decl, consumers_of[(decl.tensor, decl.mode)])
    for decl in plan:
        if decl.role == "weight":
            inserter.weight(decl)
    for decl in plan:
        if decl.role == "output":
            inserter.output(decl)
    return inserter.counts


ActivationMode = Literal["static", "per_token", "none"]


def quantize_dequantize_nodes(x: ir.Value, scale: ir.Value, zero_point: ir.Value, base: str, *,
                              like: ir.Value) -> tuple[ir.Node, ir.Node]:
    """``DequantizeLinear(QuantizeLinear(x, scale, zero_point))``, named after ``base``; the
    caller inserts the two nodes (OutlierTune's per-channel levels on a unit grid)."""
    q = ir.node("QuantizeLinear", inputs=[x, scale, zero_point], name=f"{base}_QuantizeLinear")
    q.outputs[0].name = f"{base}_channel_quantized"
    dq = ir.node("DequantizeLinear", inputs=[q.outputs[0], scale, zero_point], name=f"{base}_DequantizeLinear")
    dq.outputs[0].name = f"{base}_channel_levels"
    dq.outputs[0].type = like.type
    dq.outputs[0].shape = like.shape
    return q, dq


def per_channel_weight_dequantize(graph: ir.Graph, levels: np.ndarray, scales: np.ndarray, axis: int,
                                  name: str) -> ir.Node:
    """A ``DequantizeLinear`` of symmetric int8 weight ``levels`` with per-channel ``scales``
    along ``axis`` (its initializers registered; the node for the caller to insert)."""
    codes, zero = weight_codes(levels, scales.shape)
    qv = add_initializer(graph, f"{name}_channel_quantized", codes)
    sv = add_initializer(graph, f"{name}_channel_scale", scales)
    zv = add_initializer(graph, f"{name}_channel_zero_point", zero)
    node = ir.node("DequantizeLinear", inputs=[qv, sv, zv], attributes={"axis": axis}, name=f"{name}_DequantizeLinear")
    node.outputs[0].name = f"{name}_dequantized"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(levels.shape)
    return node
