"""Edits of linear layers and norm→linear groups, shared by every rewrite.

Weights are written back in each linear's own layout; a linear is replaced by the nodes a
builder writes (``replace_linear``); per-channel scales (and shifts) are folded into a
group's producer — norm γ/β or the producing linear's columns — and the inverse into the
consumers' weight rows, or inserted as explicit ops where nothing can absorb them.
``check_group`` is the one place that says why a group cannot be rewritten, and
``name_excluded`` the one meaning of every pass's ``exclude`` option.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx_ir as ir

from outlierquant.graph.records import Linear, LinearGroup
from outlierquant.graph.values import add_initializer, constant_array, first_in_graph, set_input_constant, unique_name
from outlierquant.numerics.slabs import slabs

if TYPE_CHECKING:  # statistics are read, never built, here
    from outlierquant.calibration.stats import ActivationStats


def splittable(linear: Linear) -> str | None:
    """Why ``linear`` cannot be rewritten as ``x @ W[K, N]`` (+ bias), or None when it can."""
    node = linear.node
    if linear.op_type not in ("MatMul", "Gemm"):
        return f"{linear.op_type} is not a MatMul/Gemm"
    weight = constant_array(linear.weight)
    if weight is None or weight.dtype != np.float32:
        return "weight is not a float32 constant"
    if weight.ndim != 2:
        return f"weight has rank {weight.ndim} (expected 2)"
    if linear.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0):
            return "Gemm with transA"
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return "Gemm with alpha/beta != 1"
    return None


def _gemm_bias(linear: Linear) -> np.ndarray | None:
    if linear.op_type == "Gemm" and len(linear.node.inputs) > 2 and linear.node.inputs[2] is not None:
        return constant_array(linear.node.inputs[2])
    return None


def replace_linear(graph: ir.Graph, linear: Linear, build, label: str) -> list[ir.Node]:
    """Replace ``linear.node`` by the nodes ``build(tape, x) -> y`` writes.

    Nodes and initializers get unique names prefixed ``label``; a Gemm's bias is added
    after ``y``. Returns the inserted nodes (graph order).
    """
    tape = ir.tape.Tape()
    x = linear.node.inputs[0]
    y = build(tape, x)
    bias = _gemm_bias(linear)
    if bias is not None:
        y = tape.op("Add", [y, tape.initializer(ir.tensor(bias.astype(np.float32)), name=f"{label}_bias")])
    for value in tape.initializers:
        value.name = unique_name(graph, value.name)
        graph.register_initializer(value)
    for index, node in enumerate(tape.nodes):
        node.name = f"{label}/{node.op_type}_{index}"
        for j, output in enumerate(node.outputs):
            if output.name is None:  # "" marks an optional output left out on purpose
                output.name = f"{label}/{node.op_type}_{index}_out{j}"
    old = linear.node.outputs[0]
    y.type = old.type
    y.shape = old.shape
    graph.insert_before(linear.node, tape.nodes)
    replace_value(graph, old, y)
    constants = [v for v in linear.node.inputs[1:] if v is not None]
    graph.remove(linear.node, safe=True)
    for value in constants:
        if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]
    return list(tape.nodes)


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every reader of ``old`` reads ``new``; a graph output keeps its name."""
    was_output = old.is_graph_output()
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:  # keep the model's output name
        old.name = f"{name}_replaced"
        new.name = name


def linear_label(linear: Linear, suffix: str) -> str:
    base = (linear.node.name or linear.output.name or "linear").strip("/").replace("/", "_")
    return f"{base}_{suffix}"


def name_excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """The ``exclude`` option of every pass: a pattern with ``*``, ``?`` or ``[`` is matched
    against the whole node name (fnmatch); a plain string matches any name containing it."""
    for pattern in patterns:
        if not pattern:
            continue
        if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return True
        if pattern in name:
            return True
    return False


def is_excluded(linear: Linear, exclude: tuple[str, ...]) -> bool:
    return name_excluded(linear.node.name or "", exclude)


def write_linear_weight(graph: ir.Graph, linear, weight_kn, hint: str) -> None:
    """Store a ``[K, N]`` weight back in ``linear``'s own layout (MatMul or Gemm transB)."""
    if linear.weight_layout == "in_out":
        array = weight_kn
    elif linear.weight_layout == "out_in":
        array = weight_kn.T
    else:
        raise ValueError(f"{linear.name}: Conv weights are not rewritten")
    set_input_constant(graph, linear.node, 1, array, hint)


