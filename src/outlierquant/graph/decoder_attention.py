"""The attention core of a decoder exported with its KV cache, found from data flow.

optimum's with-past export of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM ...)
writes each layer's attention as::

    q = Transpose(Reshape(q_proj, [B, S, N, H]))            k, v likewise with Nkv heads
    q_rot = q * cos + rotate_half(q) * sin                   k_rot likewise (same cos, sin)
    present_key = Concat(past_key, k_rot, axis=-2)           present_value = Concat(past_value, v)
    K = Reshape(Expand(Unsqueeze(present_key)))              (grouped heads repeated N / Nkv times)
    P = Softmax(scale_q * q_rot @ (scale_k * K)ᵀ + mask)    (+ IsNaN → Where(0) guard)
    out = Reshape(Transpose(P @ V), [B, S, N·H])

:func:`match_decoder_attention` finds the pieces a fused kernel needs (the three linear
outputs, the past/present cache values, the rotary tables as functions of the positions, the
additive mask and the scale) or raises :class:`NoMatch` with the reason. A quantizer's Q/DQ on
the attention operands, and a second MatMul on the probabilities' rounding residual, are
allowed between the Softmax and the head-merging Transpose: they are quantization of the
same ``P @ V``, which the fused kernel computes in float.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from outlierquant.graph.attention import quantized_source
from outlierquant.graph.shapes import evaluate_shape, is_int
from outlierquant.graph.values import constant_array, is_constant

_STD = ("", "ai.onnx")
#: ops that may sit between the probabilities and the head-merging Transpose: P @ V, its
#: quantization (Q/DQ on P and V) and the rounding-residual MatMul ``(P - P̂) @ V̂`` added back
_PROBS_REGION = {"QuantizeLinear", "DequantizeLinear", "MatMul", "Sub", "Add"}


class NoMatch(Exception):
    """Why a Softmax is not the attention core of a with-past decoder."""


@dataclasses.dataclass
class DecoderAttention:
    softmax: ir.Node
    q: ir.Value  # [B, S, N·H] linear outputs
    k: ir.Value
    v: ir.Value
    heads: int
    kv_heads: int
    head_size: int
    scale: float
    mask: ir.Value | None  # additive, [B, 1|N, S, T]
    past_key: ir.Value  # graph inputs [B, Nkv, P, H]
    past_value: ir.Value
    present_key: ir.Value  # graph outputs [B, Nkv, P + S, H]
    present_value: ir.Value
    cos: ir.Value  # [B, S, H] rotary tables, functions of the positions
    sin: ir.Value
    output: ir.Value  # [B, S, N·H]
    shape_readers: list[ir.Node]  # Shape nodes of the cache tensors read outside the core
    quantized: int  # quantization ops inside the core that the fused form drops


def _std(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in _STD and node.op_type in ops


def _ints(value: ir.Value | None, ranks: dict, *, partial: bool = False) -> list | None:
    """A constant (or constant-foldable shape) int list; with ``partial``, entries that
    depend on run-time sizes are None."""
    array = constant_array(value)
    if array is None:
        array = evaluate_shape(value, {}, ranks) if value is not None else None
    if array is None:
        return None
    items = [int(a) if is_int(a) else None for a in np.asarray(array).reshape(-1)]
    return items if partial or None not in items else None


def _reshape_heads(node: ir.Node, width, ranks: dict) -> tuple[int, int] | None:
    """(heads, head_size) of a Reshape to [B, S|N, heads|S, H]-style 4-D targets, where the
    heads entry may be -1 (inferred from a known ``width`` = heads · H)."""
    target = _ints(node.inputs[1], ranks, partial=True)
    if target is None or len(target) != 4 or target[3] is None or target[3] < 1:
        return None
    heads = target[2]
    if heads == -1 and is_int(width) and int(width) % target[3] == 0:
        heads = int(width) // target[3]
    return (heads, target[3]) if heads is not None and heads > 0 else None


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    result = float(np.asarray(array, dtype=np.float64).reshape(-1)[0])
    return result if np.isfinite(result) else None


def _strip_scales(value: ir.Value, label: str) -> tuple[ir.Value, float, int]:
    """Walk up through Q/DQ pairs and Mul/Div by constant scalars."""
    factor, quantized = 1.0, 0
    for _ in range(8):
        source = quantized_source(value)
        if source is not None:
            value, quantized = source, quantized + 2
            continue
        node = value.producer()
        if _std(node, "Mul", "Div"):
            f = _scalar(node.inputs[1])
            if f is None and node.op_type == "Mul":
                f, data = _scalar(node.inputs[0]), node.inputs[1]
            else:
                data = node.inputs[0]
            if f is None or f == 0.0:
                raise NoMatch(f"{label}: {node.op_type} {node.name} is not a scale by a constant scalar")
            factor = factor * f if node.op_type == "Mul" else factor / f
            value = data
            continue
        break
    return value, factor, quantized


def _width(value: ir.Value, depth: int = 4):
    """The last-axis size of a linear output: its shape, else its weight's (through a bias
    Add, a weight DequantizeLinear, or onnxruntime's MatMulNBits ``N``)."""
    if value.shape is not None and len(value.shape) >= 1 and is_int(value.shape[-1]):
        return int(value.shape[-1])
    node = value.producer()
    if node is None or depth == 0:
        return None
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N", None)
    if node.op_type in ("MatMul", "MatMulIntegerToFloat", "MatMulInteger") and len(node.inputs) > 1:
        weight = node.inputs[1]
        dq = weight.producer()
        if _std(dq, "DequantizeLinear"):
            weight = dq.inputs[0]
        array = constant_array(weight)
        return int(array.shape[-1]) if array is not None and array.ndim == 2 else None
    if node.op_type == "Add":
        for item in node.inputs:
            found = _width(item, depth - 1) if item is not None else None
            if found is not None:
                return found
    return None


