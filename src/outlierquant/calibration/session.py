"""One onnxruntime session over a serialized copy of the model, external data kept in place.

The target tensors are added as extra outputs on a *serialized copy* of the graph (the
caller's model and file are never modified) and one :class:`onnxruntime.InferenceSession`
is created from bytes — no temporary model on disk. Models whose weights live in external
data files keep them there: the serialized graph only *references* the data (onnx-ir keeps
external tensors lazy, they are never read into Python), and the session is pointed at the
data folder with the session option ``session.model_external_initializers_file_folder_path``.
onnxruntime (>= 1.2x) refuses absolute external-data locations and symlinks that leave the
model folder, so neither a temporary model with links nor rewritten absolute paths work;
the folder option does. Only an *in-memory* model above protobuf's 2 GB limit (weights
produced by a pass, not backed by a file) has its large in-memory tensors written once
into a ``tempfile.TemporaryDirectory`` as external data, because protobuf cannot
serialize it.

Graph optimization: ``ORT_ENABLE_BASIC`` by default. onnxruntime never fuses away a node
whose output is a graph output, so every requested tensor survives, and the basic level
only folds constants and removes redundant nodes, which does not change the numerics of
the tensors we read (the extended/all levels may swap in fused kernels such as
SkipLayerNorm/Attention for the *rest* of the graph, whose float rounding differs from
the fp32 graph the passes reason about).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any, Iterator, Sequence

import onnx
import onnx_ir as ir

from outlierquant.modelio import EXTERNAL_DATA_THRESHOLD

logger = logging.getLogger(__name__)


#: onnxruntime session option naming the folder external-data locations are relative to
#: when the session is created from bytes.
_EXTERNAL_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"


#: in an in-memory model too large to serialize, tensors of at least this size move to
#: a temporary external-data file.
_OFFLOAD_MIN_BYTES = 1024


def _iter_ir_tensors(graph: ir.Graph) -> Iterator[tuple[str | None, Any]]:
    """(initializer name or None, tensor) for every constant tensor of ``graph`` and its subgraphs."""
    for name, value in graph.initializers.items():
        if value.const_value is not None:
            yield name, value.const_value
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                yield None, attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                for tensor in attr.value:
                    yield None, tensor
            elif attr.type == ir.AttributeType.GRAPH:
                yield from _iter_ir_tensors(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from _iter_ir_tensors(sub)


def _iter_proto_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_proto_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_proto_tensors(sub)


@contextlib.contextmanager
def _offloaded(model: ir.Model, folder: str) -> Iterator[None]:
    """Temporarily move large in-memory initializers of ``model`` to ``folder`` as external data.

    Only for in-memory models protobuf cannot serialize; the original tensors are put back.
    """
    swapped: list[tuple[ir.Value, Any]] = []
    data_name = "in-memory-weights.data"
    try:
        with open(os.path.join(folder, data_name), "wb") as handle:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < _OFFLOAD_MIN_BYTES:
                    continue
                if tensor.dtype == ir.DataType.STRING:
                    continue
                offset = handle.tell()
                tensor.tofile(handle)
                length = handle.tell() - offset
                external = ir.ExternalTensor(
                    data_name, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=folder
                )
                swapped.append((value, tensor))
                value.const_value = external
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _in_memory_bytes(model: ir.Model) -> int:
    return sum(
        t.nbytes for _, t in _iter_ir_tensors(model.graph) if not isinstance(t, ir.ExternalTensor)
    )


def serialize_for_session(
    model: ir.Model, extra_outputs: Sequence[str], stack: contextlib.ExitStack
) -> tuple[bytes, str | None]:
    """The augmented graph as bytes, and the folder its external-data locations are relative to."""
    if _in_memory_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="outlierquant-calibration-"))
        logger.info("in-memory model above protobuf's 2 GB limit: staging its weights in %s", folder)
        with _offloaded(model, folder):
            return serialize_with_outputs(model, extra_outputs)
    return serialize_with_outputs(model, extra_outputs)


def serialize_with_outputs(model: ir.Model, extra_outputs: Sequence[str]) -> tuple[bytes, str | None]:
    # Absolute data paths of the external tensors, known to onnx-ir (the proto only keeps
    # locations relative to each tensor's own folder).
    by_name: dict[str, str] = {}
    folders: set[str] = set()
    for name, tensor in _iter_ir_tensors(model.graph):
        if isinstance(tensor, ir.ExternalTensor):
            base = os.path.abspath(tensor.base_dir or ".")
            path = os.path.normpath(os.path.join(base, os.fspath(tensor.location)))
            folders.add(base)
            if name is not None:
                by_name[name] = path

    proto = ir.to_proto(model)  # external tensors stay references: nothing is read
    present = {out.name for out in proto.graph.output}
    for name in extra_outputs:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))

    external = [
        t for t in _iter_proto_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if not external:
        return proto.SerializeToString(), None
    if len(folders) == 1:
        return proto.SerializeToString(), folders.pop()
    # Several data folders: make every location relative to their common root.
    root = os.path.commonpath(sorted(folders))
    candidates = sorted(folders)
    for tensor in external:
        entry = next(e for e in tensor.external_data if e.key == "location")
        path = by_name.get(tensor.name)
        if path is None:  # a Constant node's tensor: find the folder that has its file
            path = next(
                (os.path.join(f, entry.value) for f in candidates if os.path.exists(os.path.join(f, entry.value))),
                os.path.join(root, entry.value),
            )
        entry.value = os.path.relpath(path, root)
    return proto.SerializeToString(), root


#: the most bytes of dequantized constant weights a calibration session is handed as inputs
#: (:func:`create_session`, ``fold_dequantize``); the rest stay DequantizeLinear nodes.
FOLD_DEQUANTIZE_BYTES = 512 * 2**20


class _FedSession:
    """An InferenceSession whose constant-weight DequantizeLinear outputs are extra inputs,
    computed once, added to every run's feed."""

    def __init__(self, session: Any, constants: dict[str, Any]) -> None:
        self.session = session
        self.constants = constants

    def run(self, output_names, input_feed, run_options=None):
        feed = {**input_feed, **self.constants}
        if output_names is None:
            return self.session.run(None, feed, run_options)
        # a requested weight is one of the constants: handed back as computed
        wanted = [name for name in output_names if name not in self.constants]
        got = dict(zip(wanted, self.session.run(wanted, feed, run_options))) if wanted else {}
        return [self.constants[name] if name in self.constants else got[name] for name in output_names]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _dequantized_constants(proto: onnx.ModelProto, keep: set[str], budget: int) -> dict[str, Any]:
    """Move the DequantizeLinear nodes of ``proto`` whose inputs are all initializers out of the
    graph: their outputs become graph inputs and are returned with onnxruntime's values.

    Why: at ``ORT_ENABLE_BASIC`` onnxruntime dequantizes every int8 weight on every run, and
    a graph a quantizing pass already rewrote spent most of its run time there (MiniLM after
    ``w8a8``: 65 ms of ~90 ms per sentence). The values are computed by onnxruntime itself,
    once, with these nodes alone, and handed in as inputs rather than initializers, so no
    optimizer sees a constant it did not see before: the activations are bit-identical.
    ``keep``: outputs that must stay computed (the model's own outputs).
    """
    import onnxruntime as ort

    graph = proto.graph
    by_name = {tensor.name: tensor for tensor in graph.initializer}
    initializers = set(by_name) - {value.name for value in graph.input}  # an overridable one is not constant
    chosen: list[onnx.NodeProto] = []
    positions: set[int] = set()
    total = 0
    for position, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        if not node.input or not all(name in initializers for name in node.input if name):
            continue
        if node.output[0] in keep:
            continue
        size = 4 * _elements(by_name[node.input[0]].dims)  # the float32 weight it becomes
        if total + size > budget:
            break
        total += size
        chosen.append(node)
        positions.add(position)
    if not chosen:
        return {}
    names = [node.output[0] for node in chosen]
    used = {name for node in chosen for name in node.input if name}
    # the nodes alone, in a model of their own: onnxruntime computes exactly what it would
    # have computed inside the graph
    small = onnx.helper.make_model(
        onnx.helper.make_graph(chosen, "dequantize", [], [onnx.ValueInfoProto(name=name) for name in names],
                               [tensor for tensor in graph.initializer if tensor.name in used]),
        opset_imports=proto.opset_import, ir_version=proto.ir_version)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    values = ort.InferenceSession(small.SerializeToString(), sess_options=options,
                                  providers=["CPUExecutionProvider"]).run(names, {})
    constants = dict(zip(names, values))
    kept = [node for position, node in enumerate(graph.node) if position not in positions]
    del graph.node[:]
    graph.node.extend(kept)
    outputs = [out for out in graph.output if out.name not in constants]  # requested weights: handed back
    del graph.output[:]
    graph.output.extend(outputs)
    for name, value in constants.items():
        graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
    # the int8 initializers stay (a subgraph may read one); onnxruntime drops unused ones
    return constants


