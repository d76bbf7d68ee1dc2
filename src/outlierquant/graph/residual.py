"""The residual stream of a pre-norm transformer: the tensors added into it (embedding
Gathers and the linears that write into residual ``Add``s) and the norms that read from it,
traced back from the norms and checked forward, so QuaRot's R1 can rotate the whole stream.
A model without such a stream gets the reason:

- **post-norm** (BERT, RoBERTa, DistilBERT): the norm sits on the residual path itself, so
  the stream is a norm's output and a rotation cannot pass the norm;
- **sandwich norms** (Gemma 2/3: an RMSNorm on each branch output, before the residual
  ``Add``): every writer is a *post-branch* norm ``x / rms(x) · γ``. Rotating the stream
  needs ``(x / rms(x)) · diag(γ) · Q``, and ``diag(γ) Q`` is no longer diagonal, so the
  rotation cannot be folded into the writers' weights (``rms(x W Q) = rms(x W)``, but γ
  still acts in the unrotated basis). The reason says so and names the exact alternative:
  an *online* rotation, ``x ← x · Q`` as an inserted op after each post-branch norm;
- a constant added to the stream (ViT's position embedding) or a Conv writer.

Norms that read a linear's output but never reach a residual sum (Gemma 3's q/k norms over
the head size) are not part of the stream and are left out of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.graph.records import GraphAnalysis, Linear, LinearGroup, Norm
from outlierquant.graph.shapes import reshape_keeps_last_axis
from outlierquant.graph.values import FLOAT_TYPES, SHAPE_ONLY_OPS, constant_array, is_constant, is_scalar_constant


@dataclasses.dataclass
class ResidualStream:
    """The residual stream of a pre-norm model, found from the graph."""

    width: int
    values: set
    writers: list[Linear]
    embeddings: list[ir.Node]
    norms: list[Norm]
    readers: dict[int, list[LinearGroup]]  # id(norm) -> groups reading its output

    def summary(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "writers": len(self.writers),
            "embeddings": len(self.embeddings),
            "norms": len(self.norms),
            "norm_kinds": sorted({n.kind for n in self.norms}),
            "readers": sum(len(g.linears) for groups in self.readers.values() for g in groups),
        }


def embedding_table(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
        return None
    table = constant_array(node.inputs[0])
    if table is None or table.ndim != 2 or table.dtype.kind != "f":
        return None
    return table


def find_residual_stream(analysis: GraphAnalysis) -> ResidualStream | str:
    """The residual stream (writers, embeddings, norms, readers), or why there is none."""
    norms = [n for n in analysis.norms if n.kind in ("rmsnorm", "layernorm")]
    if not norms:
        return "no LayerNorm/RMSNorm found"
    others = [n for n in analysis.norms if n.kind not in ("rmsnorm", "layernorm")]
    if others:
        return f"norm {others[0].name} is a {others[0].kind} (fused skip-norms are not supported)"
    linear_by_output = {id(linear.output): linear for linear in analysis.linears}
    post_branch: dict[int, tuple[Norm, Linear]] = {}  # id(norm output) -> (norm, the linear it normalizes)
    on_branch = []
    for norm in norms:
        writer = _branch_linear(norm.input, linear_by_output)
        if writer is None:
            continue
        on_branch.append(norm)
        if _reaches_sum(norm.output):
            post_branch[id(norm.output)] = (norm, writer)
    norms = [n for n in norms if n not in on_branch]  # q/k norms and post-branch norms read no stream
    if not norms:
        return "every norm normalizes a linear's output: no norm reads a residual stream"
    norm_nodes = {id(node) for norm in norms for node in norm.nodes}
    post_branch_hits: list[tuple[Norm, Linear]] = []
    values: dict[int, ir.Value] = {}
    writers: list[Linear] = []
    embeddings: list[ir.Node] = []
    queue = [norm.input for norm in norms]
    width = None
    while queue:
        value = queue.pop()
        if id(value) in values:
            continue
        values[id(value)] = value
        linear = linear_by_output.get(id(value))
        if linear is not None:
            writers.append(linear)
            continue
        if id(value) in post_branch:
            post_branch_hits.append(post_branch[id(value)])
            continue
        node = value.producer()
        if node is None:
            return f"graph input {value.name!r} feeds the residual stream directly"
        table = embedding_table(node)
        if table is not None:
            embeddings.append(node)
            width = width or table.shape[1]
            continue
        op = node.op_type
        if node.domain == "" and op in _PASSTHROUGH_OPS:
            if op == "Cast" and ir.DataType(node.attributes.get_int("to", 1)) not in FLOAT_TYPES:
                return f"residual value {value.name!r} comes from a non-float Cast {node.name}"
            queue.append(node.inputs[0])
            continue
        if node.domain == "" and op in ("Add", "Sum") and not any(is_constant(v) for v in node.inputs):
            queue.extend(v for v in node.inputs if v is not None)
            continue
        if node.domain == "" and op in ("Mul", "Div") and is_scalar_constant(node.inputs[1]):
            queue.append(node.inputs[0])
            continue
        if node.domain == "" and op == "Mul" and is_scalar_constant(node.inputs[0]):
            queue.append(node.inputs[1])
            continue
        if node.domain == "" and op in ("Add", "Sum") and any(is_constant(v) for v in node.inputs):
            return (f"residual value {value.name!r} comes from {op} {node.name} with a constant operand "
                    "(a position embedding or bias added to the stream): R1 does not rotate constants "
                    "added to the stream")
        if any(value is norm.output or node in norm.nodes for norm in analysis.norms):
            return (f"residual value {value.name!r} comes from {op} {node.name}: not a linear, an embedding, "
                    "or a residual sum (post-norm models have no rotatable residual stream)")
        return (f"residual value {value.name!r} comes from {op} {node.name}: not a linear, an embedding, "
                "or a residual sum")
    if not writers and not embeddings:
        return "the residual stream has no writers"
    width = width or writers[0].out_features
    for writer in writers:
        if writer.out_features != width:
            return f"writer {writer.name} has {writer.out_features} outputs, the stream {width}"
        if writer.op_type == "Conv":
            return f"writer {writer.name} is a Conv"
    stream_nodes = {id(v.producer()) for v in values.values() if v.producer() is not None}
    # forward check: the stream is read only by norms, residual sums and shape reads
    for value in values.values():
        if value.is_graph_output():
            return f"residual value {value.name!r} is a graph output"
        for use in value.uses():
            node = use.node
            if id(node) in norm_nodes or node.op_type in SHAPE_ONLY_OPS:
                continue
            if id(node) in stream_nodes:
                if node.op_type == "Reshape" and not reshape_keeps_last_axis(node, width):
                    return f"Reshape {node.name} moves the residual channels"
                continue
            linear = next((w for w in writers if w.node is node or w.bias_node is node), None)
            if linear is not None:
                continue
            return (f"residual value {value.name!r} also feeds {node.op_type} {node.name}, "
                    "which is neither a norm nor a residual sum")
    readers: dict[int, list[LinearGroup]] = {}
    for group in analysis.groups:
        producer = group.producer
        if producer.kind == "norm" and producer.norm in norms:
            readers.setdefault(id(producer.norm), []).append(group)
    for norm in norms:
        groups = readers.get(id(norm), [])
        if not groups:
            return f"norm {norm.name} feeds no linear"
        for group in groups:
            producer = group.producer
            if not producer.foldable:
                return f"norm {norm.name}: {producer.reason}"
            if producer.channel_map is not None and not np.array_equal(
                    producer.channel_map, np.arange(len(producer.channel_map))):
                return f"norm {norm.name}: its channels are permuted on the way to {group.linears[0].name}"
            if any(node.op_type not in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze")
                   for node in producer.path):
                return f"norm {norm.name}: the path to {group.linears[0].name} is not channel-preserving"
        if norm.axis not in (-1,) and not (norm.input.shape is not None and norm.axis == len(norm.input.shape) - 1):
            return f"norm {norm.name} normalizes axis {norm.axis}, not the last"
        if norm.gamma is not None and constant_array(norm.gamma).size != width:
            return f"norm {norm.name}: γ has {constant_array(norm.gamma).size} channels, the stream {width}"
    if post_branch_hits:
        first_norm, first_linear = post_branch_hits[0]
        return (f"the residual stream is written by {len(post_branch_hits)} post-branch norms (sandwich norms, "
                f"e.g. {first_norm.kind} {first_norm.name} after {first_linear.name}): a post-branch norm's "
                "1/rms and γ act on the stream's channels after the last linear, so R1 cannot be folded into "
                "the weights exactly; exact alternative: an online rotation (x·Q as an inserted op) after each "
                "post-branch norm, with Qᵀ folded into the readers as usual")
    return ResidualStream(width, set(values), writers, embeddings, norms, readers)


_BRANCH_OPS = {"Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}


def _branch_linear(value: ir.Value, linear_by_output: dict) -> Linear | None:
    """The linear whose output ``value`` is, through layout ops (a norm on a branch output)."""
    current = value
    for _ in range(8):
        linear = linear_by_output.get(id(current))
        if linear is not None:
            return linear
        node = current.producer()
        if node is None or node.domain != "" or node.op_type not in _BRANCH_OPS:
            return None
        current = node.inputs[0]
    return None


def _reaches_sum(value: ir.Value, depth: int = 4) -> bool:
    """Whether ``value`` is added to another activation (through casts, layout ops and
    scalar scales): a norm output that writes into a residual sum."""
    for use in value.uses():
        node = use.node
        if node.domain != "":
            continue
        if node.op_type in ("Add", "Sum") and not any(is_constant(v) for v in node.inputs):
            return True
        if depth > 0 and (node.op_type in _BRANCH_OPS or (node.op_type in ("Mul", "Div") and any(
                is_scalar_constant(v) for v in node.inputs if v is not value))):
            if _reaches_sum(node.outputs[0], depth - 1):
                return True
    return False


def norm_epsilon(norm: Norm) -> float:
    if norm.fused:
        attribute = norm.nodes[0].attributes.get("epsilon")
        return float(attribute.value) if attribute is not None else 1e-5
    for node in norm.nodes:
        if node.op_type == "Add":
            for value in node.inputs:
                array = constant_array(value)
                if array is not None and array.size == 1:
                    return float(array.reshape(-1)[0])
    return 1e-5


_PASSTHROUGH_OPS = {"Cast", "Identity", "Reshape"}
