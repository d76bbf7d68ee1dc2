"""Writing outputs safely: all of a command's files appear together or not at all.

- :func:`check_outputs` refuses an output that is one of the inputs (through symlinks and
  hard links), an existing folder, or a path under a file, before any work starts.
- :class:`OutputUnit` writes a model, its external data and its report into a temporary
  folder beside the targets (the user's umask, fsync), then renames them into place under
  a journal, holding signals back; on failure or a signal the temporaries are removed,
  and the next write into that folder finishes or removes a killed run's leftovers.
- :func:`save_model` writes one model that way, switching to external data when the
  weights pass protobuf's 2 GB limit; :func:`atomic_write_text` writes one text file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator

import onnx_ir as ir

from outlierquant.errors import OutputError, describe
from outlierquant.modelio import EXTERNAL_DATA_THRESHOLD, model_weight_bytes

logger = logging.getLogger(__name__)


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: raised like KeyboardInterrupt so that cleanups run."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError:
        return real, None
    return real, (info.st_dev, info.st_ino)


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse outputs that would overwrite an input or cannot be written; before any work.

    An output is the same file as an input when their real paths agree (symlinks) or
    when they share an inode (hard links). An output must not be an existing folder, its
    folder must be a folder (or not exist yet, under one), and writable.
    """
    known: dict[str, Path] = {}
    inodes: dict[tuple[int, int], Path] = {}
    for item in inputs:
        real, inode = _identity(Path(item))
        known.setdefault(real, Path(item))
        if inode is not None:
            inodes.setdefault(inode, Path(item))
    for item in outputs:
        output = Path(item)
        real, inode = _identity(output)
        clash = known.get(real) or (inodes.get(inode) if inode is not None else None)
        if clash is not None:
            same = "" if os.path.abspath(clash) == os.path.abspath(output) else f" {clash}"
            raise OutputError(f"{output}: refusing to overwrite the input {_kind(clash)}{same}")
        if output.is_dir():
            raise OutputError(f"{output}: is a folder; give a file name")
        _check_writable_folder(output.parent)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "model"
    if suffix == ".data":
        return "model's external data"
    if suffix in (".npz", ".txt"):
        return "data"
    if suffix in (".yaml", ".yml"):
        return "recipe"
    return "file"


def _check_writable_folder(folder: Path) -> None:
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise OutputError(f"{existing}: is a broken symbolic link")
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputError(f"{existing}: is a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{existing}: folder is not writable")


_TEMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