def _split_heads(value: ir.Value, label: str, ranks: dict) -> tuple[ir.Value, int, int]:
    """``(linear, heads, head_size)`` for ``Transpose(0,2,1,3)(Reshape(linear, [B, S, N, H]))``."""
    transpose = value.producer()
    if not _std(transpose, "Transpose") or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        raise NoMatch(f"{label}: not the (0, 2, 1, 3) head transpose of a linear output")
    reshape = transpose.inputs[0].producer()
    linear = reshape.inputs[0] if _std(reshape, "Reshape") else None
    if linear is not None and linear.shape is not None and len(linear.shape) != 3:
        raise NoMatch(f"{label}: the head-splitting Reshape reads a rank-{len(linear.shape)} value, not [B, S, hidden]")
    width = _width(linear) if linear is not None else None
    found = _reshape_heads(reshape, width, ranks) if linear is not None else None
    if found is None:
        raise NoMatch(f"{label}: not a Reshape of a [B, S, hidden] value to [B, S, heads, head_size] with "
                      "constant heads and head size")
    return linear, found[0], found[1]


def _head_expression(value: ir.Value | None, x: ir.Value, head_size: int, depth: int = 8) -> int | None:
    """An integer expression of ``Shape(x)`` where only ``x``'s last axis (the head size) is
    known: the exporter writes rotate_half's bounds as ``Shape(x)[-1] // 2``."""
    array = constant_array(value)
    if array is not None:
        return int(np.asarray(array).reshape(-1)[0]) if np.asarray(array).size == 1 else None
    node = value.producer() if value is not None else None
    if node is None or depth == 0 or node.domain not in _STD:
        return None
    if node.op_type == "Gather" and _std(node.inputs[0].producer(), "Shape") and node.inputs[0].producer().inputs[0] is x:
        index = constant_array(node.inputs[1])
        return head_size if index is not None and int(np.asarray(index).reshape(-1)[0]) in (-1, 3) else None
    if node.op_type in ("Cast", "Unsqueeze", "Squeeze", "Identity"):
        return _head_expression(node.inputs[0], x, head_size, depth - 1)
    if node.op_type in ("Div", "Mul", "Add", "Sub"):
        a, b = (_head_expression(v, x, head_size, depth - 1) for v in node.inputs[:2])
        if a is None or b is None or (node.op_type == "Div" and b == 0):
            return None
        return a // b if node.op_type == "Div" else {"Mul": a * b, "Add": a + b, "Sub": a - b}[node.op_type]
    return None


