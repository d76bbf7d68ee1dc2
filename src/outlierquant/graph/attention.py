"""Attention patterns: the score MatMul ``Q @ Kᵀ`` (its output reaches a Softmax, its right
operand is a Transpose of the key), the probs·V MatMul and the Q/DQ around its
probabilities, and the head size on a V → O path — found from data flow, not names.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from outlierquant.graph.records import LinearGroup
from outlierquant.graph.shapes import evaluate_shape, is_int, propagate_ranks
from outlierquant.graph.tags import QK_ROTATION_KEY
from outlierquant.graph.values import constant_array, is_constant, is_scalar_constant


def group_head_dim(group: LinearGroup, ranks: dict) -> int | None:
    """The head size of a V → O path: the last axis of the first head-splitting Reshape.

    A Reshape splits heads when its last axis divides V's width. With several V heads the
    last axis is smaller than the width; with a single one (multi-query attention, e.g.
    Gemma 3 1B: one KV head of 256 channels) it equals the width, and the Reshape is a head
    split only when it adds a heads axis of size 1 just before the last (``[B, S, 1, d]``
    or ``[B, S, -1, d]``) — a ``[B·S, d] → [B, S, d]`` Reshape around a Gemm is not one.
    """

    producer = group.producer
    width = producer.linear.out_features
    for node in producer.path:
        if node.op_type != "Reshape":
            continue
        shape = node.outputs[0].shape
        target = None
        if shape is not None and len(shape) and is_int(shape[-1]):
            last = int(shape[-1])
        else:
            target = evaluate_shape(node.inputs[1], {}, ranks)
            if target is None or target.ndim != 1 or not len(target) or not is_int(target[-1]):
                continue
            last = int(target[-1])
        if 1 < last < width and width % last == 0:
            return last
        if last == width > 1 and _adds_single_head_axis(node, shape, target, ranks):
            return last
    return None


def _adds_single_head_axis(node: ir.Node, shape, target, ranks: dict) -> bool:
    """Whether Reshape ``node`` appends an axis of size 1 (or -1 over a whole last axis)
    before an unchanged last axis: ``[..., d] → [..., 1, d]``."""
    rank_in = ranks.get(node.inputs[0])
    if shape is not None and len(shape) >= 2:
        return rank_in is not None and len(shape) == rank_in + 1 and is_int(shape[-2]) and int(shape[-2]) == 1
    if target is None:
        target = evaluate_shape(node.inputs[1], {}, ranks)
    if target is None or target.ndim != 1 or len(target) < 2 or rank_in is None or len(target) != rank_in + 1:
        return False
    return is_int(target[-2]) and int(target[-2]) in (1, -1)


#: ops between the score MatMul and its Softmax (mask, scale, soft-capping, casts)
_SCORE_TO_SOFTMAX_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Tanh", "Max", "Min", "Clip"}


#: ops that keep the last axis of their first input (for finding the head size)
_LAST_AXIS_KEEPING_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity", "Where", "Expand", "Unsqueeze",
                          "Squeeze"}


@dataclasses.dataclass
class ScoreMatMul:
    """An attention score MatMul ``scores = Q @ Kᵀ`` found from the graph.

    ``key_transpose`` is the Transpose that makes ``Kᵀ`` (its input's last axis is the
    head size, the contraction axis of the MatMul); ``reason`` says why it is not rotated.
    """

    node: ir.Node
    key_transpose: ir.Node | None = None
    head_dim: int | None = None
    reason: str | None = None

    @property
    def query(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def key(self) -> ir.Value | None:
        return None if self.key_transpose is None else self.key_transpose.inputs[0]


def _reaches_softmax(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` flows into a last-axis Softmax through mask/scale/cast ops only."""
    for use in value.uses():
        node = use.node
        if node.domain != "":
            continue
        if node.op_type == "Softmax":
            axis = node.attributes.get_int("axis", -1)
            if axis == -1 or (value.shape is not None and axis == len(value.shape) - 1):
                return True
            continue
        if depth > 0 and node.op_type in _SCORE_TO_SOFTMAX_OPS and _reaches_softmax(node.outputs[0], depth - 1):
            return True
    return False


