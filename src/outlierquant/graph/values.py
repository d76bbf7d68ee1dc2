"""Values and constants in the IR: reading constants, adding initializers under unique
names, where an inserted op goes, and the dtype / domain sets every layer above shares."""

from __future__ import annotations

import onnx_ir as ir


def constant_array(value: ir.Value | None):
    """The numpy array of a constant value (initializer or Constant node), else None."""
    import numpy as np

    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
        for key in ("value_float", "value_int"):
            if key in producer.attributes:
                return np.array(producer.attributes[key].value)
        for key in ("value_floats", "value_ints"):
            if key in producer.attributes:
                return np.array(producer.attributes[key].value)
    return None


def is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def add_initializer(graph: ir.Graph, name_hint: str, array) -> ir.Value:
    """Register ``array`` as a new initializer with a unique name and return its value."""
    name = unique_name(graph, name_hint)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, hint: str) -> str:
    """``hint``, or ``hint_1``, ``hint_2``, … : the first that names no initializer and no
    node output of ``graph`` (the one naming rule for everything a pass adds)."""
    taken = graph.initializers
    if hint not in taken and not _names_an_output(graph, hint):
        return hint
    i = 1
    while f"{hint}_{i}" in taken or _names_an_output(graph, f"{hint}_{i}"):
        i += 1
    return f"{hint}_{i}"


def _names_an_output(graph: ir.Graph, name: str) -> bool:
    return any(value.name == name for node in graph for value in node.outputs)


def first_in_graph(graph: ir.Graph, nodes) -> ir.Node:
    """The node of ``nodes`` that comes first in ``graph``'s order (where a group's inserted
    ops go, before every linear that reads them)."""
    wanted = {id(node): node for node in nodes}
    first = None
    for candidate in graph:
        if id(candidate) in wanted:
            first = first or candidate
            del wanted[id(candidate)]
    if first is None or wanted:
        missing = ", ".join(node.name or "?" for node in wanted.values()) or "all of them"
        raise ValueError(f"nodes not in the graph: {missing}")
    return first


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Drop an initializer no node and no graph output uses any more."""
    if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
        del graph.initializers[value.name]


def set_input_constant(graph: ir.Graph, node: ir.Node, index: int, array, hint: str) -> ir.Value:
    """Give ``node.inputs[index]`` the value ``array`` (cast to the old dtype).

    The initializer is rewritten in place when nothing else reads it; otherwise a new
    initializer named after ``hint`` is added, so a shared constant is never changed
    under another reader.
    """
    import numpy as np

    value = node.inputs[index]
    old = constant_array(value)
    array = np.asarray(array)
    dtype = old.dtype if old is not None else np.float32
    if array.dtype != dtype or not array.flags.c_contiguous or not array.flags.owndata:
        # a private contiguous copy; a fresh array of the right kind is taken as it is (an
        # LM head's worth of memory not copied twice)
        array = np.array(array, dtype=dtype, order="C")
    if (value is not None and value.name in graph.initializers and len(list(value.uses())) == 1
            and not value.is_graph_output()):
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return value
    new = add_initializer(graph, hint, array)
    node.replace_input_with(index, new)
    return new


MS_DOMAIN = "com.microsoft"


FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


#: ops that only read a tensor's shape: a scale on their input changes nothing
SHAPE_ONLY_OPS = {"Shape", "Size"}


def opset_version(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))


def weight_input(node: ir.Node) -> tuple[int, int] | None:
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


def is_scalar_constant(value: ir.Value | None) -> bool:
    array = constant_array(value) if value is not None else None
    return array is not None and array.size == 1


class NodeWriter:
    """A small chain of ops a form writes: nodes named ``{prefix}/{Op}_{i}`` (outputs
    ``…_output``), kept in order in :attr:`nodes` for the caller to insert; ``metadata``
    (a tag of :mod:`outlierquant.graph.tags`) goes on every node."""

    def __init__(self, prefix: str, metadata: dict[str, str] | None = None) -> None:
        self.prefix = prefix
        self.metadata = metadata
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        index = len(self.nodes)
        node = ir.node(op_type, inputs=list(inputs), attributes=attributes or None,
                       name=f"{self.prefix}/{op_type}_{index}",
                       metadata_props=dict(self.metadata) if self.metadata is not None else None)
        node.outputs[0].name = f"{self.prefix}/{op_type}_{index}_output"
        self.nodes.append(node)
        return node.outputs[0]


def single_use(value: ir.Value) -> bool:
    """Read by exactly one node and not a graph output: safe to rewrite with its reader."""
    return len(value.uses()) == 1 and not value.is_graph_output()