def rescale_linear_weight(graph: ir.Graph, linear, hint: str, *, rows: np.ndarray | None = None,
                          columns: np.ndarray | None = None) -> None:
    """``W ← diag(rows) · W · diag(columns)`` for a ``[K, N]`` weight, stored back in the
    weight's own layout and dtype (:func:`rescaled_linear_weight`)."""
    set_input_constant(graph, linear.node, 1, rescaled_linear_weight(linear, rows=rows, columns=columns), hint)


def rescaled_linear_weight(linear, *, rows: np.ndarray | None = None, columns: np.ndarray | None = None,
                           dtype=None) -> np.ndarray:
    """``diag(rows) · W · diag(columns)`` of a linear's ``[K, N]`` weight, in float64 and cast
    to ``dtype`` (default: the weight's), in its stored layout.

    The same values as ``(weight_array() * rows[:, None] * columns[None, :])`` cast, computed
    a slab of the stored array at a time: for an LM head (65536 x 512) that product and its
    transposed cast held several copies of the weight at once, the largest memory peak of
    the smoothing passes.
    """
    stored = constant_array(linear.node.inputs[1])
    if linear.weight_layout == "in_out":
        left, right = rows, columns
    elif linear.weight_layout == "out_in":
        left, right = columns, rows
    else:
        raise ValueError(f"{linear.name}: Conv weights are not rewritten")
    out = np.empty(stored.shape, stored.dtype if dtype is None else dtype)
    for part in slabs(stored.shape[0], int(np.prod(stored.shape[1:], dtype=np.int64))):
        slab = np.asarray(stored[part], dtype=np.float64)
        if left is not None:
            slab = slab * np.asarray(left[part], np.float64)[:, None]
        if right is not None:
            slab = slab * np.asarray(right, np.float64)[None, :]
        out[part] = slab
    return out


def map_linear_weight_columns(graph: ir.Graph, linear, hint: str, fn) -> None:
    """``W[:, c] ← fn(W[:, c])`` for the output columns of a ``[K, N]`` weight: ``fn`` takes
    a float64 ``[K, n]`` block of columns and returns the new ``[K, n]`` block; the result is
    stored back in the weight's own layout and dtype.

    Built a slab of columns at a time, so a vocabulary-wide weight (an LM head a rotation
    rewrites) is never held in float64 whole; every column is its own product, the same
    one the whole-matrix ``fn`` computes (up to the BLAS's blocking of it).
    """
    stored = constant_array(linear.node.inputs[1])
    if linear.weight_layout not in ("in_out", "out_in"):
        raise ValueError(f"{linear.name}: Conv weights are not rewritten")
    out = np.empty(stored.shape, stored.dtype)
    if linear.weight_layout == "in_out":  # [K, N]
        for part in slabs(stored.shape[1], stored.shape[0]):
            out[:, part] = fn(np.asarray(stored[:, part], dtype=np.float64))
    else:  # [N, K]: a column of W is a stored row
        for part in slabs(stored.shape[0], stored.shape[1]):
            out[part] = fn(np.asarray(stored[part], dtype=np.float64).T).T
    set_input_constant(graph, linear.node, 1, out, hint)


def _bias_slot(linear: Linear) -> tuple[ir.Node, int]:
    if linear.bias_node is not None:
        return linear.bias_node, next(i for i, v in enumerate(linear.bias_node.inputs) if v is linear.bias)
    return linear.node, 2


def write_bias(graph: ir.Graph, linear: Linear, bias: np.ndarray, hint: str) -> None:
    """Set the linear's bias (adding an ``Add`` after it when it has none)."""
    if linear.bias is not None:
        node, index = _bias_slot(linear)
        old_shape = constant_array(linear.bias).shape
        set_input_constant(graph, node, index, bias.reshape(old_shape), hint)
        return
    if not np.any(bias):
        return
    output = linear.node.outputs[0]
    value = add_initializer(graph, hint, bias.astype(np.float32))
    add = ir.node("Add", inputs=[output, value], name=f"{linear.name}_rotation_bias")
    add.outputs[0].name = f"{output.name}_biased"
    add.outputs[0].type = output.type
    add.outputs[0].shape = output.shape
    for use in list(output.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, add.outputs[0])
    if output.is_graph_output():  # the Add takes over the output's place and name
        name = output.name
        output.name = f"{name}_unbiased"
        add.outputs[0].name = name
        for i, value in enumerate(graph.outputs):
            if value is output:
                graph.outputs[i] = add.outputs[0]
    graph.insert_after(linear.node, [add])


