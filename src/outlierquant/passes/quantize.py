"""Quantization: QDQ insertion for the linear layers.

Two phases, as in onnxruntime's QDQ quantizer: :func:`plan_quantization` *declares* which
tensors are quantized, how, and along which axis (one :class:`TensorQuant` each);
:func:`insert_qdq` is the one place that writes Q/DQ nodes. Other passes (LLM.int8()
split, weight-only int4, per-token activations) add or change declarations, not nodes.

Formats (``r = s · (q − z)``):

- weights: int8, symmetric (``z = 0``), per output channel: ``s_n = max_k |W_kn| / 127``
  — onnxruntime's choice for QInt8 symmetric, so the int8 grid is [−127, 127];
- static activations: uint8, asymmetric, one scale per tensor from the calibrated range
  (zero included): ``s = (max − min) / 255``, ``z = round(−min / s)``. uint8 activations
  take MLAS's u8×s8 kernels, ~11x faster than s8×s8 on the CPUs we target;
- per-token activations (``per_token``): symmetric int8 with ``s_t = max_k |X_tk| / 127``
  computed at run time, written with standard ops (simulated: onnxruntime runs it in float).

Why our own inserter instead of ``onnxruntime.quantization.quantize_static``: its
calibration runs on whatever batches it is given and has no notion of padding (on MiniLM
padded calibration batches push the attention-score range to −3.4e38 and cosine falls
from 0.82 to 0.37); it round-trips the model through temporary files with shape
inference; it materializes every weight; and it has no per-token or blocked forms the
outlier methods need. We keep its conventions (ranges, rounding, QDQ layout) so that the
same choices give the same model — ``tests/test_quantize.py`` checks our ``w8a8`` against
its static QDQ with identical settings.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats
from outlierquant.errors import CalibrationError
from outlierquant.passes.base import OutlierPass, add_initializer, constant_array, is_constant, remove_if_unused

logger = logging.getLogger(__name__)

ActivationMode = Literal["static", "per_token", "none"]


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
    #: node names left in float (e.g. a sensitive lm_head)
    exclude_nodes: tuple[str, ...] = ()
    #: leave linears whose output is a graph output (an lm_head) in float, as QuaRot and
    #: bitsandbytes' LLM.int8() integration do
    skip_output_layers: bool = False
    #: per-token activations: ``qdq`` fake-quantizes in float (simulated); ``integer``
    #: rewrites each linear as real int8 arithmetic with standard ops (per-row scales by
    #: Abs/ReduceMax, MatMulInteger u8 x s8, rescale: the LLM.int8() vector-wise form with
    #: no float channels, ``passes/split.py``). Activation x activation MatMuls stay QDQ.
    per_token_form: Literal["qdq", "integer"] = "qdq"
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
        if self.weight_bits != 8:
            raise ValueError(f"weight_bits={self.weight_bits}: the QDQ quantizer writes 8-bit weights")
        if self.activations not in ("static", "per_token", "none"):
            raise ValueError(f"activations={self.activations!r}: allowed 'static', 'per_token', 'none'")
        if self.activation_type not in ("uint8", "int8"):
            raise ValueError(f"activation_type={self.activation_type!r}: allowed 'uint8', 'int8'")
        if self.weight_rounding not in ("rtn", "quantease"):
            raise ValueError(f"weight_rounding={self.weight_rounding!r}: allowed 'rtn', 'quantease'")
        if not isinstance(self.quantease_iterations, int) or self.quantease_iterations < 1:
            raise ValueError(f"quantease_iterations={self.quantease_iterations!r}: an integer >= 1")
        if not float(self.quantease_damp) >= 0.0:
            raise ValueError(f"quantease_damp={self.quantease_damp!r}: must be >= 0")
        if self.per_token_form not in ("qdq", "integer"):
            raise ValueError(f"per_token_form={self.per_token_form!r}: allowed 'qdq', 'integer'")
        if self.per_token_form == "integer" and self.activations != "per_token":
            raise ValueError("per_token_form='integer' needs activations: per_token")
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


def _weight_input(node: ir.Node) -> tuple[int, int] | None:
    """(index of the constant weight input, its output-channel axis) or None."""
    if node.op_type == "MatMul":
        weight = node.inputs[1]
        if is_constant(weight) and not is_constant(node.inputs[0]):
            array_rank = len(weight.shape) if weight.shape is not None else 2
            return 1, array_rank - 1
        return None
    if node.op_type == "Gemm":
        weight = node.inputs[1]
        if not is_constant(weight):
            return None
        trans_b = node.attributes.get_int("transB", 0)
        return 1, 0 if trans_b else 1
    return None


def plan_quantization(model: ir.Model, config: QuantConfig) -> list[TensorQuant]:
    """Declare every tensor to quantize under ``config`` (phase one)."""
    plan: list[TensorQuant] = []
    excluded = set(config.exclude_nodes)
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in config.op_types:
            continue
        if node.name in excluded:
            continue
        if config.skip_output_layers and node.outputs[0].is_graph_output():
            continue
        weight = _weight_input(node)
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


#: ops between an attention MatMul and its Softmax (mask, scale, layout, dtype)
_ATTENTION_PATH_OPS = frozenset({"Add", "Mul", "Div", "Where", "Cast", "Reshape", "Transpose", "Dropout", "Identity"})


def is_attention_matmul(node: ir.Node, depth: int = 4) -> bool:
    """Whether an activation x activation MatMul is attention's QKᵀ (its output reaches a
    Softmax) or probs·V (an input comes from a Softmax), through mask/scale/layout ops.

    Other activation x activation MatMuls — the rotary embedding's ``inv_freq @ positions``
    — are not attention: rounding positions 0..127 to 255 levels shifts every rotary angle.
    """
    frontier = [node.outputs[0]]
    for _ in range(depth):
        following = []
        for value in frontier:
            for use in value.uses():
                if use.node.op_type == "Softmax":
                    return True
                if use.node.op_type in _ATTENTION_PATH_OPS:
                    following.extend(use.node.outputs)
        frontier = following
    return _reads_softmax(node.inputs, depth)


def _reads_softmax(values, depth: int) -> bool:
    """Whether one of ``values`` is computed from a Softmax through mask/scale/layout ops."""
    frontier = list(values)
    for _ in range(depth):
        preceding = []
        for value in frontier:
            producer = value.producer() if value is not None else None
            if producer is None:
                continue
            if producer.op_type == "Softmax":
                return True
            if producer.op_type in _ATTENTION_PATH_OPS or producer.op_type == "IsNaN":
                preceding.extend(producer.inputs)  # Where(IsNaN(p), 0, p) guards exported probs
        frontier = preceding
    return False


def _attention_inputs(node: ir.Node, mode: str) -> list[TensorQuant]:
    """Both inputs of an attention MatMul (activation x activation), else nothing."""
    if len(node.inputs) != 2 or any(v is None or is_constant(v) for v in node.inputs) or not is_attention_matmul(node):
        return []
    return [TensorQuant(value.name, "activation", mode, node.name, index) for index, value in enumerate(node.inputs)]


def attention_matmul_declarations(model: ir.Model, mode: str = "static") -> list[TensorQuant]:
    """Declarations for both inputs of every attention QKᵀ / probs·V MatMul in ``model``."""
    return [decl for node in model.graph if node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
            for decl in _attention_inputs(node, mode)]


# -- attention probabilities: a second int8 pass on the rounding residual --------------------
#
# A static uint8 grid for softmax probabilities has the step s = max P / 255 ≈ 1/255, so
# every probability below s/2 ≈ 0.002 rounds to zero. An LLM whose heads park most of their
# attention on a sink token leaves the rest spread thinly over the other keys: on
# SmolLM2-135M 0.9-2.1 % of the attention mass sits below s/2 in every layer
# (all-MiniLM-L6-v2: 0.06-0.34 %), and probs·V loses it. Writing P = P̂ + R, with
# R = P − P̂ in [−s/2, s/2] (while P stays within the calibrated range; above it P̂ clips
# and R̂ saturates at ±s/2) quantized symmetric int8 at step s/254, gives
#
#     P·V̂ ≈ P̂·V̂ + R̂·V̂
#
# two int8 MatMuls (onnxruntime fuses each DQ-MatMul pair into MatMulIntegerToFloat)
# whose probabilities carry ~15 bits between them. No runtime op computes an int16 GEMM,
# and a float probs·V would leave the MatMul unquantized.


def probs_input_index(node: ir.Node, depth: int = 4) -> int | None:
    """The input of a quantized probs·V MatMul whose ``DQ(Q(·))`` reads softmax probabilities."""
    for index, value in enumerate(node.inputs):
        source = quantized_source(value)
        if source is not None and _reads_softmax([source], depth):
            return index
    return None


def quantized_source(value: ir.Value | None) -> ir.Value | None:
    """``x`` when ``value`` is ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``, else None."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.inputs[0]


