"""Loading models safely (writing them: :mod:`outlierquant.outputs`).

- :func:`load_model` turns every way a model file can be wrong into one clear
  :class:`~outlierquant.errors.OutlierQuantError` line, and checks the opset.
- Weights stay lazy: ``onnx_ir`` keeps external tensors memory-mapped until a pass reads them.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx_ir as ir

from outlierquant.errors import InputError, UnsupportedModelError, first_line, translated

logger = logging.getLogger(__name__)

#: The default-domain opsets our passes and quantizer are written and tested against.
#: 13 brings per-axis QuantizeLinear and Softmax on the last axis; 21 the blocked DQ.
MIN_OPSET = 13
MAX_OPSET = 23

#: protobuf cannot serialize a message of 2 GiB or more; leave headroom for the graph.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _default_opset(model: ir.Model) -> int | None:
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def check_opset(model: ir.Model, source: str | os.PathLike = "model") -> int:
    """Return the default-domain opset, or raise if we cannot handle it."""
    opset = _default_opset(model)
    if opset is None:
        raise UnsupportedModelError(f"{source}: the model imports no default ONNX opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{source}: opset {opset} is not supported (supported: {MIN_OPSET}..{MAX_OPSET}); "
            "re-export the model or convert it with onnx.version_converter"
        )
    return opset


def resolve_model_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/model.onnx`` for an export folder; InputError if missing."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path


def load_model(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load an ONNX model into onnx-ir with a one-line error for every bad-input case.

    Besides an unreadable or truncated file, :func:`check_model_proto` rejects what would
    otherwise fail later, deep inside a pass or onnxruntime: tensors whose data does not
    match their shape, external data that is missing, outside the model's folder, a hard
    link or too short, tensors read before they are produced, cycles, unknown ONNX ops.
    """
    import onnx

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        candidate = path / "model.onnx"
        if candidate.is_file():
            path = candidate
        else:
            raise InputError(f"{path}: is a folder without a model.onnx")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    with translated(path):
        lifted: dict[str, tuple[int, int]] = {}
        try:
            proto, lifted = _parse_without_weights(path)
        except Exception:  # not a protobuf we can walk: the full parse below says what is wrong
            proto = None
        if proto is None:
            try:
                # Weights stay on disk: onnx_ir memory-maps external data when a pass reads it.
                proto = onnx.load(str(path), load_external_data=False)
            except Exception as exc:  # protobuf's DecodeError, a truncated message, ...
                raise InputError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
        check_model_proto(proto, path, lifted={name: span[1] - span[0] for name, span in lifted.items()})
        try:
            model = ir.serde.deserialize_model(proto)
        except Exception as exc:
            raise InputError(f"{path}: not a valid ONNX model ({first_line(exc)})") from exc
        ir.external_data.set_base_dir(model.graph, str(path.parent))
        del proto
        if lifted:
            _read_lifted(model, path, lifted)
        own_tensors(model)
    if check:
        check_opset(model, path)
    return model


_MALLOC_TRIM: Any = None