def _elements(dims) -> int:
    total = 1
    for dim in dims:
        total *= int(dim)
    return total


def create_session(
    model: ir.Model,
    extra_outputs: Sequence[str],
    session_options: Any,
    providers: Sequence[Any] | None,
    stack: contextlib.ExitStack,
    *,
    fold_dequantize: bool = False,
):
    """An onnxruntime session over ``model`` with ``extra_outputs`` added.

    Default options: ``ORT_ENABLE_BASIC`` (module docstring) and no spinning of idle
    intra-op threads: on a machine whose cores are shared, spinning threads wait for cores
    the other sessions need (MiniLM, 164 sentences on 2 loaded cores: 5.0 s with spinning,
    2.0 s without); it does not change a single value.
    ``fold_dequantize``: hand the dequantized constant weights in as inputs
    (:func:`_dequantized_constants`); the returned object then adds them to every feed.
    Not for a model whose weights stay in external data (they are never read into memory).
    """
    import onnxruntime as ort

    if session_options is None:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session_options.log_severity_level = 3
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "ai.outlierquant" in model.opset_imports:
        # a graph rewritten with our kernels (e.g. an online HadamardTransform) needs them
        # registered to run at all; fail with the reason when they were not built
        from outlierquant import custom_ops

        session_options = custom_ops.session_options(session_options)
    data, folder = serialize_for_session(model, extra_outputs, stack)
    if folder is not None:
        session_options.add_session_config_entry(_EXTERNAL_FOLDER_OPTION, folder)
        logger.debug("external data read in place from %s", folder)
    providers = list(providers or ["CPUExecutionProvider"])
    constants: dict[str, Any] = {}
    if fold_dequantize and folder is None and b"DequantizeLinear" in data:
        proto = onnx.ModelProto.FromString(data)
        own = {value.name for value in model.graph.outputs}
        constants = _dequantized_constants(proto, own, FOLD_DEQUANTIZE_BYTES)
        if constants:
            data = proto.SerializeToString()
    session = ort.InferenceSession(data, sess_options=session_options, providers=providers)
    return _FedSession(session, constants) if constants else session
