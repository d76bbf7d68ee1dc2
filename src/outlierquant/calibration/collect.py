"""Stream per-channel activation statistics through onnxruntime.

What is computed: for every *target* tensor — by default the activation input (and
output) of each MatMul / Gemm / Conv with a constant weight, and both inputs of
activation x activation MatMuls (attention ``Q @ K^T`` and ``P @ V``) — the
:class:`~outlierquant.calibration.stats.ChannelStats` over all calibration samples:
abs-max, min, max, mean and mean-square per channel, and a covariance where a pass asks
for one (``covariance_for``). The channel axis is the reduction axis of the consumer:
the last axis of a MatMul input, axis 1 of a Gemm input (0 with ``transA``) and of a
Conv input. Outputs use the output-feature axis.

How: the target tensors are added as extra outputs on a *serialized copy* of the graph
(the caller's model and file are never modified) and one
:class:`onnxruntime.InferenceSession` is created from bytes — no temporary model on disk.
Models whose weights live in external data files keep them there: the serialized graph
only *references* the data (onnx-ir keeps external tensors lazy, they are never read into
Python), and the session is pointed at the data folder with the session option
``session.model_external_initializers_file_folder_path``. onnxruntime (>= 1.2x) refuses
absolute external-data locations and symlinks that leave the model folder, so neither a
temporary model with links nor rewritten absolute paths work; the folder option does.
Only an *in-memory* model above protobuf's 2 GB limit (weights produced by a pass, not
backed by a file) has its large in-memory tensors written once into a
``tempfile.TemporaryDirectory`` as external data, because protobuf cannot serialize it.

Graph optimization: ``ORT_ENABLE_BASIC`` by default. onnxruntime never fuses away a node
whose output is a graph output, so every requested tensor survives, and the basic level
only folds constants and removes redundant nodes, which does not change the numerics of
the tensors we read (the extended/all levels may swap in fused kernels such as
SkipLayerNorm/Attention for the *rest* of the graph, whose float rounding differs from
the fp32 graph the passes reason about).

Batching without padding: consecutive feeds whose inputs all have identical shapes and
dtypes are concatenated along axis 0 into one run, up to about ``batch_tokens`` tokens
(positions of a ``[B, S]`` input; pixels of an image input). Ragged samples are never
padded. Only the outputs of one run are alive at a time; they are folded into the
statistics and released, so memory is O(one batch of activations + channels^2 per
covariance), not O(dataset).

Padding never reaches a range. A feed with an ``attention_mask`` that contains zeros (a
padded ``.npz`` from a user) is handled in two ways, most exact first:

1. *Unpadding*: when every input has leading dims ``[B, S]`` equal to the mask's and each
   row's unmasked positions are one contiguous run (right or left padding), the feed is
   split into unpadded batch-1 samples before it reaches the model, so the activations are
   exactly those of unpadded samples.
2. *Masking the activations*: otherwise the padded feed is run as is and, for each target,
   the masked positions are dropped before the update when the layout can be mapped to the
   mask: ``[B, S, ..., C]``; ``[B, H, S, ..., D]`` (attention heads; the channel must not be
   the S axis); ``[B*H, S, ..., D]``; ``[B*S, C]``. A tensor with no axis of length S holds
   no per-position data and is used whole. Anything else (e.g. ``K^T`` laid out
   ``[B, H, D, S]``, whose channel axis is the padded one) cannot be mapped: a warning is
   logged once for that tensor and its statistics include the padded positions.

A target whose size along its channel axis changes between samples (the last axis of
``K^T`` or of the attention probabilities, which is the sequence length) cannot have
per-channel statistics; it is reduced to per-tensor statistics (one channel), logged once,
and listed in ``ActivationStats.meta["per_tensor"]``.

Non-finite activations, empty data and feeds that do not match the model's inputs raise
:class:`~outlierquant.errors.CalibrationError` with one line naming the tensor or input
and the sample index (the position of the feed in the iterable, from 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats, ChannelStats
from outlierquant.errors import CalibrationError
from outlierquant.modelio import EXTERNAL_DATA_THRESHOLD, load_model

logger = logging.getLogger(__name__)

#: onnxruntime session option naming the folder external-data locations are relative to
#: when the session is created from bytes.
_EXTERNAL_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"

#: in an in-memory model too large to serialize, tensors of at least this size move to
#: a temporary external-data file.
_OFFLOAD_MIN_BYTES = 1024

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class CalibrationTarget:
    """A tensor to calibrate and the axis its channels lie on.

    ``role`` is ``"input"`` (activation input of a layer with a constant weight),
    ``"output"`` (that layer's output) or ``"dynamic_input"`` (an input of an
    activation x activation MatMul). ``node`` names the consuming (or producing) node.
    """

    tensor: str
    channel_axis: int
    node: str
    role: str


# ---------------------------------------------------------------------------------------
# Targets


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in _ONNX_DOMAINS


def quantizable_targets(model: ir.Model, *, outputs: bool = True) -> list[CalibrationTarget]:
    """The tensors whose statistics quantization needs, in graph order, one per tensor name.

    MatMul/Gemm/Conv nodes of the main graph with a constant weight (an initializer or a
    ``Constant`` node's value) contribute their activation input and, if ``outputs``, their
    output; activation x activation MatMuls contribute both inputs (``"dynamic_input"``,
    channel axis last). A tensor feeding several layers appears once; when a tensor is both
    a layer's output and another layer's input, the input role wins.
    """
    found: dict[str, CalibrationTarget] = {}

    def add(value: ir.Value | None, axis: int, node: ir.Node, role: str) -> None:
        if value is None or not value.name or _is_constant(value):
            return
        existing = found.get(value.name)
        if existing is None or (existing.role == "output" and role != "output"):
            found[value.name] = CalibrationTarget(value.name, axis, node.name or "", role)

    for node in model.graph:
        if node.domain not in _ONNX_DOMAINS or node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        inputs = list(node.inputs) + [None, None]
        first, second = inputs[0], inputs[1]
        output = node.outputs[0] if node.outputs else None
        if node.op_type == "MatMul":
            if _is_constant(second) and not _is_constant(first):
                add(first, -1, node, "input")
                if outputs:
                    add(output, -1, node, "output")
            elif _is_constant(first) and not _is_constant(second):
                # W @ X: X's channels are the reduction axis, the second-to-last one.
                add(second, -2, node, "input")
                if outputs:
                    add(output, -2, node, "output")
            elif first is not None and second is not None and not _is_constant(first):
                add(first, -1, node, "dynamic_input")
                add(second, -1, node, "dynamic_input")
        elif node.op_type == "Gemm":
            trans_a = _int_attr(node, "transA")
            trans_b = _int_attr(node, "transB")
            if _is_constant(second) and not _is_constant(first):
                add(first, 0 if trans_a else 1, node, "input")
                if outputs:
                    add(output, 1, node, "output")
            elif _is_constant(first) and not _is_constant(second):
                add(second, 1 if trans_b else 0, node, "input")
                if outputs:
                    add(output, 0, node, "output")
        else:  # Conv
            if _is_constant(second) and not _is_constant(first):
                add(first, 1, node, "input")
                if outputs:
                    add(output, 1, node, "output")
    return list(found.values())


def _int_attr(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else 0


def _resolve_targets(
    model: ir.Model, tensors: Iterable[str | CalibrationTarget] | None
) -> list[CalibrationTarget]:
    if tensors is None:
        targets = quantizable_targets(model)
    else:
        known = {t.tensor: t for t in quantizable_targets(model)}
        targets = []
        for item in tensors:
            if isinstance(item, CalibrationTarget):
                targets.append(item)
            elif isinstance(item, str):
                # A bare name gets the axis its consumer implies, else the last axis.
                targets.append(known.get(item, CalibrationTarget(item, -1, "", "input")))
            else:
                raise TypeError(f"tensors: expected names or CalibrationTarget, got {type(item).__name__}")
    graph_inputs = {v.name for v in model.graph.inputs}
    produced = set(graph_inputs)
    for node in model.graph:
        produced.update(out.name for out in node.outputs)
    unique: dict[str, CalibrationTarget] = {}
    for target in targets:
        if target.tensor in model.graph.initializers and target.tensor not in graph_inputs:
            raise CalibrationError(f"tensor {target.tensor!r} is a constant (initializer), not an activation")
        if target.tensor not in produced:
            raise CalibrationError(f"tensor {target.tensor!r} is not a value of the model's main graph")
        unique.setdefault(target.tensor, target)
    return list(unique.values())


# ---------------------------------------------------------------------------------------
# Inputs and feeds


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype | None
    #: one entry per dim: an int for a fixed dim, None for a symbolic one; None if unknown rank
    shape: tuple[int | None, ...] | None
    required: bool


def _input_specs(model: ir.Model) -> dict[str, _InputSpec]:
    specs = {}
    for value in model.graph.inputs:
        dtype = None
        if value.dtype is not None:
            try:
                dtype = np.dtype(value.dtype.numpy())
            except Exception:  # a dtype numpy has no name for (bfloat16, float8): not checked
                dtype = None
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else None for d in value.shape)
        specs[value.name] = _InputSpec(value.name, dtype, shape, value.name not in model.graph.initializers)
    return specs


def _check_feed(index: int, feed: Any, specs: Mapping[str, _InputSpec]) -> dict[str, np.ndarray]:
    """Validate one feed against the model's inputs; return it as numpy arrays."""
    where = f"calibration sample {index}"
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    expected = ", ".join(specs) or "(none)"
    arrays: dict[str, np.ndarray] = {}
    for name, value in feed.items():
        spec = specs.get(name)
        if spec is None:
            raise CalibrationError(f"{where}: the model has no input {name!r} (model inputs: {expected})")
        array = np.asarray(value)
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise CalibrationError(f"{where}: input {name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise CalibrationError(
                    f"{where}: input {name!r} has rank {array.ndim} (shape {tuple(array.shape)}), "
                    f"the model expects rank {len(spec.shape)} ({_format_shape(spec.shape)})"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if want is not None and got != want:
                    raise CalibrationError(
                        f"{where}: input {name!r} has shape {tuple(array.shape)}, the model expects "
                        f"{_format_shape(spec.shape)} (dim {axis} must be {want})"
                    )
        arrays[name] = array
    for spec in specs.values():
        if spec.required and spec.name not in arrays:
            raise CalibrationError(f"{where}: input {spec.name!r} is missing (model inputs: {expected})")
    return arrays


def _format_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _iterate_feeds(feeds: Any) -> Iterator[Any]:
    if hasattr(feeds, "get_next") and callable(feeds.get_next):
        return iter(feeds.get_next, None)  # onnxruntime's CalibrationDataReader protocol
    if isinstance(feeds, Mapping):
        return iter([feeds])  # a single feed
    try:
        return iter(feeds)
    except TypeError:
        raise CalibrationError(
            f"calibration data must be an iterable of feeds or a reader with get_next(), "
            f"got {type(feeds).__name__}"
        ) from None


def _unpad(feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
    """Split a padded feed into unpadded batch-1 feeds, or None when that is not possible.

    Returns ``[feed]`` when there is no padding.
    """
    mask = feed.get("attention_mask")
    if mask is None or mask.ndim != 2 or mask.all():
        return [feed]
    if any(a.ndim < 2 or a.shape[:2] != mask.shape for a in feed.values()):
        return None
    pieces = []
    for row in range(mask.shape[0]):
        positions = np.flatnonzero(mask[row])
        if positions.size == 0:
            continue  # a row of padding only
        lo, hi = int(positions[0]), int(positions[-1]) + 1
        if hi - lo != positions.size:
            return None  # holes inside the row: not plain left/right padding
        pieces.append({name: a[row : row + 1, lo:hi] for name, a in feed.items()})
    return pieces


def _feed_tokens(feed: Mapping[str, np.ndarray]) -> int:
    """Size of a feed in tokens (positions of [B, S] inputs; pixels of [N, C, H, W] inputs)."""
    tokens = 1
    for array in feed.values():
        if array.ndim <= 2:
            n = array.size
        elif array.ndim == 3:
            n = array.size // max(array.shape[-1], 1)
        else:
            n = array.size // max(array.shape[1], 1)
        tokens = max(tokens, int(n))
    return tokens


def _real_tokens(feed: Mapping[str, np.ndarray]) -> int:
    mask = feed.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        return int(np.count_nonzero(mask))
    return _feed_tokens(feed)


# ---------------------------------------------------------------------------------------
# The session


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


def _serialize_for_session(
    model: ir.Model, extra_outputs: Sequence[str], stack: contextlib.ExitStack
) -> tuple[bytes, str | None]:
    """The augmented graph as bytes, and the folder its external-data locations are relative to."""
    if _in_memory_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="outlierquant-calibration-"))
        logger.info("in-memory model above protobuf's 2 GB limit: staging its weights in %s", folder)
        with _offloaded(model, folder):
            return _serialize_with_outputs(model, extra_outputs)
    return _serialize_with_outputs(model, extra_outputs)


def _serialize_with_outputs(model: ir.Model, extra_outputs: Sequence[str]) -> tuple[bytes, str | None]:
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


def _create_session(
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
    data, folder = _serialize_for_session(model, extra_outputs, stack)
    if folder is not None:
        session_options.add_session_config_entry(_EXTERNAL_FOLDER_OPTION, folder)
        logger.debug("external data read in place from %s", folder)
    providers = list(providers or ["CPUExecutionProvider"])
    return ort.InferenceSession(data, sess_options=session_options, providers=providers)


# ---------------------------------------------------------------------------------------
# Folding activations into statistics


def _masked_rows(array: np.ndarray, axis: int, mask: np.ndarray) -> np.ndarray | None:
    """Rows [n, C] of ``array`` at unmasked positions, or None when the layout is not recognised."""
    batch, seq = mask.shape
    keep = mask.astype(bool)
    shape = array.shape
    if seq not in shape[1:] and (array.ndim < 1 or shape[0] != batch * seq):
        return _rows(array, axis)  # no per-position axis: nothing padded in it
    if array.ndim >= 3 and shape[0] == batch and shape[1] == seq and axis >= 2:
        return _rows_after(np.moveaxis(array, axis, -1)[keep])
    if array.ndim >= 3 and shape[0] == batch and shape[2] == seq and axis not in (0, 2):
        moved = np.moveaxis(array, [2, axis], [1, -1])  # [B, S, ..., C]
        return _rows_after(moved[keep])
    if array.ndim >= 3 and shape[0] != batch and shape[0] % batch == 0 and shape[1] == seq and axis >= 2:
        heads = shape[0] // batch  # [B*H, S, ..., D], batch-major
        return _rows_after(np.moveaxis(array, axis, -1)[np.repeat(keep, heads, axis=0)])
    if array.ndim == 2 and shape[0] == batch * seq and axis == 1:
        return array[keep.reshape(-1)]
    return None  # e.g. K^T as [B, H, D, S]: the padded axis is the channel axis


def _rows(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1]) if moved.ndim else moved.reshape(1, 1)


def _rows_after(selected: np.ndarray) -> np.ndarray:
    return selected.reshape(-1, selected.shape[-1])


class _Collector:
    """The statistics of all targets, folded in one run at a time."""

    def __init__(self, targets: Sequence[CalibrationTarget], covariance_for: set[str]):
        self.targets = {t.tensor: t for t in targets}
        self.covariance_for = covariance_for
        self.stats: dict[str, ChannelStats] = {}
        self.per_tensor: set[str] = set()
        self.warned_mask: set[str] = set()

    def fold(
        self,
        name: str,
        array: np.ndarray,
        mask: np.ndarray | None,
        samples: Sequence[int],
        rows_per_sample: Sequence[int],
    ) -> None:
        """Fold one run's ``array`` of target ``name`` (``samples``: feed index per batch part)."""
        target = self.targets[name]
        if array.ndim == 0:
            array = array.reshape(1)
        axis = target.channel_axis
        if not -array.ndim <= axis < array.ndim:
            raise CalibrationError(
                f"tensor {name!r}: channel axis {axis} is out of range for its shape {tuple(array.shape)}"
            )
        axis %= array.ndim
        rows = None
        if mask is not None and not mask.all():
            rows = _masked_rows(array, axis, mask)
            if rows is None and name not in self.warned_mask:
                self.warned_mask.add(name)
                logger.warning(
                    "tensor %r: cannot map the attention mask onto its shape %s; "
                    "its statistics include padded positions",
                    name,
                    tuple(array.shape),
                )
        if rows is None:
            rows = _rows(array, axis)
        if not np.issubdtype(rows.dtype, np.floating):
            rows = rows.astype(np.float64)

        stats = self.stats.get(name)
        if stats is None:
            stats = ChannelStats.empty(rows.shape[1], target.channel_axis, covariance=name in self.covariance_for)
            stats.shape = tuple(-1 if i == 0 else int(d) for i, d in enumerate(array.shape))
            self.stats[name] = stats
        elif len(stats.shape) == array.ndim:
            stats.shape = tuple(-1 if old != new else old for old, new in zip(stats.shape, array.shape))
        if name in self.per_tensor:
            rows = rows.reshape(-1, 1)
        elif rows.shape[1] != stats.channels:
            self._to_per_tensor(name, stats.channels, rows.shape[1])
            stats = self.stats[name]
            rows = rows.reshape(-1, 1)
        try:
            stats.update(rows)
        except CalibrationError:
            raise CalibrationError(
                f"{_which_sample(array, samples, rows_per_sample)}: tensor {name!r} has NaN/Inf"
            ) from None

    def _to_per_tensor(self, name: str, before: int, now: int) -> None:
        stats = self.stats[name]
        # Expected for the sequence-long axis of K^T and of attention probabilities.
        level = logging.INFO if self.targets[name].role == "dynamic_input" else logging.WARNING
        logger.log(
            level,
            "tensor %r: its size along channel axis %d changes between samples (%d, then %d); "
            "keeping per-tensor statistics for it",
            name,
            stats.channel_axis,
            before,
            now,
        )
        if stats.covariance is not None:
            logger.warning("tensor %r: no covariance for per-tensor statistics", name)
        self.per_tensor.add(name)
        self.stats[name] = ChannelStats(
            channel_axis=stats.channel_axis,
            absmax=np.array([stats.absmax.max()]),
            minimum=np.array([stats.minimum.min()]),
            maximum=np.array([stats.maximum.max()]),
            mean=np.array([stats.mean.mean()]),  # every channel has the same count
            mean_sq=np.array([stats.mean_sq.mean()]),
            count=stats.count * stats.channels,
            covariance=None,
            shape=stats.shape,
        )


def _which_sample(array: np.ndarray, samples: Sequence[int], rows_per_sample: Sequence[int]) -> str:
    """Name the calibration sample (feed index) whose batch rows hold a non-finite value."""
    if array.ndim >= 1 and array.shape[0] == sum(rows_per_sample):
        bad = np.flatnonzero(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1))
        if bad.size:
            owner = int(np.searchsorted(np.cumsum(rows_per_sample), bad[0], side="right"))
            return f"calibration sample {samples[owner]}"
    if samples[0] == samples[-1]:
        return f"calibration sample {samples[0]}"
    return f"calibration samples {samples[0]}-{samples[-1]}"