def group_weight_rows(group: LinearGroup) -> list[np.ndarray]:
    """Each linear's weight as ``[K, N]``, as stored (float32; a view, no copy).

    The estimates that read them (row abs-max, the α search's error sums) widen a slab of
    rows at a time to float64, which gives the values a float64 copy would: float32 →
    float64 is exact. Whole float64 copies of an LM head were 256 MiB each.
    """
    return [linear.weight_array() for linear in group.linears]


def scale_input_vector(node: ir.Node, index: int, factor: np.ndarray, graph: ir.Graph, hint: str,
                  shift: np.ndarray | None = None) -> None:
    """``v ← (v − shift) · factor`` for a constant vector input broadcast along the last axis."""
    value = node.inputs[index]
    array = np.asarray(constant_array(value), dtype=np.float64)
    shape = array.shape
    flat = array.reshape(-1) if array.size == factor.size else np.broadcast_to(array.reshape(-1), factor.shape)
    if shift is not None:
        flat = flat - shift
    new = (flat * factor).reshape(shape if array.size == factor.size else factor.shape)
    set_input_constant(graph, node, index, new, hint)


def _norm_affine_nodes(norm) -> tuple[tuple[ir.Node, int] | None, tuple[ir.Node, int] | None]:
    """(node, input index) of γ and β within the norm."""
    gamma = beta = None
    for node in norm.nodes:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if norm.gamma is not None and value is norm.gamma and gamma is None:
                gamma = (node, index)
            if norm.beta is not None and value is norm.beta and beta is None:
                beta = (node, index)
    return gamma, beta


def fold_into_producer(graph: ir.Graph, group: LinearGroup, s_producer: np.ndarray,
                       shift_producer: np.ndarray | None = None) -> None:
    """Apply ``x ← (x − shift) / s`` inside the group's foldable producer.

    ``s_producer`` / ``shift_producer`` are indexed by the *producer's* output channels
    (equal to the group's input channels unless a channel map — GQA — intervenes).
    """
    producer = group.producer
    inverse = 1.0 / s_producer
    if producer.kind == "norm":
        norm = producer.norm
        gamma, beta = _norm_affine_nodes(norm)
        if gamma is None:
            raise ValueError(f"norm {norm.name} has no γ to fold into")
        scale_input_vector(gamma[0], gamma[1], inverse, graph, f"{norm.name}_gamma_folded")
        if beta is not None:
            scale_input_vector(beta[0], beta[1], inverse, graph, f"{norm.name}_beta_folded", shift_producer)
        elif shift_producer is not None and np.any(shift_producer):
            raise ValueError(f"norm {norm.name} has no β to absorb a shift")
        return
    if producer.kind == "linear":
        linear = producer.linear
        rescale_linear_weight(graph, linear, f"{linear.name}_weight_folded", columns=inverse)
        if linear.bias is not None:
            index = bias_input_index(linear)
            scale_input_vector(linear.bias_node or linear.node, index, inverse, graph, f"{linear.name}_bias_folded",
                          shift_producer)
        elif shift_producer is not None and np.any(shift_producer):
            raise ValueError(f"linear {linear.name} has no bias to absorb a shift")
        return
    raise ValueError(f"group producer {producer.kind!r} cannot absorb a scale")


def bias_input_index(linear: Linear) -> int:
    if linear.bias_node is not None:
        return next(i for i, v in enumerate(linear.bias_node.inputs) if v is linear.bias)
    return 2  # Gemm C / Conv B


