"""Loading and saving models safely.

- :func:`load_model` turns every way a model file can be wrong into one clear
  :class:`~outlierquant.errors.OutlierQuantError` line, and checks the opset.
- :func:`save_model` never leaves a half-written output: it writes into a temporary
  folder beside the target and renames into place (the ``.onnx`` last), and switches to
  external data when the weights pass protobuf's 2 GB limit.
- Weights stay lazy: ``onnx_ir`` keeps external tensors memory-mapped until a pass reads them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from outlierquant.errors import InputError, UnsupportedModelError

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
    """Load an ONNX model into onnx-ir with a one-line error for every bad-input case."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        candidate = path / "model.onnx"
        if candidate.is_file():
            path = candidate
        else:
            raise InputError(f"{path}: is a folder without a model.onnx")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError, truncated external data, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable ONNX model ({first_line})") from exc
    if len(model.graph) == 0:
        raise InputError(f"{path}: the ONNX graph has no nodes (corrupt or not an ONNX model)")
    if check:
        check_opset(model, path)
    return model


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
    path = Path(path)
    total = path.stat().st_size
    seen: set[Path] = set()
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for tensor in _iter_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                location = path.parent / entry.value
                if location not in seen and location.exists():
                    seen.add(location)
                    total += location.stat().st_size
    return total


def _iter_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _iter_tensors(sub)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> Path:
    """Save ``model`` to ``path`` atomically; returns the path written.

    ``external_data=None`` chooses external data when the weights pass
    :data:`EXTERNAL_DATA_THRESHOLD`. The data file is named ``<stem>.onnx.data``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            # Tensors still backed by the *input's* external data file would be written as
            # references to a file that does not exist beside the output: inline them.
            _inline_external_tensors(model)
            ir.save(model, tmp_model)
        # Data first, graph last: a reader never sees a graph whose data is not there yet.
        if external_data:
            os.replace(tmpdir / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            (path.parent / data_name).unlink()
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    logger.info("saved %s%s", path, " (+ external data)" if external_data else "")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _inline_external_tensors(model: ir.Model) -> None:
    """Replace initializers that live in an external file with in-memory copies."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
