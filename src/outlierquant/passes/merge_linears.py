"""Merge the linears that read one tensor (q/k/v, gate/up) into one MatMul and a Split.

Why: at batch-1 decoding a step runs every node once on a single token, so a layer's
cost is its weight bytes plus a fixed launch cost per node. A quantized decoder layer
has, per linear, a MatMul (onnxruntime runs ``DequantizeLinear → MatMul`` as one
``MatMulIntegerToFloat``), and where ``default`` keeps outlier channels in float, a thin
side MatMul and the Add that joins it. q, k and v read the same tensor, and so do gate
and up: one MatMul over the concatenated weights, one side MatMul over the concatenated
side rows, one Add and a ``Split`` compute the same outputs with 4 nodes instead of 9
(SmolLM2 with a KV cache, ``default``: 1211 → 1045 nodes per decode step). onnxruntime's
graph optimizer does not do this itself (it fuses a MatMul with its own Add, not
siblings), and the exporters write the projections separately.

What merges: ``MatMul(x, W)`` nodes with the same ``x`` whose weights are 2-D constants
of the same kind — float initializers of one dtype, or ``DequantizeLinear`` of int8/uint8
constants with per-output-channel (or equal per-tensor) scales — each optionally followed
by a float side path ``Add(·, MatMul(s, S))`` (the same ``s`` for all) and then a bias
``Add(·, b)``. The weights, side rows, scales, zero points and biases are concatenated
along the output axis; ``Split`` gives each linear's output back under its old name.
Column ``j`` of the merged product is column ``j`` of one original product (the same dot
product over the same inputs), so the function is unchanged; the int8 codes and scales
are the originals', so a quantized graph computes the same integers. Standard ONNX ops:
every runtime gains. Run it after the passes that match linears by their own nodes (the
quantizers, ``onnxruntime-fuse``): they read the separate form.

``pack_attention``: where ``onnxruntime-fuse`` already wrote a ``GroupQueryAttention`` that
reads merged q/k/v through the Split (q and k each through a ``RotaryEmbedding``),
GroupQueryAttention takes the merged tensor whole as its packed input and applies the
rotary embedding itself (``do_rotary``, with the same position ids and tables): one node
per layer instead of a Split and two RotaryEmbeddings. It touches only graphs that already
hold onnxruntime's contrib ops, so a standard-op graph stays standard.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from outlierquant.custom_ops import DOMAIN as CUSTOM_DOMAIN
from outlierquant.graph.tags import KEEP_FLOAT_KEY
from outlierquant.graph.values import MS_DOMAIN, add_initializer, constant_array, remove_if_unused, single_use, unique_name
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

_STD = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class MergeLinearsOptions:
    """``side_paths``: merge the float outlier side paths with their linears (otherwise a
    linear with one is left alone). ``bias``: merge a constant bias Add after the linear.
    ``pack_attention``: hand a merged q/k/v to onnxruntime's GroupQueryAttention packed,
    with the rotary embedding inside it (module docstring)."""

    side_paths: bool = True
    bias: bool = True
    pack_attention: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)


@dataclasses.dataclass
class _Member:
    """One linear of a merge: its MatMul, how its weight is stored, what follows it."""

    matmul: ir.Node
    weight: np.ndarray  # float weight, or the integer codes under a DequantizeLinear
    dequantize: ir.Node | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    side_add: ir.Node | None = None
    side_matmul: ir.Node | None = None
    side_weight: np.ndarray | None = None
    bias_add: ir.Node | None = None
    bias: np.ndarray | None = None
    outliers: np.ndarray | None = None  # MixedInt8MatMul: its float channels and their weight rows
    outlier_weight: np.ndarray | None = None

    @property
    def output(self) -> ir.Value:
        last = self.bias_add or self.side_add or self.matmul
        return last.outputs[0]

    @property
    def nbits(self) -> bool:
        return self.matmul.op_type == "MatMulNBits"

    @property
    def mixed(self) -> bool:
        return self.matmul.op_type == "MixedInt8MatMul"

    @property
    def columns(self) -> int:
        return self.matmul.attributes.get_int("N") if self.nbits else int(self.weight.shape[1])

    @property
    def rows(self) -> int:
        return self.matmul.attributes.get_int("K") if self.nbits else int(self.weight.shape[0])

    def key(self) -> tuple:
        """Members with equal keys can share one MatMul."""
        side = id(self.side_matmul.inputs[0]) if self.side_matmul is not None else None
        if self.mixed:  # one per-token scale over the same inliers: the same outlier channels
            kind: tuple = ("mixed", self.weight.dtype.str, self.matmul.attributes.get_float("threshold", 0.0),
                           None if self.outliers is None else self.outliers.tobytes())
        elif self.nbits:
            attrs = self.matmul.attributes
            kind = ("nbits", self.weight.shape[1:], attrs.get_int("bits", 4), attrs.get_int("block_size"),
                           attrs.get_int("accuracy_level", 0), self.scale.dtype.str, self.scale.ndim,
                           None if self.zero_point is None else (self.zero_point.dtype.str, self.zero_point.ndim))
        elif self.dequantize is None:
            kind = ("float", self.weight.dtype.str)
        else:
            kind = ("dq", self.weight.dtype.str, self.scale.dtype.str,
                    None if self.zero_point is None else self.zero_point.dtype.str)
        return (id(self.matmul.inputs[0]), self.rows, kind, side, self.bias is not None)



def _dequantized_weight(value: ir.Value) -> tuple[ir.Node, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(DequantizeLinear, codes, per-column scale, zero point) of a constant 2-D int8 weight."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in _STD or not single_use(value):
        return None
    if node.attributes.get_int("block_size", 0):
        return None
    codes = constant_array(node.inputs[0])
    scale = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if codes is None or scale is None or codes.ndim != 2 or codes.dtype not in (np.int8, np.uint8):
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and zero is None:
        return None
    columns = codes.shape[1]
    axis = node.attributes.get_int("axis", 1)
    if scale.size == 1:
        scale = np.full(columns, scale.reshape(()), dtype=scale.dtype)
        zero = None if zero is None else np.full(columns, zero.reshape(()), dtype=zero.dtype)
    elif scale.shape != (columns,) or axis not in (1, -1) or (zero is not None and zero.shape != (columns,)):
        return None
    return node, codes, scale, zero


def _nbits_member(node: ir.Node) -> _Member | None:
    """onnxruntime's ``MatMulNBits(x, B, scales[, zero_points])``: ``B`` is ``[N, blocks, bytes]``
    and the scales and packed zero points are stored output channel by output channel
    (``[N * blocks]`` or ``[N, blocks]``), so a merge concatenates all three along N. A
    ``g_idx`` (act-order) or an in-node bias is left alone."""
    if node.domain != MS_DOMAIN or not 3 <= len(node.inputs) <= 4 or node.inputs[0] is None \
            or not all(single_use(value) for value in node.inputs[1:] if value is not None):
        return None
    arrays = [constant_array(value) if value is not None else None for value in node.inputs[1:]]
    if arrays[0] is None or arrays[1] is None or (len(node.inputs) == 4 and node.inputs[3] is not None
                                                  and arrays[2] is None):
        return None
    n = node.attributes.get_int("N", 0)
    weight, scale = arrays[0], arrays[1]
    zero = arrays[2] if len(arrays) > 2 else None
    if weight.ndim != 3 or weight.shape[0] != n or weight.dtype != np.uint8 or scale.size % max(n, 1) \
            or scale.shape[0] not in (n, scale.size) or (zero is not None and zero.shape[0] not in (n, zero.size)):
        return None
    return _Member(node, weight, scale=scale, zero_point=zero)


def _mixed_member(node: ir.Node) -> _Member | None:
    """Our ``MixedInt8MatMul(X, W_q, w_scale[, outlier_channels, W_outlier])``: per-token
    int8 over the channels not listed, float over the listed ones. Siblings with the same
    list quantize the same inliers with the same per-token scale, so ``W_q``, ``w_scale``
    and ``W_outlier`` join along N and each column is computed as before."""
    if node.domain != CUSTOM_DOMAIN or not 3 <= len(node.inputs) <= 5 or node.inputs[0] is None \
            or not all(single_use(value) for value in node.inputs[1:] if value is not None):
        return None
    arrays = [constant_array(value) if value is not None else None for value in node.inputs[1:]]
    if any(array is None for value, array in zip(node.inputs[1:], arrays) if value is not None):
        return None
    weight, scale = arrays[0], arrays[1]
    channels = arrays[2] if len(arrays) > 2 else None
    outlier_weight = arrays[3] if len(arrays) > 3 else None
    if weight.ndim != 2 or scale.shape != (weight.shape[1],) or (channels is None) != (outlier_weight is None):
        return None
    member = _Member(node, weight, scale=scale)
    if channels is not None:
        if outlier_weight.shape != (channels.size, weight.shape[1]):
            return None
        member.outliers, member.outlier_weight = channels, outlier_weight
    return member


def _member(node: ir.Node, options: MergeLinearsOptions) -> _Member | None:
    if node.op_type == "MixedInt8MatMul":
        member = _mixed_member(node)
        return None if member is None else _followers(member, options)
    if node.op_type == "MatMulNBits":
        member = _nbits_member(node)
        if member is None:
            return None
        return _followers(member, options)
    if node.op_type != "MatMul" or node.domain not in _STD or len(node.inputs) != 2 or node.inputs[0] is None:
        return None
    weight_value = node.inputs[1]
    if weight_value is None:
        return None
    array = constant_array(weight_value)
    if array is not None:  # a float weight read elsewhere too (tied) is not copied
        if array.ndim != 2 or array.dtype.kind != "f" or not single_use(weight_value):
            return None
        member = _Member(node, array)
    else:
        parts = _dequantized_weight(weight_value)
        if parts is None:
            return None
        member = _Member(node, parts[1], dequantize=parts[0], scale=parts[2], zero_point=parts[3])
    return _followers(member, options)


def _followers(member: _Member, options: MergeLinearsOptions) -> _Member:
    """Attach the float side path and the bias Add that follow the linear, if any."""
    out = member.matmul.outputs[0]
    columns = member.columns
    for _ in range(2):  # a side path, then a bias (each at most once, in this order)
        if not single_use(out):
            break
        (user, _index), = out.uses()
        if user.op_type != "Add" or user.domain not in _STD or len(user.inputs) != 2:
            break
        other = user.inputs[1] if user.inputs[0] is out else user.inputs[0]
        if other is None or other is out:
            break
        bias = constant_array(other)
        if bias is not None:
            if not options.bias or member.bias_add is not None or bias.shape != (columns,) \
                    or bias.dtype.kind != "f":
                break
            member.bias_add, member.bias = user, bias
        else:
            side = other.producer()
            if member.side_add is not None or member.bias_add is not None or side is None \
                    or side.op_type != "MatMul" or side.domain not in _STD or not single_use(other):
                break
            side_weight = constant_array(side.inputs[1])
            # a side path carries a few of the input's channels: fewer rows than the linear
            # (which also tells the two apart when both weights are float constants)
            if side_weight is None or side_weight.ndim != 2 or side_weight.shape[1] != columns \
                    or side_weight.shape[0] >= member.rows \
                    or side_weight.dtype.kind != "f" or side.inputs[0] is None:
                break
            member.side_add, member.side_matmul, member.side_weight = user, side, side_weight
        out = user.outputs[0]
    return member


def _matmul(graph: ir.Graph, prefix: str, members: list[_Member], nodes: list[ir.Node]) -> ir.Node:
    """The merged standard MatMul over the joined float weight, or over the DequantizeLinear
    of the joined codes (which goes into ``nodes``)."""
    first = members[0]
    weight = add_initializer(graph, f"{prefix}_weight", np.concatenate([m.weight for m in members], axis=1))
    if first.dequantize is not None:
        inputs = [weight, add_initializer(graph, f"{prefix}_scale", np.concatenate([m.scale for m in members]))]
        if first.zero_point is not None:
            inputs.append(add_initializer(graph, f"{prefix}_zero_point",
                                          np.concatenate([m.zero_point for m in members])))
        dq = ir.node("DequantizeLinear", inputs, attributes={"axis": 1}, name=f"{prefix}/DequantizeLinear")
        dq.outputs[0].name = f"{prefix}_weight_dequantized"
        nodes.append(dq)
        weight = dq.outputs[0]
    return ir.node("MatMul", [first.matmul.inputs[0], weight], name=f"{prefix}/MatMul",
                   metadata_props=dict(first.matmul.metadata_props) or None)


def _merge(graph: ir.Graph, members: list[_Member]) -> dict[str, Any]:
    first = members[0]
    name = first.matmul.name or unique_name(graph, "MatMul")
    prefix = f"merge_linears/{name.strip('/').replace('/', '_')}"
    sizes = np.array([m.columns for m in members], dtype=np.int64)
    nodes: list[ir.Node] = []
    if first.nbits:  # B, scales and zero points are laid out by output channel: join along N
        inputs = [first.matmul.inputs[0]] + [
            add_initializer(graph, f"{prefix}_{key}", np.concatenate([getattr(m, field) for m in members]))
            for key, field in (("B", "weight"), ("scales", "scale"), ("zero_points", "zero_point"))
            if getattr(first, field) is not None]
        attributes = {**first.matmul.attributes, "N": ir.AttrInt64("N", int(sizes.sum()))}
        matmul = ir.node("MatMulNBits", inputs, attributes=attributes, domain=MS_DOMAIN,
                         name=f"{prefix}/MatMulNBits", metadata_props=dict(first.matmul.metadata_props) or None)
    elif first.mixed:
        inputs = [first.matmul.inputs[0],
                  add_initializer(graph, f"{prefix}_weight_q", np.concatenate([m.weight for m in members], axis=1)),
                  add_initializer(graph, f"{prefix}_weight_scale", np.concatenate([m.scale for m in members]))]
        if first.outliers is not None:
            inputs += [add_initializer(graph, f"{prefix}_outlier_channels", first.outliers),
                       add_initializer(graph, f"{prefix}_outlier_weight",
                                       np.concatenate([m.outlier_weight for m in members], axis=1))]
        matmul = ir.node("MixedInt8MatMul", inputs, attributes=dict(first.matmul.attributes), domain=CUSTOM_DOMAIN,
                         name=f"{prefix}/MixedInt8MatMul", metadata_props=dict(first.matmul.metadata_props) or None)
    else:
        matmul = _matmul(graph, prefix, members, nodes)
    matmul.outputs[0].name = f"{prefix}/MatMul_output"
    nodes.append(matmul)
    out = matmul.outputs[0]
    if first.side_matmul is not None:
        tag = {KEEP_FLOAT_KEY: first.side_matmul.metadata_props.get(KEEP_FLOAT_KEY, "outlier side path")}
        side_weight = add_initializer(graph, f"{prefix}_outlier_weight",
                                      np.concatenate([m.side_weight for m in members], axis=1))
        side = ir.node("MatMul", [first.side_matmul.inputs[0], side_weight], name=f"{prefix}/side_MatMul",
                       metadata_props=dict(tag))
        side.outputs[0].name = f"{prefix}/side_MatMul_output"
        add = ir.node("Add", [out, side.outputs[0]], name=f"{prefix}/side_Add", metadata_props=dict(tag))
        add.outputs[0].name = f"{prefix}/side_Add_output"
        nodes += [side, add]
        out = add.outputs[0]
    if first.bias_add is not None:
        bias = add_initializer(graph, f"{prefix}_bias", np.concatenate([m.bias for m in members]))
        add = ir.node("Add", [out, bias], name=f"{prefix}/bias_Add")
        add.outputs[0].name = f"{prefix}/bias_Add_output"
        nodes.append(add)
        out = add.outputs[0]
    split = ir.node("Split", [out, add_initializer(graph, f"{prefix}_sizes", sizes)], attributes={"axis": -1},
                    num_outputs=len(members), name=f"{prefix}/Split")
    nodes.append(split)
    # the new nodes go before the first node that reads any of the outputs (each chain, and
    # so its inputs x and s, comes before its readers), or after the last chain when only
    # graph outputs read them; the outputs keep their names, so whatever reads a linear's
    # output by name (probes, the quantization report, the attention ops) still finds it
    position = _position(graph)
    readers = [user for m in members for user, _ in m.output.uses()]
    if readers:
        graph.insert_before(min(readers, key=position.__getitem__), nodes)
    else:
        graph.insert_after(max((m.output.producer() for m in members), key=position.__getitem__), nodes)
    for member, new in zip(members, split.outputs):
        old = member.output
        new.type, new.shape = old.type, old.shape
        old_name = old.name
        old.name = None
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = old_name
    removed = [node for member in members
               for node in (member.bias_add, member.side_add, member.side_matmul, member.matmul, member.dequantize)
               if node is not None]
    constants = [value for node in removed for value in node.inputs
                 if value is not None and value.name in graph.initializers]
    graph.remove(removed, safe=True)
    for value in constants:
        remove_if_unused(graph, value)
    return {"linears": [m.matmul.name for m in members], "columns": sizes.tolist(),
            "side_path": first.side_matmul is not None, "bias": first.bias_add is not None,
            "int8": first.dequantize is not None, "nbits": first.nbits, "mixed_int8": first.mixed}


def _pack_attention(graph: ir.Graph) -> list[str]:
    """GroupQueryAttention(RotaryEmbedding(q), RotaryEmbedding(k), v) over the three outputs
    of one Split → GroupQueryAttention(packed qkv, do_rotary=1). Both are onnxruntime's
    rotary on the same position ids and cos/sin tables, non-interleaved, over the whole
    head; the packed layout is q, k, v along the last axis, which is the Split's order."""
    packed = []
    for gqa in list(graph):
        if gqa.op_type != "GroupQueryAttention" or gqa.domain != MS_DOMAIN or len(gqa.inputs) < 3:
            continue
        attrs = gqa.attributes
        if attrs.get_int("do_rotary", 0) or any(v is not None for v in gqa.inputs[7:10]):
            continue
        q_rot, k_rot, v = gqa.inputs[:3]
        rotaries = [value.producer() if value is not None else None for value in (q_rot, k_rot)]
        if v is None or any(r is None or r.op_type != "RotaryEmbedding" or r.domain != MS_DOMAIN
                            or len(r.inputs) != 4 or not single_use(r.outputs[0]) for r in rotaries):
            continue
        rq, rk = rotaries
        if any(r.attributes.get_int("interleaved", 0) or r.attributes.get_int("rotary_embedding_dim", 0)
               or r.attributes.get_int("is_packed_batching", 0) or r.attributes.get_float("scale", 1.0) != 1.0
               for r in rotaries) or any(a is not b for a, b in zip(rq.inputs[1:], rk.inputs[1:])):
            continue
        split = v.producer()
        if split is None or split.op_type != "Split" or split.domain not in _STD or len(split.outputs) != 3 \
                or [rq.inputs[0], rk.inputs[0], v] != list(split.outputs) \
                or split.attributes.get_int("axis", 0) not in (-1, 2):
            continue
        sizes = constant_array(split.inputs[1]) if len(split.inputs) > 1 else None
        heads, kv_heads = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
        if sizes is None or not heads or not kv_heads or sizes.shape != (3,) or sizes[0] % heads \
                or sizes[1] != sizes[2] or sizes[0] // heads * kv_heads != sizes[1]:
            continue
        position_ids, cos_cache, sin_cache = rq.inputs[1:]
        inputs = list(gqa.inputs) + [None] * (11 - len(gqa.inputs))
        inputs[0:3] = [split.inputs[0], None, None]
        inputs[7:10] = [cos_cache, sin_cache, position_ids]
        new = ir.node("GroupQueryAttention", inputs, domain=MS_DOMAIN, num_outputs=len(gqa.outputs),
                      attributes={**attrs,
                                  "do_rotary": ir.AttrInt64("do_rotary", 1),
                                  "rotary_interleaved": ir.AttrInt64("rotary_interleaved", 0)},
                      name=gqa.name)
        graph.insert_before(gqa, new)
        for old, fresh in zip(gqa.outputs, new.outputs):
            name = old.name
            fresh.type, fresh.shape = old.type, old.shape
            old.name = None
            old.replace_all_uses_with(fresh, replace_graph_outputs=True)
            fresh.name = name
        # batch and sequence sizes read off q (the fused attention's length arithmetic) are
        # the packed tensor's too
        for user, index in list(split.outputs[0].uses()):
            if user.op_type == "Shape" and 0 <= user.attributes.get_int("start", 0) \
                    and 0 < user.attributes.get_int("end", 99) <= 2:
                user.replace_input_with(index, split.inputs[0])
        graph.remove([gqa, rq, rk], safe=True)
        packed.append(new.name)
    return packed