def scale_consumers(graph: ir.Graph, group: LinearGroup, s: np.ndarray, shift: np.ndarray | None = None) -> None:
    """``W ← diag(s)·W`` (and ``b ← b + shift @ W`` for a shift) for every linear of the group."""
    for linear in group.linears:
        if shift is not None and np.any(shift):
            if linear.bias is None:
                raise ValueError(f"linear {linear.name} has no bias to absorb a shift")
            correction = shift @ np.asarray(linear.weight_array(), dtype=np.float64)
            scale_input_vector(linear.bias_node or linear.node, bias_input_index(linear), np.ones_like(correction), graph,
                          f"{linear.name}_bias_shifted", -correction)
        rescale_linear_weight(graph, linear, f"{linear.name}_weight_smoothed", rows=s)


def insert_channel_ops(graph: ir.Graph, group: LinearGroup, s: np.ndarray, shift: np.ndarray | None = None) -> int:
    """Insert ``Mul(x, 1/s)`` (after ``Sub(x, shift)`` when shifting) before the group; returns ops inserted."""
    x = group.input
    first = first_in_graph(graph, [linear.node for linear in group.linears])
    base = x.name or "smooth_input"
    nodes: list[ir.Node] = []
    current = x
    if shift is not None and np.any(shift):
        z = add_initializer(graph, f"{base}_shift", shift.astype(np.float32))
        sub = ir.node("Sub", inputs=[current, z], name=f"{base}_Shift")
        sub.outputs[0].name = f"{base}_shifted"
        nodes.append(sub)
        current = sub.outputs[0]
    inv = add_initializer(graph, f"{base}_inv_scale", (1.0 / s).astype(np.float32))
    mul = ir.node("Mul", inputs=[current, inv], name=f"{base}_Smooth")
    mul.outputs[0].name = f"{base}_smoothed"
    nodes.append(mul)
    for node_ in nodes:
        node_.outputs[0].type = x.type
        node_.outputs[0].shape = x.shape
    graph.insert_before(first, nodes)
    for linear in group.linears:
        linear.node.replace_input_with(0, mul.outputs[0])
    return len(nodes)


def producer_channels(group: LinearGroup, values: np.ndarray, reduce=np.maximum) -> tuple[np.ndarray, np.ndarray | None]:
    """Aggregate a per-input-channel array onto the producer's channels (GQA: several → one).

    Returns (per-producer-channel array, channel_map or None for identity).
    """
    cmap = group.producer.channel_map
    if cmap is None or (len(cmap) == len(values) and np.array_equal(cmap, np.arange(len(values)))):
        return values, None
    cmap = np.asarray(cmap)
    out = np.full(int(cmap.max()) + 1, np.nan)
    for j, c in enumerate(cmap):
        out[c] = values[j] if np.isnan(out[c]) else reduce(out[c], values[j])
    return out, cmap


def check_group(group: LinearGroup, stats: ActivationStats, *, allow_insert: bool,
                relations: Sequence[str]) -> str:
    """Why the group cannot be rewritten ("" when it can)."""
    name = group.input.name
    producer = group.producer
    if producer.relation not in relations:
        return f"relation {producer.relation!r} not selected by the recipe"
    if any(linear.weight_layout == "conv" for linear in group.linears):
        return "Conv consumers are not handled"
    if name not in stats:
        return f"no calibration statistics for {name}"
    if stats[name].channels != group.in_features:
        return f"statistics of {name} have {stats[name].channels} channels, the linears read {group.in_features}"
    for linear in group.linears:
        if len(linear.weight.uses()) != 1:
            return f"weight of {linear.name} is shared with another node"
    if not producer.foldable and not allow_insert:
        return f"no foldable producer ({producer.reason or producer.relation}) and insert_mul is off"
    return ""


def group_label(group: LinearGroup) -> str:
    return ", ".join(linear.name for linear in group.linears)


def transform_group_channels(graph: ir.Graph, group: LinearGroup, s: np.ndarray, shift: np.ndarray | None = None, *,
                             s_producer: np.ndarray | None = None) -> int:
    """``x ← (x − shift) / s`` on the group's input channels and the inverse on its linears:
    folded into the producer when it can absorb it (``s_producer``: ``s`` in the producer's
    channel order, when a channel map lies between), else inserted as ops. Returns the ops
    inserted (0 when folded)."""
    if group.producer.foldable:
        fold_into_producer(graph, group, s if s_producer is None else s_producer, shift)
        inserted = 0
    else:
        inserted = insert_channel_ops(graph, group, s, shift)
    scale_consumers(graph, group, s, shift)
    return inserted