def release_freed_memory() -> None:
    """Hand the memory freed since the last call back to the operating system.

    Why: glibc keeps freed blocks smaller than its mmap threshold (which grows to 32 MiB
    as large blocks are freed) in its heap, and returns them only with ``malloc_trim``.
    A calibration session's buffers and a pass's temporaries are freed into that heap,
    so the RSS of everything after them started from the old peak: on the 65k-vocabulary
    bench model, 819 MiB after SplitQuant's quantize pass against 377 MiB trimmed, and
    the next pass's peak on top. Elsewhere (macOS, musl) this does nothing.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


#: tensor types whose numpy arrays hold the same bytes as the file (no unpacking)
_NUMPY_NATIVE = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL,
})


def own_tensors(model: ir.Model) -> None:
    """Give every inline tensor of ``model`` its own numpy buffer, so that the parsed proto
    can be freed.

    Why: onnx-ir's deserialized tensors keep the whole parsed ModelProto alive (one
    protobuf arena), and each ``numpy()`` of one is a fresh copy. A pass that rewrites a
    weight then leaves the model in memory twice (the arena and the new array), and every
    session handed a weight by reference would hold a third copy. Owned, the model is in
    memory once. Costs a second copy while it runs (one tensor at a time, the arena freed
    only at the end). Types whose arrays differ from the stored bytes (4-bit, float8,
    bfloat16, strings) stay as they are.
    """
    from onnx_ir import serde

    done: dict[int, Any] = {}  # a Constant's tensor is also its output's const_value: one copy

    def owned(tensor):
        if not isinstance(tensor, serde.TensorProtoTensor) or tensor.dtype not in _NUMPY_NATIVE:
            return tensor
        if id(tensor) not in done:
            done[id(tensor)] = (tensor, ir.Tensor(
                tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string,
                metadata_props=dict(tensor.metadata_props)))
        return done[id(tensor)][1]

    for value in model.graph.initializers.values():
        if value.const_value is not None:
            value.const_value = owned(value.const_value)
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for attr in list(node.attributes.values()):  # a subgraph's own initializers
                subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                    attr.value if attr.type == ir.AttributeType.GRAPHS else [])
                for sub in subgraphs:
                    for value in sub.initializers.values():
                        if value.const_value is not None:
                            value.const_value = owned(value.const_value)
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR:
                    tensor = owned(attr.value)
                    if tensor is not attr.value:
                        node.attributes[name] = ir.AttrTensor(name, tensor, doc_string=attr.doc_string)
                elif attr.type == ir.AttributeType.TENSORS:
                    tensors = [owned(t) for t in attr.value]
                    if any(a is not b for a, b in zip(tensors, attr.value)):
                        node.attributes[name] = ir.AttrTensors(name, tensors, doc_string=attr.doc_string)
            for value in node.outputs:
                if value.const_value is not None:
                    value.const_value = owned(value.const_value)


def check_model_proto(proto, path: str | os.PathLike = "model", *, lifted: dict[str, int] | None = None) -> None:
    """Raise :class:`InputError` for a model that no pass or runtime could run (see :func:`load_model`).

    ``lifted``: initializers of the main graph parsed without their raw data (see
    :func:`_parse_without_weights`), by name, with the byte count the file holds for each.
    """
    graph = proto.graph
    if len(graph.node) == 0:
        raise InputError(f"{path}: the ONNX graph has no nodes (corrupt or not an ONNX model)")
    _check_names(proto, path)
    folder = Path(path).parent
    files: dict[str, int] = {}
    lifted = dict(lifted or {})
    for tensor in _iter_tensors(graph):
        _check_tensor(tensor, path, folder, files, lifted)
    _check_structure(graph, path)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    for index, node in enumerate(_iter_nodes(graph)):
        if node.domain in ("", "ai.onnx") and not onnx_defs_has(node.op_type):
            raise InputError(f"{path}: node {_node_label(node, index)} uses {node.op_type!r}, which is not an ONNX operator")
        if node.domain in ("", "ai.onnx"):
            missing = _missing_attributes(node, opset)
            if missing:
                raise InputError(f"{path}: node {_node_label(node, index)} ({node.op_type}) lacks its required "
                                 f"attribute {missing[0]!r}")


def _missing_attributes(node, opset: int | None) -> list[str]:
    """Required attributes of the node's ONNX schema (at the model's opset) that it does not set:
    such a node is refused by onnxruntime, but only once a session is built, and a pass that
    never builds one (nothing to calibrate) would otherwise carry it into its output."""
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(node.op_type, opset or onnx.defs.onnx_opset_version(), "")
    except onnx.defs.SchemaError:  # no version of the op at this opset: check_opset's to say
        return []
    present = {attribute.name for attribute in node.attribute}
    return [name for name, attribute in schema.attributes.items() if attribute.required and name not in present]


def _check_names(proto, path) -> None:
    """Every string field must be text: protobuf hands back bytes for invalid UTF-8."""
    from google.protobuf.descriptor import FieldDescriptor

    stack = [proto]
    while stack:
        message = stack.pop()
        for field in message.DESCRIPTOR.fields:
            if field.type == FieldDescriptor.TYPE_STRING:
                values = getattr(message, field.name)
                values = values if field.is_repeated else [values]
                if not all(isinstance(value, str) for value in values):
                    raise InputError(f"{path}: a {message.DESCRIPTOR.name} {field.name} is not valid UTF-8 text")
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.is_repeated:
                    stack.extend(getattr(message, field.name))
                elif message.HasField(field.name):
                    stack.append(getattr(message, field.name))


def _iter_graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _iter_graphs(sub)


def onnx_defs_has(op_type: str) -> bool:
    import onnx.defs

    return bool(op_type) and onnx.defs.has(op_type, "")


def _node_label(node, index: int) -> str:
    return repr(node.name) if node.name else f"#{index} ({node.op_type})"


def _iter_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _iter_nodes(sub)


def _tensor_bytes(tensor, path) -> tuple[ir.DataType, int, int]:
    """(dtype, element count, bytes) of a TensorProto from its declared type and shape."""
    name = tensor.name or "(unnamed)"
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        raise InputError(f"{path}: tensor {name!r} has an unknown data type {tensor.data_type}") from None
    if dtype == ir.DataType.UNDEFINED:
        raise InputError(f"{path}: tensor {name!r} has no data type")
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise InputError(f"{path}: tensor {name!r} has a negative dimension {dim}")
        count *= dim
    if dtype == ir.DataType.STRING:
        return dtype, count, -1
    return dtype, count, (count * dtype.bitwidth + 7) // 8


def _check_tensor(tensor, path, folder: Path, files: dict[str, int], lifted: dict[str, int]) -> None:
    import onnx

    name = tensor.name or "(unnamed)"
    dtype, count, nbytes = _tensor_bytes(tensor, path)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        _check_external(tensor, name, nbytes, path, folder, files)
        return
    if tensor.HasField("raw_data") or tensor.name in lifted:
        # the main graph's initializers come first: a lifted name is theirs
        size = len(tensor.raw_data) if tensor.HasField("raw_data") else lifted.pop(tensor.name)
        if nbytes >= 0 and size != nbytes:
            raise InputError(f"{path}: tensor {name!r} holds {size} bytes of raw data, its shape "
                             f"{list(tensor.dims)} needs {nbytes}")
        return
    typed = (len(tensor.float_data) + len(tensor.int32_data) + len(tensor.string_data) + len(tensor.int64_data)
             + len(tensor.double_data) + len(tensor.uint64_data))
    if dtype == ir.DataType.STRING or dtype.bitwidth >= 8:
        wanted = 2 * count if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else count
        if typed != wanted:
            raise InputError(f"{path}: tensor {name!r} holds {typed} values, its shape {list(tensor.dims)} needs {wanted}")


def _check_external(tensor, name: str, nbytes: int, path, folder: Path, files: dict[str, int]) -> None:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise InputError(f"{path}: tensor {name!r} is stored outside the model but names no file")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise InputError(f"{path}: tensor {name!r} has a non-numeric external data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"{path}: tensor {name!r} has a negative external data offset or length")
    if location not in files:
        files[location] = _external_file_size(location, name, path, folder)
    size = files[location]
    needed = nbytes if length is None else length
    if length is not None and nbytes >= 0 and length != nbytes:
        raise InputError(f"{path}: tensor {name!r} has {length} bytes of external data, its shape "
                         f"{list(tensor.dims)} needs {nbytes}")
    if offset + needed > size:
        raise InputError(f"{path}: tensor {name!r} reads bytes {offset}..{offset + needed} of {location}, "
                         f"which has {size} (truncated external data?)")


def _external_file_size(location: str, name: str, path, folder: Path) -> int:
    """The size of an external data file after the checks onnx_ir makes when it maps it."""
    if "\0" in location:
        raise InputError(f"{path}: tensor {name!r} has an external data location with a NUL character")
    if os.path.isabs(location):
        raise InputError(f"{path}: tensor {name!r} has an absolute external data location {location!r}")
    base = os.path.realpath(folder)
    target = os.path.realpath(folder / location)
    if os.path.commonpath([base, target]) != base or os.path.normpath(location).split(os.sep)[0] == "..":
        raise InputError(f"{path}: tensor {name!r} has external data {location!r} outside the model's folder")
    try:
        info = os.stat(target)
    except FileNotFoundError:
        raise InputError(f"{path}: external data file {location!r} (tensor {name!r}) does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: external data {location!r} (tensor {name!r}) is not a regular file")
    if info.st_nlink > 1:
        # onnx_ir refuses hard-linked data: a link could bring any file into the folder
        raise InputError(f"{path}: external data file {location!r} has {info.st_nlink} hard links; "
                         "copy it (cp) instead of linking it")
    return info.st_size


def _check_structure(graph, path) -> None:
    """Every tensor a node reads is produced once, before it, and the graph has no cycle."""
    sources = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    sources |= {sparse.values.name for sparse in graph.sparse_initializer}
    inputs = {value.name for value in graph.input}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in inputs:
                raise InputError(f"{path}: tensor {name!r} is produced twice (node {_node_label(node, index)})")
            producer[name] = index
    waiting = [0] * len(graph.node)
    consumers: dict[int, list[int]] = {}
    for index, node in enumerate(graph.node):
        needs = set()
        outer = _outer_names(node)
        for name in list(node.input) + outer:
            if not name or name in sources:
                continue
            if name not in producer:
                if name in outer:
                    continue  # a subgraph's own tensor, or one from further out: checked by onnxruntime
                raise InputError(f"{path}: node {_node_label(node, index)} reads {name!r}, which no node, "
                                 "graph input or initializer provides")
            needs.add(producer[name])
        waiting[index] = len(needs)
        for source in needs:
            consumers.setdefault(source, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for consumer in consumers.get(index, ()):
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    if done < len(graph.node):
        stuck = next(index for index, count in enumerate(waiting) if count > 0)
        raise InputError(f"{path}: the graph has a cycle (node {_node_label(graph.node[stuck], stuck)} "
                         "depends on its own output)")
    for value in graph.output:
        if value.name not in sources and value.name not in producer:
            raise InputError(f"{path}: graph output {value.name!r} is never computed")


def _outer_names(node) -> list[str]:
    """Names a node's subgraphs read without defining them (If/Loop/Scan bodies)."""
    names: list[str] = []
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            defined = {value.name for value in sub.input} | {init.name for init in sub.initializer}
            defined |= {name for inner in _iter_nodes(sub) for name in inner.output}
            names += [name for inner in _iter_nodes(sub) for name in inner.input if name and name not in defined]
    return names