# ---------------------------------------------------------------------------------------
# The entry point


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return sys.stderr is not None and sys.stderr.isatty() and "CI" not in os.environ


def collect_statistics(
    model: str | os.PathLike | ir.Model,
    feeds: Any,
    *,
    tensors: Iterable[str | CalibrationTarget] | None = None,
    covariance_for: Iterable[str] = (),
    batch_tokens: int | None = 4096,
    progress: bool | None = None,
    session_options: Any = None,
    providers: Sequence[Any] | None = None,
    total: int | None = None,
) -> ActivationStats:
    """Run ``model`` over ``feeds`` and return per-channel statistics of the target tensors.

    ``feeds``: an iterable of dicts input name -> array (normally one unpadded batch-1
    sample each, sequence lengths may differ), or a reader with ``get_next() -> dict | None``.
    ``tensors``: names or :class:`CalibrationTarget` s (default :func:`quantizable_targets`;
    a bare name takes the channel axis its consumer implies, else the last axis).
    ``covariance_for``: names whose statistics keep a covariance matrix.
    ``batch_tokens``: consecutive feeds of identical shapes are run together up to about
    this many tokens (``None`` or ``0``: one run per feed).
    ``session_options``: default ``ORT_ENABLE_BASIC``; a given object gets the
    external-data folder option added when the model has external data.
    ``total``: the number of feeds, for the progress bar when ``feeds`` has no ``len``.
    """
    import onnxruntime as ort

    started = time.perf_counter()
    model_path = None
    if isinstance(model, (str, os.PathLike)):
        model_path = Path(model)
        model = load_model(model_path)
    targets = _resolve_targets(model, tensors)
    if not targets:
        raise CalibrationError("the model has no tensors to calibrate (no MatMul/Gemm/Conv with a constant weight)")
    target_names = {t.tensor for t in targets}
    covariance = set(covariance_for)
    unknown = sorted(covariance - target_names)
    if unknown:
        raise CalibrationError(f"covariance requested for {unknown[0]!r}, which is not a calibration target")

    specs = _input_specs(model)
    from_feed = [t.tensor for t in targets if t.tensor in specs]
    fetched = [t.tensor for t in targets if t.tensor not in specs]
    can_batch = bool(batch_tokens) and all(
        s.shape is not None and len(s.shape) >= 2 and s.shape[0] is None for s in specs.values()
    )
    collector = _Collector(targets, covariance)
    counters = {"feeds": 0, "samples": 0, "tokens": 0, "runs": 0}
    warned_padding = False

    if total is None and hasattr(feeds, "__len__") and not isinstance(feeds, Mapping):
        total = len(feeds)
    from tqdm import tqdm

    with contextlib.ExitStack() as stack:
        session = _create_session(model, fetched, session_options, providers, stack)
        bar = stack.enter_context(
            tqdm(total=total, desc="calibrating", unit="sample", disable=not _show_progress(progress), leave=False)
        )
        pending: list[tuple[int, dict[str, np.ndarray]]] = []
        pending_key: Any = None
        pending_tokens = 0

        def flush() -> None:
            nonlocal pending, pending_tokens
            if not pending:
                return
            samples = [index for index, _ in pending]
            if len(pending) == 1:
                batch = pending[0][1]
                rows_per_sample = [_batch_rows(batch)]
            else:
                batch = {name: np.concatenate([f[name] for _, f in pending], axis=0) for name in pending[0][1]}
                rows_per_sample = [_batch_rows(f) for _, f in pending]
            pending, pending_tokens = [], 0
            mask = batch.get("attention_mask")
            if mask is not None and (mask.ndim != 2 or mask.all()):
                mask = None
            results = session.run(fetched, batch) if fetched else []
            counters["runs"] += 1
            for name, array in zip(fetched, results):
                collector.fold(name, array, mask, samples, rows_per_sample)
            for name in from_feed:
                collector.fold(name, batch[name], mask, samples, rows_per_sample)
            del results, batch

        for index, raw in enumerate(_iterate_feeds(feeds)):
            feed = _check_feed(index, raw, specs)
            counters["feeds"] += 1
            pieces = _unpad(feed)
            if pieces is None:
                if not warned_padding:
                    warned_padding = True
                    logger.info(
                        "calibration sample %d: padded inputs cannot be split into unpadded samples; "
                        "dropping padded positions from the activations instead",
                        index,
                    )
                pieces = [feed]
            for piece in pieces:
                counters["samples"] += _batch_rows(piece)
                counters["tokens"] += _real_tokens(piece)
                key = tuple((name, a.shape, a.dtype.str) for name, a in sorted(piece.items()))
                tokens = _feed_tokens(piece)
                if pending and (
                    not can_batch or key != pending_key or pending_tokens + tokens > int(batch_tokens or 0)
                ):
                    flush()
                pending.append((index, piece))
                pending_key = key
                pending_tokens += tokens
            bar.update(1)
        flush()

    if counters["feeds"] == 0 or not collector.stats:
        raise CalibrationError(
            "calibration data is empty: "
            + ("the feeds produced no samples" if counters["feeds"] == 0 else "every sample was padding only")
        )
    missing = [t.tensor for t in targets if t.tensor not in collector.stats]
    for name in missing:
        logger.warning("tensor %r: no unpadded position was seen; it has no statistics", name)
    ordered = {t.tensor: collector.stats[t.tensor] for t in targets if t.tensor in collector.stats}
    meta = {
        "model": str(model_path) if model_path is not None else None,
        "samples": counters["samples"],
        "feeds": counters["feeds"],
        "tokens": counters["tokens"],
        "runs": counters["runs"],
        "onnxruntime": ort.__version__,
        "tensors": len(ordered),
        "per_tensor": sorted(collector.per_tensor),
    }
    logger.info(
        "calibrated %d tensors on %d samples (%d tokens, %d runs) in %.1fs",
        len(ordered),
        counters["samples"],
        counters["tokens"],
        counters["runs"],
        time.perf_counter() - started,
    )
    return ActivationStats(tensors=ordered, meta=meta)