def _position(graph: ir.Graph) -> dict[ir.Node, int]:
    return {node: i for i, node in enumerate(graph)}


class MergeLinearsPass(OutlierPass):
    """Sibling linears (same input, same weight kind) → one MatMul + Split."""

    name = "merge-linears"
    options_type = MergeLinearsOptions
    claims_equivalence = True
    preserves_statistics = True

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        graph = model.graph
        before = sum(1 for _ in graph)
        found = [member for member in (_member(node, self.options) for node in graph) if member is not None]
        # a side path's thin MatMul has a constant weight too: it merges as part of its
        # linear, not with the other side MatMuls that read the same gathered channels
        sides = {id(member.side_matmul) for member in found if member.side_matmul is not None}
        by_key: dict[tuple, list[_Member]] = {}
        for member in found:
            if id(member.matmul) not in sides and (self.options.side_paths or member.side_matmul is None):
                by_key.setdefault(member.key(), []).append(member)
        merged = [_merge(graph, members) for members in by_key.values() if len(members) > 1]
        packed = _pack_attention(graph) if merged and self.options.pack_attention else []
        if merged:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        after = sum(1 for _ in graph)
        logger.info("merge_linears: %d merges, %d -> %d nodes", len(merged), before, after)
        return bool(merged), {
            "options": dataclasses.asdict(self.options), "merged": merged,
            "nodes_before": before, "nodes_after": after, "packed_attention": packed,
            "summary": [f"sibling linears merged: {sum(len(m['linears']) for m in merged)} linears in "
                        f"{len(merged)} MatMuls ({before} -> {after} nodes)"
                        + (f"; {len(packed)} GroupQueryAttention with packed q/k/v and rotary inside"
                           if packed else "")] if merged else [],
        }