def _key_transpose(value: ir.Value, ranks: dict) -> tuple[ir.Node | None, str | None]:
    """The Transpose producing ``Kᵀ`` behind scalar scales and casts, or why there is none.

    A scale may be any tensor of rank 0 or 1 (BERT exports compute ``1/√√d`` from the
    shape at run time): broadcast against ``Kᵀ [..., d, S]`` it varies along ``S`` at
    most, so it commutes with a rotation of the ``d`` axis. Every value from the
    Transpose to the MatMul must have that one use, so that rotating the Transpose's input
    changes nothing but this score MatMul.
    """

    def scalar(v: ir.Value | None) -> bool:
        return v is not None and (is_scalar_constant(v) or ranks.get(v) in (0, 1))

    current = value
    for _ in range(8):
        node = current.producer()
        if node is None or node.domain != "":
            return None, f"the key operand {value.name!r} is not produced by a Transpose"
        if len(current.uses()) != 1 or current.is_graph_output():
            return None, f"the key operand path {current.name!r} is also read elsewhere"
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            if perm is None or len(perm) < 2 or perm[-2] != len(perm) - 1:
                return None, f"Transpose {node.name} does not move the key's last axis to the contraction axis"
            return node, None
        if node.op_type in ("Cast", "Identity"):
            current = node.inputs[0]
            continue
        if node.op_type in ("Mul", "Div") and scalar(node.inputs[1]):
            current = node.inputs[0]
            continue
        if node.op_type == "Mul" and scalar(node.inputs[0]):
            current = node.inputs[1]
            continue
        return None, f"the key operand comes from {node.op_type} {node.name}, not a transposed key"
    return None, f"no Transpose within 8 ops of the key operand {value.name!r}"


def _last_axis_size(value: ir.Value, ranks: dict, depth: int = 12) -> int | None:
    """The static size of ``value``'s last axis: from its shape, else from the head-splitting
    Reshape found upstream through ops that keep the last axis."""

    seen: set[int] = set()
    frontier = [value]
    for _ in range(depth):
        following = []
        for current in frontier:
            if current is None or id(current) in seen or is_constant(current):
                continue
            seen.add(id(current))
            if current.shape is not None and len(current.shape) and is_int(current.shape[-1]):
                return int(current.shape[-1])
            node = current.producer()
            if node is None or node.domain != "":
                continue
            op = node.op_type
            if op == "Reshape":
                target = evaluate_shape(node.inputs[1], {}, ranks)
                if target is not None and target.ndim == 1 and len(target) and is_int(target[-1]) \
                        and int(target[-1]) > 0:
                    return int(target[-1])
            elif op == "Transpose":
                perm = node.attributes.get_ints("perm", None)
                if perm is not None and perm[-1] == len(perm) - 1:
                    following.append(node.inputs[0])
            elif op == "Where":
                following.extend(node.inputs[1:])
            elif op == "Concat":
                source = _complementary_split_source(node, ranks)
                if source is not None:
                    following.append(source)  # Concat(f(X[..., :r]), X[..., r:]) keeps X's last axis
                elif node.attributes.get_int("axis", 0) not in (-1, (ranks.get(current) or 0) - 1):
                    following.extend(node.inputs)  # joined along another axis (a KV cache's past)
            elif op in ("Expand", "Unsqueeze", "Squeeze"):
                following.append(node.inputs[0])
            elif op in _LAST_AXIS_KEEPING_OPS:
                following.extend(node.inputs)
        frontier = following
    return None


