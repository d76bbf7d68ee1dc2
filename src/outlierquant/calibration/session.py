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


def create_session(
    model: ir.Model,
    extra_outputs: Sequence[str],
    session_options: Any,
    providers: Sequence[Any] | None,
    stack: contextlib.ExitStack,
):
    import onnxruntime as ort

    if session_options is None:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session_options.log_severity_level = 3
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
    return ort.InferenceSession(data, sess_options=session_options, providers=providers)
