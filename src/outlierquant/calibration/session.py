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

Memory: the large in-memory weights are not serialized at all. :func:`_bindable` picks the
weights onnxruntime only *reads at run time* (the B of a MatMul/Gemm, the table of a
Gather, each consumer with an input that depends on the feeds); they go into the proto as
external-data stubs (a sparse file in a temporary folder) and are handed to the session
with ``SessionOptions.add_initializer``, which uses the caller's numpy buffer itself. So
a calibration session costs no copy of those weights, where serializing them costs three
(the proto, its bytes, onnxruntime's own copy). Why only those: onnxruntime's graph
optimizers read an initializer from the *proto* (constant folding a Transpose of a
weight, fusing a BatchNormalization into a Conv), and would read the stub's zeros; a
node with an input fed at run time is never folded, and no basic-level optimizer reads
the data of a MatMul B or a Gather table. ``tests/test_calibration.py`` checks the bound
session against the serialized one, bit for bit, on a graph with each of those patterns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any, Iterable, Iterator, Sequence

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


#: in-memory weights of at least this size are handed to the session by reference
#: (:func:`_bindable`); smaller ones are not worth a stub.
BIND_MIN_BYTES = 64 * 1024

#: (domain, op type) -> the input index whose constant onnxruntime only reads at run time
_BINDABLE_USES = {("", "MatMul"): 1, ("", "Gemm"): 1, ("", "Gather"): 0}
_BINDABLE_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
#: ops whose outputs onnxruntime may fold from static shapes alone
_SHAPE_OPS = frozenset({"Shape", "Size"})


def _fed_values(graph: ir.Graph) -> set[ir.Value]:
    """Values of ``graph`` that depend on a fed input (never constant folded). Shape and
    Size outputs do not count: onnxruntime folds them when the shapes are static."""
    fed = {value for value in graph.inputs if value.name not in graph.initializers}
    for node in graph:  # topological order, as ONNX requires
        if node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx"):
            continue
        if any(value in fed for value in node.inputs if value is not None):
            fed.update(node.outputs)
    return fed


def _bindable(model: ir.Model, extra_outputs: Sequence[str]) -> dict[str, ir.Value]:
    """The in-memory initializers a session can read from the caller's buffers (module doc)."""
    graph = model.graph
    fed = _fed_values(graph)
    keep = set(extra_outputs) | {value.name for value in graph.outputs} | {value.name for value in graph.inputs}
    chosen: dict[str, ir.Value] = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if (tensor is None or isinstance(tensor, ir.ExternalTensor) or name in keep
                or tensor.dtype not in _BINDABLE_DTYPES or tensor.nbytes < BIND_MIN_BYTES):
            continue
        uses = list(value.uses())
        if uses and all(
            use.node.graph is graph
            and _BINDABLE_USES.get((use.node.domain if use.node.domain != "ai.onnx" else "", use.node.op_type)) == use.idx
            and any(other in fed for other in use.node.inputs if other is not None)
            for use in uses
        ):
            chosen[name] = value
    return chosen


@contextlib.contextmanager
def _stubbed(values: dict[str, ir.Value], folder: str, unread: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Swap ``values``' tensors for external-data stubs in a sparse file of ``folder``
    (onnxruntime checks that the file exists and is long enough; nothing reads it) and
    yield the arrays of those not named in ``unread``; the tensors are put back after.
    An ``unread`` tensor is never evaluated: a lazy one (a transposed tied head, a
    SplitQuant part) would otherwise be computed only to be dropped."""
    import numpy as np

    data_name = "bound-weights.stub"
    arrays: dict[str, Any] = {}
    swapped: list[tuple[ir.Value, Any]] = []
    unread = set(unread)
    try:
        longest = 0
        for name, value in values.items():
            tensor = value.const_value
            if name in unread:
                nbytes = tensor.nbytes
            else:
                array = np.ascontiguousarray(tensor.numpy())
                arrays[name] = array
                nbytes = array.nbytes
            longest = max(longest, nbytes)
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                data_name, 0, nbytes, tensor.dtype, shape=tensor.shape, name=name, base_dir=folder
            )
        with open(os.path.join(folder, data_name), "wb") as handle:
            handle.truncate(longest)  # sparse: no disk, no memory
        yield arrays
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _subgraph_inputs(node: ir.Node) -> Iterator[ir.Value]:
    """Every value a node's subgraphs read (the outer-scope ones among them)."""
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            attr.value if attr.type == ir.AttributeType.GRAPHS else [])
        for graph in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                yield from (value for value in inner.inputs if value is not None)


def _dead_initializers(model: ir.Model, outputs: Sequence[str]) -> dict[str, ir.Value]:
    """The initializers no node that ``outputs`` depend on reads."""
    graph = model.graph
    needed = {value for value in graph.outputs if value.name in outputs}
    needed |= {value for node in graph for value in node.outputs if value.name in outputs}
    for node in reversed(list(graph)):
        if any(value in needed for value in node.outputs):
            needed.update(value for value in node.inputs if value is not None)
            needed.update(_subgraph_inputs(node))
    return {name: value for name, value in graph.initializers.items()
            if value not in needed and value.const_value is not None
            and not isinstance(value.const_value, ir.ExternalTensor)}


def _prune_proto(graph: onnx.GraphProto) -> None:
    """Drop the nodes no graph output depends on, and the initializers left unread."""

    def refs(node: onnx.NodeProto) -> Iterator[str]:
        yield from node.input
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                for inner in sub.node:
                    yield from refs(inner)

    needed = {out.name for out in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(refs(node))
    if len(keep) < len(graph.node):
        kept = list(reversed(keep))
        del graph.node[:]
        graph.node.extend(kept)
    unread = [t for t in graph.initializer if t.name not in needed]
    for tensor in unread:
        graph.initializer.remove(tensor)
    # an old-style model also lists its initializers as graph inputs: without its
    # initializer such an input would become one the caller must feed
    dropped = {tensor.name for tensor in unread}
    for value in [v for v in graph.input if v.name in dropped]:
        graph.input.remove(value)


def serialize_for_session(
    model: ir.Model, extra_outputs: Sequence[str], stack: contextlib.ExitStack, *, bind: bool = True,
    only_extra: bool = False,
) -> tuple[bytes, str | None, dict[str, Any]]:
    """The augmented graph as bytes, the folder its external-data locations are relative
    to, and the arrays of the weights to hand to the session by reference (module doc).
    ``only_extra``: see :func:`serialize_with_outputs`."""
    # weights only pruned nodes read: stubbed like the bound ones, so that no copy is made
    # of what the session drops anyway (a decoder's LM head, when its input is fetched),
    # and never evaluated (a lazy tensor would be computed just to be dropped)
    dead = {name: value for name, value in _dead_initializers(model, extra_outputs).items()
            if value.const_value.nbytes >= BIND_MIN_BYTES} \
        if only_extra and extra_outputs else {}
    bound = {name: value for name, value in _bindable(model, extra_outputs).items()
             if name not in dead} if bind else {}
    with contextlib.ExitStack() as swap:
        arrays: dict[str, Any] = {}
        if bound or dead:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="outlierquant-session-"))
            arrays = swap.enter_context(_stubbed({**bound, **dead}, folder, unread=dead))
        if _in_memory_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="outlierquant-calibration-"))
            logger.info("in-memory model above protobuf's 2 GB limit: staging its weights in %s", folder)
            swap.enter_context(_offloaded(model, folder))
        data, root = serialize_with_outputs(model, extra_outputs, only_extra=only_extra)
    return data, root, arrays