def _batch_rows(feed: Mapping[str, np.ndarray]) -> int:
    for array in feed.values():
        if array.ndim >= 1:
            return int(array.shape[0])
    return 1


# ---------------------------------------------------------------------------------------
# Capturing activation rows (for passes that learn on activations)


class _EvenRows:
    """At most ``2·cap`` rows of one tensor, kept at an even stride over everything seen.

    Row ``g`` (counted over all runs) is kept when ``g % stride == 0``; when more than
    ``2·cap`` rows are kept, every other one is dropped and the stride doubles, so memory
    stays bounded and the kept rows stay evenly spread over the calibration data.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.stride = 1
        self.seen = 0
        self.chunks: list[np.ndarray] = []
        self.kept = 0

    def add(self, rows: np.ndarray) -> None:
        first = (-self.seen) % self.stride
        picked = rows[first :: self.stride]
        self.seen += rows.shape[0]
        if picked.shape[0]:
            self.chunks.append(np.array(picked, dtype=np.float32))
            self.kept += picked.shape[0]
        if self.kept > 2 * self.cap:
            merged = np.concatenate(self.chunks)[::2]
            self.chunks, self.kept = [merged], merged.shape[0]
            self.stride *= 2

    def rows(self) -> np.ndarray:
        merged = np.concatenate(self.chunks)
        if merged.shape[0] > self.cap:
            merged = merged[np.linspace(0, merged.shape[0] - 1, self.cap).round().astype(np.int64)]
        return merged


def require_finite(array: np.ndarray, name: str, where: str) -> None:
    """Raise :class:`CalibrationError` naming ``where`` and the tensor when ``array`` has NaN/Inf."""
    if not np.isfinite(array).all():
        raise CalibrationError(f"{where}: tensor {name!r} has NaN/Inf")


def stream_tensors(
    model: ir.Model,
    feeds: Any,
    tensors: Sequence[str],
    visit: Callable[[str, np.ndarray, dict, int], None],
    *,
    session_options: Any = None,
    providers: Sequence[Any] | None = None,
) -> int:
    """Run ``feeds`` through ``model`` and call ``visit(name, array, piece, index)`` for each
    named tensor of every sample (``index``: the feed's position); returns the number of samples.

    Padded feeds are split into unpadded batch-1 pieces first (as for
    :func:`collect_statistics`), so ``array`` holds real positions only unless the padding
    could not be undone (``piece`` is then the padded feed with its ``attention_mask``).
    The tensors are read as extra outputs of one session built from the serialized model
    (the caller's model is not modified); a graph input is handed over from the feed.
    """
    specs = _input_specs(model)
    fetched = [name for name in dict.fromkeys(tensors) if name not in specs]
    samples = 0
    with contextlib.ExitStack() as stack:
        session = _create_session(model, fetched, session_options, providers, stack)
        for index, raw in enumerate(_iterate_feeds(feeds)):
            feed = _check_feed(index, raw, specs)
            for piece in _unpad(feed) or [feed]:
                samples += 1
                arrays = dict(zip(fetched, session.run(fetched, piece))) if fetched else {}
                for name in dict.fromkeys(tensors):
                    visit(name, arrays[name] if name in arrays else piece[name], piece, index)
                del arrays
    if not samples:
        raise CalibrationError("calibration data is empty: the feeds produced no samples")
    return samples


def capture_activations(
    model: ir.Model,
    feeds: Any,
    tensors: Sequence[str],
    *,
    max_rows: int = 2048,
    session_options: Any = None,
    providers: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
    """The rows ``[n, C]`` of each named tensor over ``feeds``: at most ``max_rows``, evenly sampled.

    The channel axis is the one its consuming linear reduces over (as for
    :func:`collect_statistics`); padded positions (``attention_mask`` zeros) are dropped.
    The tensors are read as extra outputs of one session built from the serialized model
    (the caller's model is not modified). Returns float32 arrays keyed by tensor name.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows!r}: must be >= 1")
    targets = _resolve_targets(model, tensors)
    keepers = {t.tensor: _EvenRows(max_rows) for t in targets}
    axes = {t.tensor: t.channel_axis for t in targets}

    def keep(name: str, array: np.ndarray, piece: Mapping[str, np.ndarray], index: int) -> None:
        mask = piece.get("attention_mask")
        if mask is not None and (mask.ndim != 2 or mask.all()):
            mask = None
        axis = axes[name] % max(array.ndim, 1)
        rows = _masked_rows(array, axis, mask) if mask is not None else None
        if rows is None:
            rows = _rows(array, axis)
        require_finite(rows, name, f"calibration sample {index}")
        keepers[name].add(rows)

    stream_tensors(model, feeds, list(keepers), keep, session_options=session_options, providers=providers)
    return {name: keeper.rows() for name, keeper in keepers.items()}