def _last_axis_slice(value: ir.Value | None, ranks: dict) -> ir.Node | None:
    """The Slice over the last axis behind ``value`` through ops that keep the last axis."""
    frontier, seen = [value], set()
    for _ in range(4):
        following = []
        for current in frontier:
            node = current.producer() if current is not None else None
            if node is None or node.domain != "" or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Slice":
                axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
                rank = ranks.get(node.inputs[0])
                steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
                if (axes is not None and axes.size == 1 and rank is not None
                        and int(axes.reshape(-1)[0]) % rank == rank - 1
                        and (steps is None or int(steps.reshape(-1)[0]) == 1)):
                    return node
                continue
            if node.op_type in _LAST_AXIS_KEEPING_OPS:
                following.extend(v for v in node.inputs if v is not None and not is_constant(v))
        frontier = following
    return None


def _same_expression(a: ir.Value | None, b: ir.Value | None, depth: int = 4) -> bool:
    """Whether two small int expressions are the same: one value, equal constants, or the
    same op with the same attributes over the same inputs (exporters recompute a bound)."""
    if a is b:
        return True
    if a is None or b is None or depth == 0:
        return False
    ca, cb = constant_array(a), constant_array(b)
    if ca is not None or cb is not None:
        return ca is not None and cb is not None and ca.shape == cb.shape and bool(np.all(ca == cb))
    na, nb = a.producer(), b.producer()
    if na is None or nb is None or na.op_type != nb.op_type or na.domain != nb.domain:
        return False
    if len(na.inputs) != len(nb.inputs) or {k: str(v.value) for k, v in na.attributes.items()} != \
            {k: str(v.value) for k, v in nb.attributes.items()}:
        return False
    return all(_same_expression(x, y, depth - 1) for x, y in zip(na.inputs, nb.inputs))


def _complementary_split_source(node: ir.Node, ranks: dict) -> ir.Value | None:
    """``X`` when last-axis Concat ``node`` joins ``f(X[..., :r])`` and ``X[..., r:]``, the
    partial rotary embedding (Phi-3, GPT-NeoX): its output's last axis is ``X``'s."""
    if len(node.inputs) != 2:
        return None
    head = _last_axis_slice(node.inputs[0], ranks)
    tail = node.inputs[1].producer() if node.inputs[1] is not None else None
    if head is None or tail is None or _last_axis_slice(node.inputs[1], ranks) is not tail:
        return None
    if head.inputs[0] is not tail.inputs[0]:
        return None
    start = constant_array(head.inputs[1])
    end = constant_array(tail.inputs[2])
    if start is None or start.size != 1 or int(start.reshape(-1)[0]) != 0:
        return None
    if end is None or end.size != 1 or int(end.reshape(-1)[0]) < 2**31:
        return None
    if not _same_expression(head.inputs[2], tail.inputs[1]):
        return None
    return head.inputs[0]


def find_score_matmuls(model: ir.Model) -> list[ScoreMatMul]:
    """Every attention score MatMul: both operands activations and the output flowing into
    a Softmax over the last axis; with the key's Transpose and the head size, or a reason."""

    ranks = propagate_ranks(model.graph, list(model.graph))
    found = []
    for node in model.graph:
        if node.domain != "" or node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        if any(v is None or is_constant(v) for v in node.inputs) or not _reaches_softmax(node.outputs[0]):
            continue
        match = ScoreMatMul(node)
        found.append(match)
        match.key_transpose, match.reason = _key_transpose(node.inputs[1], ranks)
        if match.reason is not None:
            continue
        producer = match.query.producer()
        if producer is not None and QK_ROTATION_KEY in producer.metadata_props:
            match.reason = "already rotated by rotate-qk"
            continue
        query_dim, key_dim = _last_axis_size(match.query, ranks), _last_axis_size(match.key, ranks)
        if query_dim is None and key_dim is None:
            match.reason = "head size not found on the query or key path"
        elif query_dim is not None and key_dim is not None and query_dim != key_dim:
            match.reason = f"query head size {query_dim} differs from the key's {key_dim}"
        else:
            match.head_dim = query_dim if query_dim is not None else key_dim
    return found


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