def probs_step(node: ir.Node, index: int) -> float | None:
    """The step of the probabilities' static QDQ, or None when it is not one uint8 scale with
    zero point 0 (the residual form assumes that grid)."""
    q = node.inputs[index].producer().inputs[0].producer()
    scale = constant_array(q.inputs[1])
    zero_point = constant_array(q.inputs[2]) if len(q.inputs) > 2 else None
    if scale is None or scale.size != 1 or zero_point is None or zero_point.size != 1:
        return None
    if zero_point.dtype != np.uint8 or zero_point.reshape(-1)[0] != 0:
        return None
    return float(scale.reshape(-1)[0])


def lost_mass(probs: np.ndarray, step: float, query_mask: np.ndarray | None = None) -> tuple[float, float]:
    """(mass at or below ``step / 2``, total mass) of a probability tensor: QuantizeLinear at
    that step rounds the first to zero (half to even), so their ratio is the share it drops.

    ``query_mask`` (``[B, T]``, 0 at padding) drops the rows of padded queries from a
    ``[B, H, T, T]`` tensor: their softmax rows are not attention anyone reads.
    """
    probs = np.asarray(probs)
    if query_mask is not None and probs.ndim == 4 and query_mask.shape == (probs.shape[0], probs.shape[2]):
        probs = probs.transpose(0, 2, 1, 3)[np.asarray(query_mask).astype(bool)]
    return float(probs[probs <= step / 2].sum(dtype=np.float64)), float(probs.sum(dtype=np.float64))


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