def _slice_bounds(node: ir.Node, ranks: dict, head_size: int | None = None) -> tuple[int, int, int] | None:
    """(start, end, axis) of a one-axis, step-1 Slice with constant bounds (or bounds computed
    from the sliced tensor's head size)."""
    if not _std(node, "Slice") or len(node.inputs) < 4:
        return None
    starts, ends, axes = (_ints(v, ranks) for v in node.inputs[1:4])
    if head_size is not None:
        starts, ends = ([h] if h is not None else None for h in (
            starts[0] if starts else _head_expression(node.inputs[1], node.inputs[0], head_size),
            ends[0] if ends else _head_expression(node.inputs[2], node.inputs[0], head_size)))
    steps = _ints(node.inputs[4], ranks) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or steps != [1]:
        return None
    return starts[0], ends[0], axes[0]


def _rotary(value: ir.Value, head_size: int, label: str, ranks: dict) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``(x, cos, sin)`` for ``value = x * Unsqueeze(cos) + rotate_half(x) * Unsqueeze(sin)``,
    rotate_half(x) = Concat(-x[..., H/2:], x[..., :H/2]) over the whole head (not partial)."""
    add = value.producer()
    if not _std(add, "Add") or not all(_std(v.producer() if v is not None else None, "Mul") for v in add.inputs):
        raise NoMatch(f"{label}: not x·cos + rotate_half(x)·sin (no Add of two Muls)")
    half = head_size // 2
    muls = [v.producer() for v in add.inputs]
    for direct, rotated in (muls, muls[::-1]):
        for concat_side in (0, 1):
            concat = rotated.inputs[concat_side].producer()
            if not _std(concat, "Concat") or len(concat.inputs) != 2 \
                    or concat.attributes.get_int("axis", 0) not in (-1, 3):
                continue
            neg, tail = concat.inputs[0].producer(), concat.inputs[1].producer()
            head = neg.inputs[0].producer() if _std(neg, "Neg") else None
            hb, tb = (_slice_bounds(n, ranks, head_size) if n is not None else None for n in (head, tail))
            if hb is None or tb is None or head.inputs[0] is not tail.inputs[0]:
                continue
            x = head.inputs[0]
            if hb[2] not in (-1, 3) or tb[2] not in (-1, 3) or hb[0] != half or hb[1] < head_size \
                    or tb[0] != 0 or tb[1] != half:
                raise NoMatch(f"{label}: rotate_half slices [{hb[0]}:{hb[1]}] and [{tb[0]}:{tb[1]}] are not the two "
                              f"halves of a {head_size}-wide head (partial rotary)")
            if x not in direct.inputs:
                continue
            cos = direct.inputs[1 - list(direct.inputs).index(x)]
            sin = rotated.inputs[1 - concat_side]
            tables = []
            for table in (cos, sin):
                unsqueeze = table.producer()
                axes = _ints(unsqueeze.inputs[1], ranks) if _std(unsqueeze, "Unsqueeze") and len(unsqueeze.inputs) > 1 else None
                if axes != [1]:
                    raise NoMatch(f"{label}: the rotary table {table.name!r} is not Unsqueeze([B, S, H], axis 1)")
                tables.append(unsqueeze.inputs[0])
            return x, tables[0], tables[1]
    raise NoMatch(f"{label}: not x·cos + rotate_half(x)·sin over the whole head")


def _shape_readers(value: ir.Value, label: str, *, cache_heads: bool) -> list[ir.Node]:
    """The Shape nodes reading a [B, heads, T, H] cache tensor for its batch, length or head
    size only (the export slices the causal mask to ``Shape(K)[2]``); with ``cache_heads``
    (the cache tensor itself, not the grouped-head repeat) for its heads too."""
    allowed = (0, 1, 2, 3, -1, -2, -3, -4) if cache_heads else (0, 2, 3, -1, -2, -4)
    readers = []
    for use in value.uses():
        node = use.node
        if not _std(node, "Shape"):
            continue
        if node.attributes.get_int("start", 0) != 0 or node.attributes.get_int("end", None) is not None:
            raise NoMatch(f"{label}: Shape {node.name} reads part of the cache shape")
        for gather_use in node.outputs[0].uses():
            gather = gather_use.node
            index = constant_array(gather.inputs[1]) if _std(gather, "Gather") and gather_use.idx == 0 else None
            if index is None or index.size != 1 or int(np.asarray(index).reshape(-1)[0]) not in allowed:
                raise NoMatch(f"{label}: the cache's Shape {node.name} feeds {gather.op_type} {gather.name}, "
                              "not a read of its batch, length or head size")
        readers.append(node)
    return readers


def _cache_side(value: ir.Value, graph: ir.Graph, heads: int, label: str,
                ranks: dict) -> tuple[ir.Node, list[ir.Node]]:
    """The ``Concat(past, new)`` cache node behind a key/value operand, through the grouped-
    head repeat ``Reshape(Expand(Unsqueeze(x, 2)), [B, N, T, H])``; and the Shape nodes that
    read the cache's size outside the attention core."""
    node, readers = value.producer(), []
    if _std(node, "Reshape"):
        readers += _shape_readers(node.outputs[0], label, cache_heads=False)
        target = _ints(node.inputs[1], ranks, partial=True)
        expand = node.inputs[0].producer()
        unsqueeze = expand.inputs[0].producer() if _std(expand, "Expand") else None
        axes = _ints(unsqueeze.inputs[1], ranks) if _std(unsqueeze, "Unsqueeze") and len(unsqueeze.inputs) > 1 else None
        if target is None or len(target) != 4 or target[1] not in (heads, None) or axes != [2]:
            raise NoMatch(f"{label}: Reshape {node.name} is not the grouped-head repeat to {heads} heads")
        for inner in (unsqueeze.outputs[0], expand.outputs[0]):
            if len(inner.uses()) != 1:
                raise NoMatch(f"{label}: the grouped-head repeat {inner.name!r} is read elsewhere")
        node = unsqueeze.inputs[0].producer()
    if not _std(node, "Concat") or len(node.inputs) != 2 or node.attributes.get_int("axis", 0) not in (-2, 2):
        raise NoMatch(f"{label}: not read from a Concat(past, new) over the sequence axis")
    past, present = node.inputs[0], node.outputs[0]
    if past not in graph.inputs or not present.is_graph_output():
        raise NoMatch(f"{label}: the cache Concat {node.name} does not join a past graph input into a present output")
    return node, readers + _shape_readers(present, label, cache_heads=True)


