"""Ranks and small shape expressions: a static propagation of tensor ranks through the graph
and an evaluator for the ``Shape → Gather → Concat → Reshape`` arithmetic exporters write,
with unknown dimensions kept symbolic. Enough to tell whether a Reshape keeps the last
axis or splits heads; never a full shape inference.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from outlierquant.graph.values import constant_array


class _Sym:
    """An unknown dimension (a batch or sequence length read from a Shape)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "?"


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


_UNARY_RANK_OPS = {
    "Cast", "Identity", "Dropout", "Relu", "Erf", "Sqrt", "Sigmoid", "Tanh", "Neg", "Softmax", "Reciprocal",
    "LayerNormalization", "RMSNormalization", "Gelu", "LeakyRelu", "Exp", "Log", "Abs", "IsNaN", "Not",
    "Cos", "Sin", "Softplus", "HardSigmoid", "HardSwish", "Elu", "Selu", "Mish", "Clip", "Trilu",
    "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Conv",
    "Slice", "Concat", "Tile", "Pad", "ScatterND", "ScatterElements", "Split", "CumSum", "GatherElements",
    "Floor", "Ceil", "Round", "Sign", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
}


_BROADCAST_RANK_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "And", "Or",
                       "Max", "Min", "LessOrEqual", "GreaterOrEqual", "Mod", "Sum"}


def propagate_ranks(graph: ir.Graph, nodes: list[ir.Node]) -> dict[ir.Value, int]:
    """Rank of every value we can tell, in one topological sweep."""
    ranks: dict[ir.Value, int] = {}

    def rank(value: ir.Value | None) -> int | None:
        if value is None:
            return None
        if value in ranks:
            return ranks[value]
        if value.shape is not None:
            return len(value.shape)
        if value.const_value is not None:
            return len(value.const_value.shape)
        array = constant_array(value)
        return None if array is None else array.ndim

    for value in list(graph.inputs) + list(graph.initializers.values()):
        r = rank(value)
        if r is not None:
            ranks[value] = r
    for node in nodes:
        op = node.op_type
        result: int | None = None
        inputs = [rank(v) for v in node.inputs]
        if op == "Constant":
            result = rank(node.outputs[0])
        elif op in _UNARY_RANK_OPS or (op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2")
                                       and node.attributes.get_int("keepdims", 1) == 1):
            result = inputs[0] if inputs else None
        elif op in _BROADCAST_RANK_OPS:
            known = [r for r, v in zip(inputs, node.inputs) if v is not None]
            result = max(known) if known and all(r is not None for r in known) else None
        elif op == "MatMul" and None not in inputs[:2]:
            result = max(inputs[0], inputs[1])
        elif op == "Gemm":
            result = 2
        elif op == "Gather" and None not in inputs[:2]:
            result = inputs[0] - 1 + inputs[1]
        elif op == "Transpose":
            result = inputs[0]
        elif op in ("Unsqueeze", "Squeeze"):
            axes = axes_of(node)
            if inputs[0] is not None and axes is not None:
                result = inputs[0] + (len(axes) if op == "Unsqueeze" else -len(axes))
        elif op in ("Reshape", "Expand", "ConstantOfShape"):
            shape_input = node.inputs[1] if op != "ConstantOfShape" else node.inputs[0]
            length = _shape_length(shape_input, ranks)
            if length is not None:
                result = length if op != "Expand" or inputs[0] is None else max(length, inputs[0])
        elif op in ("Shape", "Range"):
            result = 1
        elif op == "Flatten":
            result = 2
        for output in node.outputs:
            r = result if output.shape is None else len(output.shape)
            if r is not None:
                ranks[output] = r
    return ranks


def _shape_length(value: ir.Value | None, ranks: dict) -> int | None:
    if value is None:
        return None
    if value.shape is not None and len(value.shape) == 1 and is_int(value.shape[0]):
        return int(value.shape[0])
    evaluated = evaluate_shape(value, {}, ranks)
    return None if evaluated is None else len(evaluated)


def evaluate_shape(value: ir.Value | None, tracked: dict, ranks: dict, depth: int = 0) -> np.ndarray | None:
    """:func:`_evaluate_shape_expression`, with None for expressions numpy rejects."""
    budget = [_SHAPE_EVAL_BUDGET]
    try:
        return _evaluate_shape_expression(value, tracked, ranks, depth, budget)
    except (ValueError, TypeError, IndexError, ZeroDivisionError):
        return None


_SHAPE_EVAL_BUDGET = 256
#: the largest constant a shape expression reads (shapes, axes, index tables)
_SHAPE_CONSTANT_LIMIT = 4096


_SHAPE_DTYPES = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL}


