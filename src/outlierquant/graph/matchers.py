"""Pattern matchers for single structures: a linear and its following bias ``Add``, a fused
norm op, and the decomposed LayerNorm / RMSNorm chains exporters write (with ``Cast``
nodes anywhere along them). Found from op types, constants and data flow, never names.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from outlierquant.graph.records import Linear, Norm
from outlierquant.graph.shapes import is_int
from outlierquant.graph.tags import KEEP_FLOAT_KEY
from outlierquant.graph.values import MS_DOMAIN, SHAPE_ONLY_OPS, constant_array, is_constant

logger = logging.getLogger(__name__)


def match_linear(node: ir.Node) -> Linear | None:
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm", "Conv"):
        return None
    if KEEP_FLOAT_KEY in node.metadata_props:  # a pass's float side path, not a layer to quantize
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    activation, weight = node.inputs[0], node.inputs[1]
    if is_constant(activation) or not is_constant(weight):
        return None
    shape = _const_shape(weight)
    if shape is None:
        return None
    bias = None
    bias_node = None
    output = node.outputs[0]
    if node.op_type == "MatMul":
        if len(shape) != 2:
            return None
        layout, in_features, out_features = "in_out", shape[0], shape[1]
        bias, bias_node = _following_bias(output, out_features)
        if bias_node is not None:
            output = bias_node.outputs[0]
    elif node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0) != 0 or attrs.get_float("alpha", 1.0) != 1.0 or len(shape) != 2:
            logger.debug("Gemm %s with transA/alpha not recognised as a linear", node.name)
            return None
        trans_b = attrs.get_int("transB", 0)
        layout = "out_in" if trans_b else "in_out"
        in_features, out_features = (shape[1], shape[0]) if trans_b else (shape[0], shape[1])
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias_shape = _const_shape(node.inputs[2])
            if not is_constant(node.inputs[2]) or attrs.get_float("beta", 1.0) != 1.0 or bias_shape is None \
                    or int(np.prod(bias_shape)) != out_features:
                logger.debug("Gemm %s with a non-constant or scaled C not recognised as a linear", node.name)
                return None
            bias = node.inputs[2]
    else:
        if len(shape) < 3 or node.attributes.get_int("group", 1) != 1:
            return None
        layout, in_features, out_features = "conv", shape[1], shape[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if not is_constant(node.inputs[2]):
                return None
            bias = node.inputs[2]
    return Linear(
        node=node,
        op_type=node.op_type,
        input=activation,
        weight=weight,
        weight_layout=layout,
        bias=bias,
        bias_node=bias_node,
        in_features=int(in_features),
        out_features=int(out_features),
        output=output,
    )


def _following_bias(output: ir.Value, out_features: int) -> tuple[ir.Value | None, ir.Node | None]:
    """The constant of an Add right after a MatMul that broadcasts along the output axis."""
    uses = [use for use in output.uses() if use.node.op_type not in SHAPE_ONLY_OPS]
    if len(uses) != 1 or output.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - uses[0].idx]
    if not is_constant(other):
        return None, None
    shape = _const_shape(other)
    if shape is None or len(shape) == 0 or shape[-1] != out_features or any(d != 1 for d in shape[:-1]):
        return None, None
    return other, add


def _is_constant_derived(value: ir.Value | None, depth: int = 0) -> bool:
    """A constant, or computed from constants only (e.g. ``Transpose(W)`` of a tied weight)."""
    if value is None or is_constant(value):
        return value is not None
    node = value.producer()
    if node is None or depth > 4 or not node.inputs:
        return False
    return all(v is None or _is_constant_derived(v, depth + 1) for v in node.inputs)


def _const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(int(d) for d in value.const_value.shape.numpy())
    array = constant_array(value)
    return None if array is None else tuple(array.shape)


def match_norm(node: ir.Node) -> Norm | None:
    op, domain = node.op_type, node.domain
    if domain == "" and op in ("LayerNormalization", "RMSNormalization"):
        kind = "layernorm" if op == "LayerNormalization" else "rmsnorm"
        gamma = _input_or_none(node, 1)
        beta = _input_or_none(node, 2) if kind == "layernorm" else None
        return Norm(kind, (node,), node.inputs[0], node.outputs[0], gamma, beta,
                    node.attributes.get_int("axis", -1))
    if domain == MS_DOMAIN and op in ("SimplifiedLayerNormalization", "SkipLayerNormalization",
                                       "SkipSimplifiedLayerNormalization"):
        if op == "SimplifiedLayerNormalization":
            return Norm("rmsnorm", (node,), node.inputs[0], node.outputs[0], _input_or_none(node, 1), None,
                        node.attributes.get_int("axis", -1))
        kind = "skiplayernorm" if op == "SkipLayerNormalization" else "skiprmsnorm"
        beta = _input_or_none(node, 3) if kind == "skiplayernorm" else None
        return Norm(kind, (node,), node.inputs[0], node.outputs[0], _input_or_none(node, 2), beta, -1)
    if domain == "" and op == "ReduceMean":
        return match_decomposed_norm(node)
    return None


def _input_or_none(node: ir.Node, index: int) -> ir.Value | None:
    if len(node.inputs) > index and node.inputs[index] is not None and is_constant(node.inputs[index]):
        return node.inputs[index]
    return None


def _real_uses(value: ir.Value) -> list:
    return [use for use in value.uses() if use.node.op_type not in SHAPE_ONLY_OPS]


def _sole_consumer(value: ir.Value, nodes: list[ir.Node]) -> ir.Node | None:
    """The single consumer of ``value`` after skipping a chain of Casts (recorded in ``nodes``)."""
    current = value
    while True:
        uses = _real_uses(current)
        if len(uses) != 1 or current.is_graph_output():
            return None
        node = uses[0].node
        if node.op_type == "Cast" and node.domain == "":
            nodes.append(node)
            current = node.outputs[0]
            continue
        return node


def _skip_casts_forward(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    current = value
    while True:
        uses = _real_uses(current)
        if len(uses) == 1 and uses[0].node.op_type == "Cast" and not current.is_graph_output():
            nodes.append(uses[0].node)
            current = uses[0].node.outputs[0]
            continue
        return current


def _strip_casts(value: ir.Value | None) -> ir.Value | None:
    while value is not None and value.producer() is not None and value.producer().op_type == "Cast":
        value = value.producer().inputs[0]
    return value


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(_strip_casts(value)) if value is not None else None
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _reduce_axes(node: ir.Node) -> list[int] | None:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    if axes is None or node.attributes.get_int("keepdims", 1) != 1:
        return None
    return list(axes)


def _squared_operand(value: ir.Value) -> tuple[ir.Value, ir.Node] | None:
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Pow" and _scalar(node.inputs[1]) == 2.0:
        return node.inputs[0], node
    if node.op_type == "Mul" and node.inputs[0] is node.inputs[1] and node.inputs[0] is not None:
        return node.inputs[0], node
    return None


def match_decomposed_norm(reduce_node: ir.Node) -> Norm | None:
    """Match a decomposed LayerNorm/RMSNorm whose variance is ``reduce_node``."""
    axes = _reduce_axes(reduce_node)
    if axes is None or len(axes) != 1:
        return None
    squared = _squared_operand(reduce_node.inputs[0])
    if squared is None:
        return None
    base, square_node = squared
    nodes: list[ir.Node] = [square_node, reduce_node]
    kind, norm_input = "rmsnorm", base
    centered = _strip_casts(base).producer()
    if centered is not None and centered.op_type == "Sub" and centered.domain == "":
        mean_node = _strip_casts(centered.inputs[1]).producer()
        if (mean_node is not None and mean_node.op_type == "ReduceMean" and _reduce_axes(mean_node) == axes
                and _strip_casts(mean_node.inputs[0]) is _strip_casts(centered.inputs[0])):
            kind, norm_input = "layernorm", centered.inputs[0]
            nodes = [mean_node, centered, *nodes]
    add = _sole_consumer(reduce_node.outputs[0], nodes)
    if add is None or add.op_type != "Add" or not any(is_constant(v) for v in add.inputs):
        return None
    nodes.append(add)
    sqrt = _sole_consumer(add.outputs[0], nodes)
    if sqrt is None or sqrt.op_type != "Sqrt":
        return None
    nodes.append(sqrt)
    step = _sole_consumer(sqrt.outputs[0], nodes)
    if step is None:
        return None
    numerator = None
    normalize_node = None
    if step.op_type == "Div" and _strip_casts(step.inputs[1]) is not None and not is_constant(step.inputs[0]):
        numerator, normalize_node = step.inputs[0], step
    elif (step.op_type == "Reciprocal") or (step.op_type == "Div" and _scalar(step.inputs[0]) == 1.0):
        nodes.append(step)
        multiply = _sole_consumer(step.outputs[0], nodes)
        if multiply is None or multiply.op_type != "Mul":
            return None
        inverse = [v for v in multiply.inputs if _strip_casts(v) is _strip_casts(step.outputs[0])
                   or v is step.outputs[0]]
        others = [v for v in multiply.inputs if v not in inverse]
        if len(others) != 1:
            return None
        numerator, normalize_node = others[0], multiply
    if numerator is None or not _same_source(numerator, base):
        return None
    nodes.append(normalize_node)
    output = _skip_casts_forward(normalize_node.outputs[0], nodes)
    gamma = beta = None
    gamma_node = _affine_consumer(output, "Mul")
    if gamma_node is not None:
        gamma = next(v for v in gamma_node.inputs if is_constant(v))
        nodes.append(gamma_node)
        output = _skip_casts_forward(gamma_node.outputs[0], nodes)
        beta_node = _affine_consumer(output, "Add")
        if beta_node is not None:
            beta = next(v for v in beta_node.inputs if is_constant(v))
            nodes.append(beta_node)
            output = beta_node.outputs[0]
    return Norm(kind, tuple(nodes), norm_input, output, gamma, beta, axes[0])


def _same_source(a: ir.Value, b: ir.Value) -> bool:
    a, b = _strip_casts(a), _strip_casts(b)
    if a is b:
        return True
    pa, pb = a.producer(), b.producer()
    # LayerNorm spellings compute ``x - mean`` twice (once for the variance)
    return (pa is not None and pb is not None and pa.op_type == pb.op_type == "Sub"
            and list(pa.inputs) == list(pb.inputs))


def _affine_consumer(value: ir.Value, op: str) -> ir.Node | None:
    """The γ Mul / β Add right after a normalised value: one consumer, a 1-D-ish constant."""
    uses = _real_uses(value)
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    if node.op_type != op or node.domain != "" or len(node.inputs) != 2:
        return None
    constants = [v for v in node.inputs if is_constant(v)]
    if len(constants) != 1:
        return None
    shape = _const_shape(constants[0])
    if shape is None or len(shape) == 0 or shape[-1] <= 1 or any(d != 1 for d in shape[:-1]):
        return None
    return node


def norm_channels(norm: Norm) -> int | None:
    if norm.gamma is not None:
        shape = _const_shape(norm.gamma)
        if shape:
            return int(shape[-1])
    shape = norm.output.shape
    if shape is not None and len(shape) and is_int(shape[norm.axis]):
        return int(shape[norm.axis])
    return None


