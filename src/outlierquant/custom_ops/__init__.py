"""Custom onnxruntime kernels of the ``ai.outlierquant`` domain.

The C++ library (built by ``pip install``; sources in ``csrc/``) implements three ops,
specified with their math in :mod:`outlierquant.custom_ops.reference`:

- ``HadamardTransform``: the normalized fast Walsh-Hadamard rotation ``X @ (M ⊗ H_n/√n)``
  of QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"),
  ``O(d log d)`` per row instead of a dense ``d x d`` MatMul.
- ``DynamicQuantizePerToken``: symmetric per-row int8 quantization (int8 codes, or the
  same codes + 128 as uint8 for onnxruntime's integer GEMM).
- ``MixedInt8MatMul``: the LLM.int8() decomposition (Dettmers et al. 2022, "LLM.int8():
  8-bit Matrix Multiplication for Transformers at Scale"): outlier input channels in float,
  the rest per-token int8 through onnxruntime's own ``MatMulIntegerToFloat``.

:mod:`outlierquant.custom_ops.standard_forms` builds the same computations from standard
ONNX ops for runtimes where the library is missing.

Usage::

    from outlierquant import custom_ops
    if custom_ops.available():
        options = custom_ops.session_options()
    else:
        custom_ops.warn_once_unavailable()
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from outlierquant.errors import OutlierQuantError

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

DOMAIN = "ai.outlierquant"
#: The kernels are compiled against this C API version (onnxruntime 1.29) and ask the
#: loading runtime for it, so any runtime from 1.29 on can load them.
MIN_ONNXRUNTIME = (1, 29)

if sys.platform == "win32":
    LIBRARY_NAME = "outlierquant_ops.dll"
elif sys.platform == "darwin":
    LIBRARY_NAME = "liboutlierquant_ops.dylib"
else:
    LIBRARY_NAME = "liboutlierquant_ops.so"

_warned_lock = threading.Lock()
_warned = False


class KernelsUnavailableError(OutlierQuantError):
    """The custom kernels cannot be used: not built, or the onnxruntime is too old."""


def library_path() -> Path | None:
    """Path of the built kernel library, or None when it was not built."""
    path = Path(__file__).resolve().parent / LIBRARY_NAME
    return path if path.is_file() else None


def _parse_version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def _check_runtime() -> None:
    import onnxruntime as ort

    if _parse_version(ort.__version__) < MIN_ONNXRUNTIME:
        wanted = ".".join(map(str, MIN_ONNXRUNTIME))
        raise KernelsUnavailableError(
            f"onnxruntime {ort.__version__} is too old for the outlierquant kernels; "
            f"install onnxruntime>={wanted}"
        )


#: SessionOptions objects our library is registered on (pybind objects take no attributes
#: and no weak references; the list keeps them alive so identities stay unique)
_REGISTERED: list = []


def session_options(base: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Session options with the ``ai.outlierquant`` kernels registered.

    ``base`` is modified in place and returned when given (onnxruntime cannot copy
    SessionOptions); otherwise a fresh ``SessionOptions`` is returned. Raises
    :class:`KernelsUnavailableError` when the library is missing or cannot be loaded.
    """
    import onnxruntime as ort

    _check_runtime()
    path = library_path()
    if path is None:
        raise KernelsUnavailableError(
            f"the outlierquant kernel library ({LIBRARY_NAME}) was not built; reinstall with a C++17 "
            "compiler and network access to the npm registry (or ORT_INCLUDE_DIR set), "
            "or use the standard-op forms"
        )
    options = base if base is not None else ort.SessionOptions()
    if any(registered is options for registered in _REGISTERED):
        return options  # onnxruntime refuses a second registration of the same domain
    try:
        options.register_custom_ops_library(str(path))
        _REGISTERED.append(options)
    except Exception as error:  # onnxruntime raises its own Fail/RuntimeException types
        raise KernelsUnavailableError(f"could not load the outlierquant kernels from {path}: {error}") from error
    return options


@functools.lru_cache(maxsize=1)
def _availability() -> tuple[bool, str]:
    try:
        session_options()
    except KernelsUnavailableError as error:
        return False, str(error)
    return True, ""


def available() -> bool:
    """True when the kernels are built and load into this onnxruntime."""
    return _availability()[0]


def unavailable_reason() -> str:
    """Why :func:`available` is false ('' when it is true)."""
    return _availability()[1]


def warn_once_unavailable() -> None:
    """Log once per process that the kernels are unavailable and standard-op forms are used."""
    global _warned
    with _warned_lock:
        if _warned:
            return
        _warned = True
    logger.warning(
        "outlierquant custom kernels are unavailable (%s); using standard-op forms, which run slower",
        unavailable_reason() or "disabled",
    )


__all__ = [
    "DOMAIN",
    "LIBRARY_NAME",
    "MIN_ONNXRUNTIME",
    "KernelsUnavailableError",
    "available",
    "library_path",
    "session_options",
    "unavailable_reason",
    "warn_once_unavailable",
]