# -- scale math ----------------------------------------------------------------------------


def weight_scales(weight: np.ndarray, axis: int, bits: int = 8) -> np.ndarray:
    """Symmetric per-channel scales along ``axis`` (the output channels)."""
    qmax = 2 ** (bits - 1) - 1
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    absmax = np.abs(weight).max(axis=reduce_axes).astype(np.float32)
    scale = absmax / np.float32(qmax)
    return np.where(scale > np.finfo(np.float32).tiny, scale, np.float32(1.0)).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and their scales (round half to even, as QuantizeLinear)."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scales(weight, axis, bits)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.rint(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantease_int8_weight(weight_kn: np.ndarray, sigma: np.ndarray, iterations: int = 4, *,
                          fixed_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int8 ``[K, N]`` weights and per-output-channel scales on the symmetric grid of
    :func:`quantize_weight` (scale ``max|w|/127``), the levels chosen by QuantEase
    coordinate descent on ``tr(ΔᵀΣΔ)`` instead of rounding each weight to nearest.
    ``fixed_rows``: input rows held at zero (LLM.int8()'s float channels)."""
    from outlierquant.passes.weight_rounding import GroupGrid, quantease_round

    weight_kn = np.asarray(weight_kn, dtype=np.float32)
    k = weight_kn.shape[0]
    scale = weight_scales(weight_kn, 1)
    # one group of K rows per output column; uint8 levels 1..255 around zero point 128
    grid = GroupGrid("per_oc", k, 8, scale[None, :].astype(np.float32), np.full((1, scale.size), 128, np.uint8))
    fixed = None
    if fixed_rows is not None and len(fixed_rows):
        fixed = np.zeros(weight_kn.shape, dtype=bool)
        fixed[np.asarray(fixed_rows, dtype=np.int64)] = True
    levels = quantease_round(weight_kn, sigma, grid, iterations=iterations, fixed=fixed)
    q = np.clip(levels - 128, -127, 127).astype(np.int8)
    return q, scale


def activation_scale_zero_point(rmin: float, rmax: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric uint8 (or symmetric int8) per-tensor parameters for a calibrated range."""
    rmin = min(float(rmin), 0.0)
    rmax = max(float(rmax), 0.0)
    if dtype == "uint8":
        scale = np.float32((rmax - rmin) / 255.0)
        if not scale > np.finfo(np.float32).tiny:
            return np.array(1.0, np.float32), np.array(0, np.uint8)
        zero_point = np.uint8(np.clip(np.rint(-rmin / scale), 0, 255))
        return np.array(scale, np.float32), np.array(zero_point, np.uint8)
    absmax = max(abs(rmin), abs(rmax))
    scale = np.float32(absmax / 127.0)
    if not scale > np.finfo(np.float32).tiny:
        scale = np.float32(1.0)
    return np.array(scale, np.float32), np.array(0, np.int8)


# -- phase two: the one place that writes nodes ----------------------------------------


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
        base = value.name or f"{node.name}_weight"
        q_value = add_initializer(self.graph, f"{base}_quantized", q)
        s_value = add_initializer(self.graph, f"{base}_scale", scale)
        z_value = add_initializer(self.graph, f"{base}_zero_point", np.zeros_like(scale, dtype=np.int8))
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


class QuantizeQDQPass(OutlierPass):
    """Insert QDQ nodes: int8 per-channel weights, uint8 static (or per-token) activations."""

    name = "quantize"
    needs_stats = True
    options_type = QuantConfig

    @property
    def config(self) -> QuantConfig:
        return self.options

    def calibration_targets(self, model: ir.Model) -> list:
        from outlierquant.calibration.collect import CalibrationTarget, quantizable_targets

        targets = quantizable_targets(model, outputs=self.config.quantize_outputs)
        if self.config.quantize_outputs:
            # the plan quantizes every planned MatMul's output, attention MatMuls included
            known = {target.tensor for target in targets}
            for decl in plan_quantization(model, self.config):
                if decl.role == "output" and decl.tensor not in known:
                    targets.append(CalibrationTarget(decl.tensor, -1, decl.consumer or "", "output"))
                    known.add(decl.tensor)
        return targets

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """The inputs of the planned linears when QuantEase rounds the weights (needs Σ)."""
        if self.config.weight_rounding != "quantease":
            return []
        nodes = {node.name: node for node in model.graph}
        return sorted({nodes[d.consumer].inputs[0].name for d in plan_quantization(model, self.config)
                       if d.role == "weight" and d.input_index == 1})

    def _rounded_weights(self, model: ir.Model, plan: list[TensorQuant]) -> dict:
        """QuantEase int8 levels for every planned ``x @ W`` weight (Gemm transB transposed)."""
        from outlierquant.passes.weight_rounding import second_moment

        stats = self.require_stats()
        nodes = {node.name: node for node in model.graph}
        rounded = {}
        for decl in plan:
            node = nodes[decl.consumer]
            if decl.role != "weight" or decl.input_index != 1 or node.inputs[0].name not in stats:
                continue
            array = constant_array(node.inputs[1])
            if array is None or array.dtype != np.float32 or array.ndim != 2:
                continue
            transposed = node.op_type == "Gemm" and decl.axis == 0  # stored [N, K]
            weight_kn = array.T if transposed else array
            st = stats[node.inputs[0].name]
            if st.channels != weight_kn.shape[0]:
                continue
            sigma, _ = second_moment(st, self.config.quantease_damp)
            q, scale = quantease_int8_weight(weight_kn, sigma, self.config.quantease_iterations)
            rounded[(node.name, 1)] = (np.ascontiguousarray(q.T) if transposed else q, scale)
        return rounded

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        plan = plan_quantization(model, self.config)
        rounded = self._rounded_weights(model, plan) if self.config.weight_rounding == "quantease" else {}
        integer_layers: list[str] = []
        if self.config.per_token_form == "integer":
            plan, integer_layers = _rewrite_integer_per_token(model, plan, rounded)
        stats = self.stats if self.config.activations == "static" else None
        counts = insert_qdq(model, plan, stats, self.config, rounded)
        layers = sorted({d.consumer for d in plan if d.role == "weight"} | set(integer_layers))
        record = {
            "quantease_rounded_weights": len(rounded),
            "integer_per_token_layers": len(integer_layers),
            "config": dataclasses.asdict(self.config),
            "quantized_weights": counts["weights"],
            "static_activation_qdq": counts["activations"],
            "per_token_activation_qdq": counts["per_token"],
            "quantized_outputs": counts["outputs"],
            "linear_layers": len(layers),
            "simulated": counts["per_token"] > 0,
        }
        logger.info(
            "quantized %d weights, %d static activation tensors, %d per-token",
            counts["weights"],
            counts["activations"],
            counts["per_token"],
        )
        return bool(plan), record


def _rewrite_integer_per_token(model: ir.Model, plan: list[TensorQuant],
                               rounded: dict | None = None) -> tuple[list[TensorQuant], list[str]]:
    """Replace each planned linear by real per-token int8 arithmetic (standard ops).

    Returns the rest of the plan (the declarations of the linears that could not be
    rewritten, and the activation x activation MatMuls) and the rewritten linears' names.
    """
    from outlierquant.passes.analysis import analyze_graph
    from outlierquant.passes.split import LlmInt8Options, mixed_int8_builder, replace_linear, splittable

    weighted = {d.consumer for d in plan if d.role == "weight"}
    analysis = analyze_graph(model)
    opset = model.opset_imports.get("", 13)
    options = LlmInt8Options(kernels="never", standard_form="integer")
    done: list[str] = []
    for node in list(model.graph):
        if node.name not in weighted:
            continue
        linear = analysis.linear_for_node(node)
        if linear is None or splittable(linear) is not None:
            continue
        weight = np.asarray(linear.weight_array(), dtype=np.float32)
        label = f"{node.name or 'linear'}_pt_int8"
        prepared = (rounded or {}).get((node.name, 1))
        if prepared is not None and node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            prepared = (np.ascontiguousarray(prepared[0].T), prepared[1])  # back to [K, N]
        build = mixed_int8_builder(weight, np.zeros(0, np.int64), label, "integer", options, opset,
                                    prepared=prepared)
        replace_linear(model.graph, linear, build, label)
        done.append(node.name)
    rewritten = set(done)
    return [d for d in plan if d.consumer not in rewritten], done