# Protobuf field numbers (onnx.proto) of the messages that can hold a tensor, and the
# wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODES = 7
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTES = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _fields(data, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field, wire type, start, end)`` of each field of the message in ``data[start:end]``
    (for a length-delimited field, its payload's span; else the span of its value)."""
    pos = start

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("truncated or malformed varint")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            begin = pos
            varint()
            yield field, wire, begin, pos
        elif wire == 2:
            length = varint()
            if pos + length > end:
                raise ValueError("field runs past its message")
            yield field, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            begin, pos = pos, pos + (8 if wire == 1 else 4)
            yield field, wire, begin, pos
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _external_locations(path: Path) -> list[str]:
    """The ``location`` of every external-data tensor of the model file at ``path``.

    Why not ``onnx.load(..., load_external_data=False)``: that parses the whole file, and a
    model with inline weights is then in memory twice over (its bytes and the parsed
    message) just to learn it has no external data — 560 MiB for a 280 MiB model, more
    than a quantizing pass needs. This walks protobuf's wire format over a memory map and
    only reads the fields on the way to a tensor's ``external_data`` entries; the weight
    bytes are skipped, never touched.
    """
    import mmap

    locations: list[str] = []
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return locations
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:

            def tensor(start: int, end: int) -> None:
                for field, wire, a, b in _fields(data, start, end):
                    if field == _TENSOR_EXTERNAL_DATA and wire == 2:
                        entry = {f: bytes(data[x:y]) for f, w, x, y in _fields(data, a, b) if w == 2}
                        if entry.get(_ENTRY_KEY) == b"location" and _ENTRY_VALUE in entry:
                            locations.append(entry[_ENTRY_VALUE].decode("utf-8", "replace"))

            def sparse(start: int, end: int) -> None:
                for field, wire, a, b in _fields(data, start, end):
                    if field in (_SPARSE_VALUES, _SPARSE_INDICES) and wire == 2:
                        tensor(a, b)

            def node(start: int, end: int) -> None:
                for field, wire, a, b in _fields(data, start, end):
                    if field != _NODE_ATTRIBUTES or wire != 2:
                        continue
                    for kind, w, x, y in _fields(data, a, b):
                        if w != 2:
                            continue
                        if kind in (_ATTR_TENSOR, _ATTR_TENSORS):
                            tensor(x, y)
                        elif kind in (_ATTR_GRAPH, _ATTR_GRAPHS):
                            graph(x, y)
                        elif kind in (_ATTR_SPARSE, _ATTR_SPARSES):
                            sparse(x, y)

            def graph(start: int, end: int) -> None:
                for field, wire, a, b in _fields(data, start, end):
                    if wire != 2:
                        continue
                    if field == _GRAPH_INITIALIZERS:
                        tensor(a, b)
                    elif field == _GRAPH_NODES:
                        node(a, b)
                    elif field == _GRAPH_SPARSE:
                        sparse(a, b)

            for field, wire, a, b in _fields(data, 0, len(data)):
                if wire != 2:
                    continue
                if field == _MODEL_GRAPH:
                    graph(a, b)
                elif field == _MODEL_FUNCTIONS:
                    for inner, w, x, y in _fields(data, a, b):
                        if inner == _FUNCTION_NODES and w == 2:
                            node(x, y)
    return locations


#: TensorProto fields: the ones a lifted tensor may carry besides its raw data
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DOC = 1, 2, 8, 9, 12
_TENSOR_METADATA = 16
#: initializers at least this large are read straight from the file (see _parse_without_weights)
_LIFT_MIN_BYTES = 4096


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _parse_without_weights(path: Path):
    """``(ModelProto, lifted)``: the model parsed with the raw data of the main graph's
    large inline initializers left out; ``lifted`` maps each such tensor's name to the
    ``(start, end)`` of its bytes in the file. ``(None, {})`` when there is nothing to lift.

    Why: ``onnx.load`` reads the file's bytes and parses them into a message that holds a
    second copy, and onnx-ir's tensors then keep that message alive; a 280 MiB model took
    about 560 MiB to load and a third copy once its tensors were owned. Here the wire format
    is walked over a memory map (as :func:`_external_locations` does), a copy of the file
    without those payloads is parsed (kilobytes to a few MiB), and :func:`_read_lifted`
    reads each payload once into the array the model keeps. Only plain little-endian
    numeric raw data is lifted; everything else is parsed as before.
    """
    import mmap

    import onnx

    if sys.byteorder != "little":
        return None, {}
    lifted: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:

        def lean_tensor(start: int, end: int) -> bytes | None:
            """The tensor without its raw data, or None to keep it whole."""
            raw = name = None
            header = bytearray()
            previous = start
            for field, wire, a, b in _fields(data, start, end):
                if field == _TENSOR_RAW_DATA and wire == 2 and raw is None:
                    raw = (a, b)
                elif field == _TENSOR_NAME and wire == 2 and name is None:
                    name = bytes(data[a:b]).decode("utf-8")
                    header += data[previous:b]
                elif field in (_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_DOC, _TENSOR_METADATA):
                    header += data[previous:b]
                else:  # typed data, external data, segments, a second raw data: not ours
                    return None
                previous = b
            if raw is None or name is None or name in lifted or raw[1] - raw[0] < _LIFT_MIN_BYTES:
                return None
            header_proto = onnx.TensorProto.FromString(bytes(header))
            try:
                dtype = ir.DataType(header_proto.data_type)
            except ValueError:
                return None
            if dtype not in _NUMPY_NATIVE:
                return None
            lifted[name] = raw
            return bytes(header)

        def lean_graph(start: int, end: int) -> bytes:
            out = bytearray()
            previous = start
            for field, wire, a, b in _fields(data, start, end):
                header = lean_tensor(a, b) if field == _GRAPH_INITIALIZERS and wire == 2 else None
                if header is None:
                    out += data[previous:b]
                else:
                    out += _varint_bytes(_GRAPH_INITIALIZERS << 3 | 2) + _varint_bytes(len(header)) + header
                previous = b
            return bytes(out)

        model = bytearray()
        previous, graphs = 0, 0
        for field, wire, a, b in _fields(data, 0, len(data)):
            if field == _MODEL_GRAPH and wire == 2:
                graphs += 1
                graph = lean_graph(a, b)
                model += _varint_bytes(_MODEL_GRAPH << 3 | 2) + _varint_bytes(len(graph)) + graph
            else:
                model += data[previous:b]
            previous = b
        if graphs != 1 or not lifted:  # protobuf merges repeated graph fields: leave that to it
            return None, {}
    return onnx.ModelProto.FromString(bytes(model)), lifted


def _read_lifted(model: ir.Model, path: Path, lifted: dict[str, tuple[int, int]]) -> None:
    """Give each lifted initializer its data, read from the file into a fresh array."""
    lifted = dict(lifted)
    with open(path, "rb") as handle:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            span = lifted.pop(tensor.name, None) if tensor is not None else None
            if span is None:
                continue
            buffer = np.empty(span[1] - span[0], np.uint8)
            handle.seek(span[0])
            if handle.readinto(memoryview(buffer)) != buffer.size:
                raise InputError(f"{path}: tensor {value.name!r} is cut short (truncated file?)")
            array = buffer.view(tensor.dtype.numpy()).reshape(tuple(tensor.shape.numpy()))
            value.const_value = ir.Tensor(array, dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string,
                                          metadata_props=dict(tensor.metadata_props))
    if lifted:  # a tensor left without its data would be read as garbage later: say so now
        raise InputError(f"{path}: initializer {next(iter(lifted))!r} was not found in the parsed graph")


def model_files(path: str | os.PathLike) -> list[Path]:
    """A model file and the external data files it references (those that exist)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    files = [path]
    try:
        locations = _external_locations(path)
    except Exception:  # not readable: load_model says why, and only the file itself is at stake
        return files
    seen = set()
    for location in locations:
        if "\0" not in location and location not in seen:
            seen.add(location)
            if (path.parent / location).exists():
                files.append(path.parent / location)
    return files

def check_finite_weights(model: ir.Model, source: str | os.PathLike = "model") -> None:
    """Raise if a float initializer holds NaN or Inf: no scale computed from it would mean anything."""
    import numpy as np

    for graph in model.graphs():
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or not tensor.dtype.is_floating_point():
                continue
            array = tensor.numpy()
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InputError(f"{source}: weight {name!r} holds NaN or Inf")


def model_weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (without loading lazy tensors)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def model_file_bytes(path: str | os.PathLike) -> int:
    """Size of a saved model on disk: the .onnx plus the external data files it references."""
    return sum(file.stat().st_size for file in model_files(path))


def _iter_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _iter_tensors(sub)


