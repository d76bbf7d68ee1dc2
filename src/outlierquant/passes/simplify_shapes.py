"""Replace the run-time shape arithmetic of an exported graph by constants where the shapes
are known, so each layer runs the ops that compute and little else.

An exporter writes every Reshape target, Expand shape and Slice bound as a little program
over ``Shape`` of some tensor (``Shape → Gather → Unsqueeze → Concat``, repeat_kv's
``Equal/Where`` guards, ``head_dim // 2`` from a Shape). onnxruntime keeps them: on
SmolLM2 with its KV cache, ~50 of each layer's ~100 nodes are such arithmetic, and at
batch-1 decoding, where a step runs every node once on a single token, each costs its
launch overhead however small. With the dimensions as expressions over the inputs' named
sizes (:mod:`outlierquant.graph.symbolic`):

- a shape tensor whose entries are all known integers becomes an initializer;
- a Reshape target whose entries are integers, or the input's own size on the same axis
  (→ ``0``, copy), with at most one other entry (→ ``-1``), becomes a constant;
- an Expand shape whose entries are integers, or the input's own size (→ ``1``, keep),
  becomes a constant;

and what no longer feeds anything is removed. Every replacement computes the same shape
for every input that satisfies the model's declared input shapes (same ``dim_param`` =
same size), so the graph's function is unchanged (tested on every architecture family,
with and without a KV cache, at several batch and sequence sizes). The result is standard
ONNX: any runtime gains from it. Quantized or float graphs alike; it reads no statistics.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from outlierquant.graph.symbolic import Lin, SymbolicShapes
from outlierquant.graph.values import add_initializer
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SimplifyShapesOptions:
    """``fold``: shape tensors with known entries become constants. ``reshape`` /
    ``expand``: rewrite their targets as constants with 0 / -1 (Reshape) or 1 (Expand)."""

    fold: bool = True
    reshape: bool = True
    expand: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)


class SimplifyShapesPass(OutlierPass):
    """Constant Reshape / Expand targets and folded shape arithmetic, where shapes are known."""

    name = "simplify-shapes"
    options_type = SimplifyShapesOptions
    claims_equivalence = True
    preserves_statistics = True

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        graph = model.graph
        before = sum(1 for _ in graph)
        symbolic = SymbolicShapes(graph)
        constants: dict[tuple, ir.Value] = {}
        counts = {"folded": 0, "reshape": 0, "expand": 0}

        def constant(array: np.ndarray, hint: str) -> ir.Value:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key not in constants:
                constants[key] = add_initializer(graph, hint, array)
            return constants[key]

        options = self.options
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if options.reshape and node.op_type == "Reshape" and len(node.inputs) == 2:
                target = _reshape_target(node, symbolic)
                if target is not None:
                    node.replace_input_with(1, constant(target, "simplify_shapes/reshape_target"))
                    counts["reshape"] += 1
                    continue
            if options.expand and node.op_type == "Expand":
                target = _expand_target(node, symbolic)
                if target is not None:
                    node.replace_input_with(1, constant(target, "simplify_shapes/expand_shape"))
                    counts["expand"] += 1
                    continue
            if options.fold and node.op_type != "Constant":
                for out in node.outputs:
                    array = _known_array(out, symbolic)
                    if array is None or out.is_graph_output() or not out.uses():
                        continue
                    out.replace_all_uses_with(constant(array, "simplify_shapes/shape"))
                    counts["folded"] += 1
        ir.passes.common.RemoveUnusedNodesPass()(model)
        after = sum(1 for _ in graph)
        modified = any(counts.values())
        logger.info("simplify_shapes: %d -> %d nodes (%s)", before, after, counts)
        return modified, {"nodes_before": before, "nodes_after": after, **counts,
                          "summary": [f"shape arithmetic simplified: {before} -> {after} nodes"] if modified else []}


def _known_array(value: ir.Value, symbolic: SymbolicShapes) -> np.ndarray | None:
    """``value`` as an array when its entries are known integers (or booleans)."""
    content = symbolic.contents.get(value)
    shape = symbolic.shapes.get(value)
    dtype = symbolic.dtypes.get(value)
    if content is None or shape is None or dtype is None or not all(d.is_int() for d in shape):
        return None
    if value.type is not None and isinstance(value.type, ir.TensorType) and value.type.dtype.numpy() != dtype:
        return None  # the tracked type disagrees with the declared one: leave it
    dims = tuple(d.const for d in shape)
    if int(np.prod(dims)) != len(content):
        return None
    if dtype == np.bool_ and all(isinstance(e, bool) for e in content):
        return np.array(content, dtype=np.bool_).reshape(dims)
    if dtype.kind in "iu" and all(isinstance(e, Lin) and e.is_int() for e in content):
        return np.array([e.const for e in content], dtype=dtype).reshape(dims)
    return None


def _symbolic_target(node: ir.Node, symbolic: SymbolicShapes) -> tuple[tuple, tuple] | None:
    """(target entries, data shape) of a Reshape / Expand whose run-time target is known in
    terms of sizes but not all integers (an all-integer target is folded as a known array)."""
    data, target = node.inputs
    if target is None or target.const_value is not None:
        return None
    content = symbolic.content(target)
    shape = symbolic.shape(data)
    if content is None or shape is None or not all(isinstance(t, Lin) for t in content):
        return None
    if all(t.is_int() for t in content):
        return None
    return content, shape


def _reshape_target(node: ir.Node, symbolic: SymbolicShapes) -> np.ndarray | None:
    """A constant target with 0 (this axis's size, copied) and at most one -1, or None."""
    allowzero = node.attributes.get("allowzero")
    if allowzero is not None and allowzero.as_int():
        return None
    known = _symbolic_target(node, symbolic)
    if known is None:
        return None
    content, shape = known
    out: list[int] = []
    free = [i for i, t in enumerate(content) if t == Lin.of(-1)]
    for i, t in enumerate(content):
        if t.is_int():
            out.append(t.const)
        elif i < len(shape) and t == shape[i]:
            out.append(0)
        else:
            free.append(i)
            out.append(-1)
    if len(free) > 1:
        return None
    return np.array(out, dtype=np.int64)


def _expand_target(node: ir.Node, symbolic: SymbolicShapes) -> np.ndarray | None:
    """A constant Expand shape (1 keeps the input's size on that axis), or None."""
    known = _symbolic_target(node, symbolic)
    if known is None:
        return None
    content, shape = known
    offset = len(content) - len(shape)
    if offset < 0:
        return None
    out: list[int] = []
    for i, t in enumerate(content):
        dim = shape[i - offset] if i >= offset else None
        if t.is_int():
            out.append(t.const)
        elif dim is not None and (t == dim):
            out.append(1)
        else:
            return None
    return np.array(out, dtype=np.int64)