_JOURNAL = ".commit"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputUnit:
    """Files that appear together or not at all: a model, its external data, its report.

    Everything is written into a private folder beside the targets
    (``.<primary>.tmp-<pid>-<random>``); :meth:`commit` fsyncs the files, notes in a
    journal that they are complete, then renames each into place, the primary last, with
    SIGINT/SIGTERM held back and the folder locked against a concurrent writer. On an
    error or a signal the private folder is removed, and so are the folders the unit
    created. A run killed outright (SIGKILL) leaves its private folder; the next unit in
    that folder finishes the renames if the journal was written, and removes it otherwise.

    Every file written into :attr:`staging` becomes ``folder/<its name>``; ``protect``
    lists input files that no target may be (see :func:`check_outputs`).
    """

    def __init__(self, folder: str | os.PathLike, *, primary: str, protect: Iterable[str | os.PathLike] = ()) -> None:
        self.folder = Path(folder)
        self.primary = primary
        self.protect = [Path(p) for p in protect]
        self.staging: Path | None = None
        self._created: list[Path] = []
        self._committed = False

    def path(self, target: str | os.PathLike) -> Path:
        """Where to write the file that becomes ``target`` (a name, or a path in :attr:`folder`)."""
        assert self.staging is not None, "OutputUnit used outside its with block"
        return self.staging / Path(target).name

    def target(self, name: str | os.PathLike) -> Path:
        return self.folder / Path(name).name

    def staged_bytes(self, *names: str | os.PathLike) -> int:
        return sum(self.path(name).stat().st_size for name in names if self.path(name).exists())

    def __enter__(self) -> "OutputUnit":
        self._terminate = terminate_as_exception()
        self._terminate.__enter__()
        try:
            with self._as_output_error(self.folder):
                self._make_folder()
                with self._locked():
                    recover_stale_outputs(self.folder, protect=self.protect)
                self.staging = self.folder / f".{self.primary}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
                os.mkdir(self.staging, 0o700)
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is None:
                with self._as_output_error(self.folder / self.primary):
                    self.commit()
            elif isinstance(exc, OSError) and not is_input_os_error(exc, self.staging):
                raise OutputError(f"{self.folder / self.primary}: cannot write ({describe(exc)})") from exc
        finally:
            self._cleanup()
        return False

    def commit(self) -> None:
        names = sorted(entry.name for entry in self.staging.iterdir() if entry.name != _JOURNAL)
        if self.primary in names:
            names.remove(self.primary)
            names.append(self.primary)
        check_outputs([self.folder / name for name in names], self.protect)
        mode = 0o666 & ~_umask()
        for name in names:
            _fsync_file(self.staging / name, mode)
        journal = self.staging / _JOURNAL
        journal.write_text("\n".join(names) + "\n", encoding="utf-8")
        _fsync_file(journal, 0o600)
        _fsync_dir(self.staging)
        with self._locked(), _signals_held():
            for name in names:
                os.replace(self.staging / name, self.folder / name)
            _fsync_dir(self.folder)
            self._committed = True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _as_output_error(self, target: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise OutputError(f"{target}: cannot write ({describe(exc)})") from exc

    def _make_folder(self) -> None:
        _check_writable_folder(self.folder)
        missing = []
        folder = self.folder
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                # a concurrent writer made it between our check and here: it is theirs
                if not folder.is_dir():
                    raise
                continue
            self._created.append(folder)

    def _cleanup(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if not self._committed:
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:
                    break
        self._terminate.__exit__(None, None, None)


def is_input_os_error(exc: OSError, staging: Path | None) -> bool:
    """Whether an OSError inside an output unit is about a file other than the outputs."""
    if exc.filename is None or staging is None:
        return False
    return not os.path.abspath(exc.filename).startswith(os.path.abspath(staging) + os.sep)


def _fsync_file(path: Path, mode: int) -> None:
    os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT, SIGTERM and SIGHUP until the block is done, then act on the first one.

    The handlers are swapped rather than the signals masked: a process-directed signal may
    be delivered to any thread (onnxruntime's pool), and Python runs its handlers in the
    main thread whichever thread received it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])


def recover_stale_outputs(folder: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = ()) -> None:
    """Finish or remove the private folders of output units whose process has died.

    With a journal the files were complete: they are renamed into place (unless one would
    overwrite a protected input). Without one the unit never committed: removed.
    """
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    protect = list(protect)
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink() or _pid_alive(int(match.group(1))):
            continue
        journal = entry / _JOURNAL
        if journal.is_file():
            names = [name for name in journal.read_text(encoding="utf-8").split("\n") if name]
            try:
                check_outputs([folder / name for name in names if "/" not in name], protect)
                for name in names:
                    if "/" not in name and (entry / name).is_file():
                        os.replace(entry / name, folder / name)
                logger.warning("completed the outputs of an interrupted run: %s", ", ".join(names))
            except OutputError:
                pass
        shutil.rmtree(entry, ignore_errors=True)


def write_model(model: ir.Model, unit: OutputUnit, name: str, *, external_data: bool | None = None) -> bool:
    """Write ``model`` into ``unit`` as ``name`` (+ ``name.data``); returns whether it used external data.

    ``external_data=None`` chooses external data when the weights pass
    :data:`EXTERNAL_DATA_THRESHOLD`.
    """
    if external_data is None:
        external_data = model_weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    if external_data:
        ir.save(model, unit.path(name), external_data=name + ".data")
    else:
        # Tensors still backed by the *input's* external data file would be written as
        # references to a file that does not exist beside the output: inline them.
        _inline_external_tensors(model)
        save_inline(model, unit.path(name))
    return external_data


#: main-graph initializers at least this large are serialized one at a time by :func:`save_inline`
STREAM_MIN_BYTES = 1 << 20


def save_inline(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` as one self-contained ``.onnx`` file, its large initializers one at a time.

    Why not ``ir.save``: it builds the whole ModelProto and then its serialized bytes, so
    an output was in memory three times while it was written (an LLM.int8() bench model
    with a 262 MiB output peaked there). Here the graph is serialized with those
    initializers left out, and each is appended as its own ``graph`` field holding that one
    initializer: protobuf merges repeated occurrences of a message field, so every parser
    reads the same model (initializers in the same order). A weight's bytes go from its
    array to the file without another copy.
    """
    graph = model.graph
    large = [(name, value) for name, value in graph.initializers.items()
             if value.const_value is not None and value.const_value.nbytes >= STREAM_MIN_BYTES]
    if not large:
        ir.save(model, path)
        return
    stubs = []
    try:
        for name, value in large:  # tiny stand-ins while the rest is serialized
            tensor = value.const_value
            stubs.append((value, tensor))
            value.const_value = ir.ExternalTensor("stub", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=name)
        proto = ir.to_proto(model)
    finally:
        for value, tensor in stubs:
            value.const_value = tensor
    streamed = dict(large)
    # in file order; the small ones as serialized, the large ones serialized as they are written
    order = [(t.name, None if t.name in streamed else t) for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    head = proto.SerializeToString()
    del proto
    with open(path, "wb") as handle:
        handle.write(head)
        for name, small in order:
            if small is not None:
                pieces = _initializer_fragment(small.SerializeToString())
            else:
                pieces = _streamed_initializer(name, streamed[name].const_value)
            for piece in pieces:
                handle.write(piece)


#: numpy dtypes whose little-endian bytes are ONNX's raw_data for the tensor as they are
_RAW_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
                         ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32,
                         ir.DataType.UINT32, ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL})


def _initializer_fragment(tensor_body: bytes, raw: memoryview | None = None) -> list:
    """``graph { initializer { tensor_body [raw_data: raw] } }`` as wire-format pieces."""
    raw_header = _field_header(_TENSOR_RAW_DATA_FIELD, raw.nbytes) if raw is not None else b""
    tensor_length = len(tensor_body) + len(raw_header) + (raw.nbytes if raw is not None else 0)
    initializer_header = _field_header(_GRAPH_INITIALIZER_FIELD, tensor_length)
    graph_header = _field_header(_MODEL_GRAPH_FIELD, len(initializer_header) + tensor_length)
    return [graph_header + initializer_header + tensor_body + raw_header, *([raw] if raw is not None else [])]


def _streamed_initializer(name: str, tensor) -> list:
    """One large initializer as wire-format pieces, named after its value (as ir.save does;
    a tensor can carry another name). A numpy-native tensor's bytes are written straight
    from its array (no TensorProto holding a copy of them, nor its serialized bytes);
    other types go through onnx-ir's serializer."""
    import sys

    import numpy as np

    if tensor.dtype in _RAW_DTYPES and sys.byteorder == "little":
        array = np.ascontiguousarray(tensor.numpy())
        stub = ir.ExternalTensor("stub", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name,
                                 doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))
        meta = ir.serde.serialize_tensor(stub)  # dims, type, name, doc, metadata: all but the data
        del meta.external_data[:]
        meta.ClearField("data_location")
        return _initializer_fragment(meta.SerializeToString(), memoryview(array).cast("B"))
    tensor_proto = ir.serde.serialize_tensor(tensor)
    tensor_proto.name = name
    return _initializer_fragment(tensor_proto.SerializeToString())


_MODEL_GRAPH_FIELD = 7  # ModelProto.graph
_GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer
_TENSOR_RAW_DATA_FIELD = 9  # TensorProto.raw_data


def _field_header(field: int, length: int) -> bytes:
    """A length-delimited protobuf field's key and length varints."""
    out = bytearray()
    for value in ((field << 3) | 2, length):
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Save ``model`` to ``path`` atomically (an :class:`OutputUnit`); returns the path written.

    The data file, when there is one, is ``<name>.data``. A data file of that name left by
    an earlier run is not deleted (nothing refers to it once the new model is inline).
    """
    path = Path(path)
    check_outputs([path, path.with_name(path.name + ".data")], protect)
    with OutputUnit(path.parent, primary=path.name, protect=protect) as unit:
        external_data = write_model(model, unit, path.name, external_data=external_data)
    logger.info("saved %s%s", path, " (+ external data)" if external_data else "")
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a text file through a temporary name and a rename (see :class:`OutputUnit`)."""
    path = Path(path)
    check_outputs([path], protect)
    with OutputUnit(path.parent, primary=path.name, protect=protect) as unit:
        unit.path(path).write_text(text, encoding="utf-8")
    return path


def _inline_external_tensors(model: ir.Model) -> None:
    """Replace initializers that live in an external file with in-memory copies."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