def _evaluate_shape_expression(
    value: ir.Value | None, tracked: dict, ranks: dict, depth: int, budget: list[int]
) -> np.ndarray | None:
    """Partially evaluate a small int64 shape expression.

    Elements are ints or :class:`_Sym` (an unknown dim). ``Shape`` of a tracked tensor
    gives its channel axes' sizes; everything else read from a ``Shape`` is unknown.
    Returns a 1-D object array (or 0-D for scalars), or None when not evaluable.
    """
    if value is None or depth > 40 or budget[0] <= 0:
        return None
    budget[0] -= 1
    array = constant_array(value)
    if array is not None:
        array = np.asarray(array)
        # a weight, not a shape expression: converting it to objects cost ~30 s per sweep
        # on a quantized SmolLM2 (Shape of a DequantizeLinear reaches its int8 weight)
        return array.astype(object) if array.size <= _SHAPE_CONSTANT_LIMIT else None
    if value.dtype is not None and value.dtype not in _SHAPE_DTYPES:
        return None  # a data tensor, not a shape expression
    node = value.producer()
    if node is None or node.domain != "":
        return None
    op = node.op_type

    def evaluate(item: ir.Value | None) -> np.ndarray | None:
        return _evaluate_shape_expression(item, tracked, ranks, depth + 1, budget)

    args = lambda: [evaluate(v) for v in node.inputs]  # noqa: E731
    if op == "Shape":
        source = node.inputs[0]
        if source in tracked:
            dims = np.array([_Sym() if e is None else e for e in tracked[source].entries], dtype=object)
        elif source.shape is not None:
            dims = np.array([int(d) if is_int(d) else _Sym() for d in source.shape], dtype=object)
        elif ranks.get(source, 0) > 1:
            dims = np.array([_Sym() for _ in range(ranks[source])], dtype=object)
        else:
            inner = evaluate(source)  # the shape of a shape expression
            if inner is not None:
                dims = np.array(list(inner.shape), dtype=object)
            elif source in ranks:
                dims = np.array([_Sym() for _ in range(ranks[source])], dtype=object)
            else:
                return None
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        return dims[start:end]
    if op in ("Cast", "Identity"):
        return args()[0]
    if op == "Gather":
        data, indices = args()[:2]
        if data is None or indices is None or node.attributes.get_int("axis", 0) != 0:
            return None
        try:
            return data[np.asarray(indices, dtype=np.int64)]
        except (IndexError, TypeError, ValueError):
            return None
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        data = args()[0]
        if data is None:
            return None
        if op == "Unsqueeze":
            axes = axes_of(node)
            if axes is None:
                return None
            for axis in sorted(axes):
                data = np.expand_dims(data, axis)
            return data
        if op == "Squeeze":
            axes = axes_of(node)
            return np.squeeze(data, axis=tuple(axes)) if axes is not None else np.squeeze(data)
        if op == "Reshape":
            target = evaluate(node.inputs[1])
            if target is None or not all(is_int(t) for t in target):
                return None
            return data.reshape([int(t) for t in target])
        return data.reshape(-1)
    if op == "Concat":
        parts = args()
        if any(p is None for p in parts):
            return None
        return np.concatenate([np.atleast_1d(p) for p in parts], axis=node.attributes.get_int("axis", 0))
    if op == "ConstantOfShape":
        shape = args()[0]
        if shape is None or not all(is_int(s) for s in shape):
            return None
        fill = node.attributes.get("value")
        fill_value = fill.as_tensor().numpy().reshape(-1)[0].item() if fill is not None else 0
        return np.full([int(s) for s in shape], fill_value, dtype=object)
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = args()[:2]
        if a is None or b is None:
            return None
        function = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
                    "Div": lambda x, y: x // y if y else _Sym()}[op]
        combine = np.frompyfunc(lambda x, y: function(x, y) if is_int(x) and is_int(y) else _Sym(), 2, 1)
        return np.asarray(combine(a, b), dtype=object)
    if op == "Equal":
        a, b = args()[:2]
        if a is None or b is None:
            return None
        outcome = np.asarray(np.frompyfunc(_symbolic_equal, 2, 1)(a, b), dtype=object)
        if any(o is None for o in np.atleast_1d(outcome)):
            return None
        return outcome
    if op == "Where":
        condition, a, b = args()[:3]
        if condition is None or a is None or b is None:
            return None
        return np.where(condition.astype(bool), a, b).astype(object)
    if op == "Slice":
        data, starts, ends = args()[:3]
        axes = args()[3] if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = args()[4] if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if data is None or starts is None or ends is None or data.ndim != 1:
            return None
        if axes is not None and [int(a) for a in axes] not in ([0], [-1]):
            return None
        step = int(steps[0]) if steps is not None else 1
        return data[int(starts[0]):int(ends[0]):step]
    return None


def _symbolic_equal(x, y):
    if is_int(x) and is_int(y):
        return bool(x == y)
    if x is y:
        return True
    # an unknown dim is a size, never negative
    if (is_int(y) and y < 0 and isinstance(x, _Sym)) or (is_int(x) and x < 0 and isinstance(y, _Sym)):
        return False
    return None


def cast_target(node: ir.Node):
    to = node.attributes.get_int("to", None)
    return None if to is None else ir.DataType(to)


def axes_of(node: ir.Node) -> list[int] | None:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    return None if axes is None else list(axes)


def reshape_keeps_last_axis(node: ir.Node, width: int) -> bool:
    """Whether a Reshape keeps ``width`` channels on the last axis (unknown counts as yes)."""

    shape = node.outputs[0].shape
    if shape is not None and len(shape) and is_int(shape[-1]):
        return int(shape[-1]) == width
    target = evaluate_shape(node.inputs[1], {}, {})
    if target is None or target.ndim != 1 or not len(target):
        return True  # checked by the equivalence tests; the exporters' reshapes keep it
    last = target[-1]
    return not is_int(last) or int(last) == width