def serialize_with_outputs(model: ir.Model, extra_outputs: Sequence[str], *,
                           only_extra: bool = False) -> tuple[bytes, str | None]:
    """``model`` serialized with ``extra_outputs`` as graph outputs, and the folder its
    external-data locations are relative to.

    ``only_extra``: the graph's outputs are ``extra_outputs`` alone (when there are any),
    and the nodes no fetched tensor depends on are dropped (with the weights only they
    read). Why: a session that only reads activations would otherwise still compute the
    model's outputs on every run, and a decoder's logits (tokens x vocabulary) are the
    largest tensor it makes — on a 65k-vocabulary model, 512 MiB for a batch of 2048
    tokens and a third of the run. onnxruntime does not drop such nodes itself: with the
    outputs replaced and :func:`_prune_proto` skipped, ``bench_pipeline.py --cases
    vocab:w8a8`` peaked at 1.2 GB in calibration, against 0.75 GB pruned.
    """
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
    if only_extra and extra_outputs:
        del proto.graph.output[:]
    present = {out.name for out in proto.graph.output}
    for name in extra_outputs:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    if only_extra and extra_outputs:
        _prune_proto(proto.graph)

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
    bind_weights: bool | None = None,
    only_extra: bool = False,
):
    """An onnxruntime session over ``model`` with ``extra_outputs`` added.

    Default options: ``ORT_ENABLE_BASIC`` (module docstring) and no spinning of idle
    intra-op threads: on a machine whose cores are shared, spinning threads wait for cores
    the other sessions need (MiniLM, 164 sentences on 2 loaded cores: 5.0 s with spinning,
    2.0 s without); it does not change a single value. And no prepacking of constant
    weights: onnxruntime's MatMul keeps a packed copy of each, a second copy of the model
    for the session's lifetime (with the weights bound by reference, the only one; the
    65k-vocabulary bench model's w8a8-outputs peak went from 717 to 565 MiB). GEMM then packs
    per call, which costs the calibration runs nothing measurable (MiniLM default: 3.1 s
    vs 3.4 s, w8a8: 0.95 vs 0.88, one run each), but the other kernel path rounds some
    activations differently in the last bit, so statistics (and the scales made from them)
    move by about 1e-7 relative.
    ``fold_dequantize``: hand the dequantized constant weights in as inputs
    (:func:`_dequantized_constants`); the returned object then adds them to every feed.
    Not for a model whose weights stay in external data (they are never read into memory).
    ``bind_weights``: hand the large weights to the session by reference (:func:`_bindable`);
    it adds them to ``session_options``, so the default is to bind only into options made
    here (a caller's object may serve another session, which must not see them).
    ``only_extra``: the session computes ``extra_outputs`` only, not the model's own
    outputs (:func:`serialize_with_outputs`).
    """
    import onnxruntime as ort

    if bind_weights is None:
        bind_weights = session_options is None
    if session_options is None:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session_options.log_severity_level = 3
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session_options.add_session_config_entry("session.disable_prepacking", "1")
    if "ai.outlierquant" in model.opset_imports:
        # a graph rewritten with our kernels (e.g. an online HadamardTransform) needs them
        # registered to run at all; fail with the reason when they were not built
        from outlierquant import custom_ops

        session_options = custom_ops.session_options(session_options)
    on_disk = any(isinstance(t, ir.ExternalTensor) for _, t in _iter_ir_tensors(model.graph))
    data, folder, arrays = serialize_for_session(model, extra_outputs, stack, bind=bind_weights, only_extra=only_extra)
    if folder is not None:
        session_options.add_session_config_entry(_EXTERNAL_FOLDER_OPTION, folder)
        logger.debug("external data read in place from %s", folder)
    if arrays:
        values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
        for name, value in zip(arrays, values):
            session_options.add_initializer(name, value)
        # onnxruntime reads these buffers for the session's whole life: keep them alive with it
        stack.callback(values.clear)
    providers = list(providers or ["CPUExecutionProvider"])
    constants: dict[str, Any] = {}
    if fold_dequantize and not on_disk and b"DequantizeLinear" in data:
        proto = onnx.ModelProto.FromString(data)
        own = {value.name for value in model.graph.outputs}
        constants = _dequantized_constants(proto, own, FOLD_DEQUANTIZE_BYTES)
        if constants:
            data = proto.SerializeToString()
    session = ort.InferenceSession(data, sess_options=session_options, providers=providers)
    return _FedSession(session, constants) if constants else session
