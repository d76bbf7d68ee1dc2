"""Where a model's bytes are: the initializers grouped by what reads them.

The size a user sees is one number; what to do about it depends on which part holds it
(SmolLM2: a float lm_head is most of a W8A8 file; MiniLM: the word-embedding table is
half its parameters). Each initializer is followed through the ops that only re-encode a
weight (DequantizeLinear, Transpose, Cast, Reshape) to the op that uses it:

- ``embeddings``: the table of a Gather by run-time ids (and the per-row scales an int8
  table's DequantizeLinear reads after the lookup);
- ``lm_head``: the weight of a linear whose output is a graph output;
- ``side_paths``: the float weight rows of outlier channels (``*_outlier_weight``);
- ``rotations``: the constant matrices of online rotations;
- ``linears``: every other linear's weight, scales and zero points;
- ``other``: norms, biases, constants and shape tensors.
"""

from __future__ import annotations

import onnx_ir as ir

from outlierquant.graph.tags import ONLINE_ROTATION_KEY

#: ops that only re-encode or re-arrange a weight on its way to the op that uses it
_PASS_THROUGH = {"DequantizeLinear", "Transpose", "Cast", "Reshape", "Identity", "Unsqueeze", "Squeeze"}
_LINEAR_OPS = {"MatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "MatMulNBits",
               "DynamicQuantizeMatMul", "Conv", "ConvInteger", "QLinearConv", "FusedMatMul", "MixedInt8MatMul"}
PARTS = ("linears", "lm_head", "embeddings", "side_paths", "rotations", "other")


def _users(value: ir.Value, depth: int = 0) -> list[tuple[ir.Node, int]]:
    """The (node, input index) that finally use ``value``, through re-encoding ops."""
    found = []
    for node, index in value.uses():
        if node.op_type in _PASS_THROUGH and index == 0 and depth < 4 and node.outputs:
            found += _users(node.outputs[0], depth + 1) or [(node, index)]
        else:
            found.append((node, index))
    return found


def _writes_graph_output(node: ir.Node, depth: int = 0) -> bool:
    out = node.outputs[0] if node.outputs else None
    if out is None:
        return False
    if out.is_graph_output():
        return True
    return depth < 3 and any(user.op_type in ("Add", "DequantizeLinear", "Reshape", "Cast")
                             and _writes_graph_output(user, depth + 1) for user, _ in out.uses())


def _part(value: ir.Value) -> str:
    if value.name and value.name.endswith("_outlier_weight"):
        return "side_paths"
    users = _users(value)
    if not users:
        return "other"
    for node, index in users:
        if ONLINE_ROTATION_KEY in node.metadata_props:
            return "rotations"
        if node.op_type == "Gather" and index == 0:
            return "embeddings"
        if node.op_type == "DequantizeLinear" and index > 0 and node.inputs[0] is not None:
            producer = node.inputs[0].producer()
            if producer is not None and producer.op_type == "Gather":
                return "embeddings"
    for node, index in users:
        if node.op_type in _LINEAR_OPS:
            return "lm_head" if _writes_graph_output(node) else "linears"
        if node.op_type == "DequantizeLinear":  # a weight's scale or zero point
            weight_users = _users(node.outputs[0]) if node.outputs else []
            if any(user.op_type in _LINEAR_OPS for user, _ in weight_users):
                return "lm_head" if any(_writes_graph_output(u) for u, _ in weight_users) else "linears"
    return "other"


def size_breakdown(model: ir.Model) -> dict[str, int]:
    """Bytes of the initializers of ``model`` by part (:data:`PARTS`), plus ``total``."""
    sizes = dict.fromkeys(PARTS, 0)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        sizes[_part(value)] += int(tensor.nbytes)
    sizes["total"] = sum(sizes[p] for p in PARTS)
    return sizes