def _probs_region(probs: ir.Value) -> tuple[list[ir.Node], ir.Node]:
    """The nodes from the probabilities to the head-merging Transpose, and that Transpose."""
    region, transposes, frontier, seen = [], [], [probs], set()
    while frontier:
        value = frontier.pop()
        if value.is_graph_output():
            raise NoMatch(f"{value.name!r} inside the attention core is a graph output")
        for use in value.uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            if _std(node, "Transpose") and list(node.attributes.get_ints("perm", [])) == [0, 2, 1, 3]:
                transposes.append(node)
            elif _std(node, *_PROBS_REGION):
                region.append(node)
                frontier.extend(node.outputs)
            else:
                raise NoMatch(f"the probabilities reach {node.op_type} {node.name} before the head-merging Transpose")
    if len(transposes) != 1:
        raise NoMatch(f"the probabilities reach {len(transposes)} head-merging Transposes, not one")
    return region, transposes[0]


def match_decoder_attention(softmax: ir.Node, graph: ir.Graph, ranks: dict) -> DecoderAttention:
    """``ranks``: :func:`~outlierquant.graph.shapes.propagate_ranks` of the graph, so shape
    expressions of the export (``Concat(Shape(x)[0], Shape(x)[1], -1, 64)``) evaluate."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        raise NoMatch("Softmax not over the key axis")
    # scores: Softmax ← [Add mask] ← [scalar scales] ← MatMul
    current, mask, factor = softmax.inputs[0], None, 1.0
    node = current.producer()
    if _std(node, "Add"):
        sides = [v for v in node.inputs if v is not None]
        scored = [v for v in sides if _std(v.producer(), "MatMul", "Mul", "Div")]
        if len(sides) != 2 or not scored or any(is_constant(v) for v in sides):
            raise NoMatch(f"Add {node.name} before the Softmax is not scores + a run-time mask")
        current = scored[0] if len(scored) == 1 or _std(scored[0].producer(), "MatMul") else scored[1]
        mask = sides[1] if sides[0] is current else sides[0]
        if len(current.uses()) != 1:
            raise NoMatch("the attention scores are read elsewhere too")
    current, f, quantized = _strip_scales(current, "scores")
    factor *= f
    scores = current.producer()
    if not _std(scores, "MatMul"):
        raise NoMatch("no Q·Kᵀ MatMul behind the Softmax")
    q_rot, q_factor, q_quant = _strip_scales(scores.inputs[0], "query")
    k_side, k_factor, k_quant = _strip_scales(scores.inputs[1], "key")
    quantized += q_quant + k_quant
    kt = k_side.producer()
    if not _std(kt, "Transpose") or list(kt.attributes.get_ints("perm", [])) != [0, 1, 3, 2]:
        raise NoMatch("the key operand is not a (0, 1, 3, 2) transpose")
    q_in, cos, sin = _rotary(q_rot, _split_heads_size(q_rot, ranks), "query", ranks)
    q, heads, head_size = _split_heads(q_in, "query", ranks)
    key_cache, readers = _cache_side(kt.inputs[0], graph, heads, "key", ranks)
    k_in, k_cos, k_sin = _rotary(key_cache.inputs[1], head_size, "key", ranks)
    if k_cos is not cos or k_sin is not sin:
        raise NoMatch("the query and the key are rotated with different tables")
    k, kv_heads, k_size = _split_heads(k_in, "key", ranks)
    # probabilities: Softmax → [IsNaN → Where(0)] → P @ V (+ quantization) → Transpose → Reshape
    probs = softmax.outputs[0]
    users = [u.node for u in probs.uses()]
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        zero = _scalar(where.inputs[1])
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or zero != 0.0 \
                or len(isnan.outputs[0].uses()) != 1:
            raise NoMatch("the Softmax guard is not Where(IsNaN(P), 0, P)")
        probs = where.outputs[0]
    region, merge = _probs_region(probs)
    value_cache = None
    inside = {id(n) for n in region}
    for node in region:
        for value in node.outputs:
            if any(id(u.node) not in inside and u.node is not merge for u in value.uses()):
                raise NoMatch(f"{value.name!r} inside the attention core is read outside it")
        if node.op_type != "MatMul":
            continue
        source, _, _ = _strip_scales(node.inputs[1], "value")
        cache, more = _cache_side(source, graph, heads, "value", ranks)
        readers += [r for r in more if r not in readers]
        if value_cache is not None and cache is not value_cache:
            raise NoMatch("the probabilities multiply two different value caches")
        value_cache = cache
    if value_cache is None:
        raise NoMatch("no P·V MatMul after the Softmax")
    quantized += sum(1 for n in region if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    v, v_heads, v_size = _split_heads(value_cache.inputs[1], "value", ranks)
    if (kv_heads, k_size) != (v_heads, v_size) or k_size != head_size or heads % kv_heads:
        raise NoMatch(f"heads q {heads}x{head_size}, k {kv_heads}x{k_size}, v {v_heads}x{v_size} do not group")
    reshape = next(iter(merge.outputs[0].uses())).node if len(merge.outputs[0].uses()) == 1 else None
    target = _ints(reshape.inputs[1], ranks, partial=True) if _std(reshape, "Reshape") else None
    if target is None or len(target) != 3 or target[2] not in (heads * head_size, -1):
        raise NoMatch("the head-merging Transpose is not followed by a Reshape to [B, S, N·H]")
    scale = factor * q_factor * k_factor
    if not scale > 0:
        raise NoMatch(f"attention scale {scale} is not positive")
    return DecoderAttention(softmax, q, k, v, heads, kv_heads, head_size, scale, mask,
                            key_cache.inputs[0], value_cache.inputs[0], key_cache.outputs[0],
                            value_cache.outputs[0], cos, sin, reshape.outputs[0], readers, quantized)


def _split_heads_size(q_rot: ir.Value, ranks: dict) -> int:
    """The head size of the rotated query, read from its head-splitting Reshape before matching
    the rotary pattern (which needs it)."""
    frontier, seen = [q_rot], set()
    for _ in range(6):
        following = []
        for value in frontier:
            node = value.producer() if value is not None else None
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if _std(node, "Reshape"):
                target = _ints(node.inputs[1], ranks, partial=True)
                if target is not None and len(target) == 4 and target[3] is not None and target[3] > 0:
                    return target[3]
            following.extend(v for v in node.inputs if v is not None and not is_constant(v))
        frontier = following
    raise NoMatch("query: no head-splitting Reshape found")
