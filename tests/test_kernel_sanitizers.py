"""The kernel library built with AddressSanitizer and UndefinedBehaviorSanitizer runs every
case of ``kernel_cases.py`` (valid ones against the references, malformed ones expecting an
onnxruntime error) without a sanitizer report.

The instrumented library is built into a temporary folder by the same
:func:`outlierquant.custom_ops._build.build_library` as the installed one, with the
sanitizer flags added, and the cases run in child processes with the sanitizer runtimes
preloaded (Python itself is not instrumented). The test skips when no compiler, headers or
sanitizer runtime is available, unless OUTLIERQUANT_REQUIRE_KERNELS=1 (as in CI), where
that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kernel_cases
from outlierquant.custom_ops import _build

REQUIRED = os.environ.get("OUTLIERQUANT_REQUIRE_KERNELS") == "1"
# float-cast-overflow is not part of GCC's -fsanitize=undefined; the quantizers convert
# floats to ints, so it is asked for by name. -g1 gives the reports file:line.
SANITIZER_FLAGS = (
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=undefined,float-cast-overflow",
    "-fno-omit-frame-pointer",
    "-g1",
)
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"OUTLIERQUANT_REQUIRE_KERNELS=1 but {reason}")
    pytest.skip(reason)


def _runtime(compiler: list[str], name: str) -> Path | None:
    """The shared sanitizer runtime `name` of `compiler`, or None when it has none."""
    try:
        answer = subprocess.run([*compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                                timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(answer)
    return path.resolve() if path.is_absolute() and path.is_file() else None


@pytest.fixture(scope="module")
def sanitized_build(tmp_path_factory) -> tuple[Path, dict[str, str], float]:
    """(instrumented library, environment for the child processes, build seconds)."""
    try:
        compiler = _build.compiler_command()
        _build.include_dir()
    except _build.KernelBuildError as error:
        _unavailable(f"the kernels cannot be built here: {error}")
    runtimes = [_runtime(compiler, name) for name in ("libasan.so", "libubsan.so")]
    if None in runtimes:
        _unavailable(f"{compiler[0]} has no shared ASan/UBSan runtime (-print-file-name=libasan.so, libubsan.so)")
    folder = tmp_path_factory.mktemp("sanitized_kernels")
    started = time.monotonic()
    try:
        library = _build.build_library(folder / "liboutlierquant_ops.so", folder / "build", SANITIZER_FLAGS)
    except _build.KernelBuildError as error:
        _unavailable(f"the instrumented build failed: {error}")
    seconds = time.monotonic() - started
    env = {**SANITIZER_ENV, "LD_PRELOAD": ":".join(str(path) for path in runtimes)}
    # The runtime can fail to start on some kernels (e.g. too many mmap ASLR bits for its
    # shadow memory); that is the environment, not the kernels.
    probe = subprocess.run([sys.executable, "-c", "import numpy, onnxruntime"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, **env})
    if probe.returncode != 0:
        _unavailable(f"Python does not start with the sanitizer runtimes preloaded:\n{probe.stderr[-2000:]}")
    return library, env, seconds


def test_sanitized_build_is_instrumented(sanitized_build):
    library, _, seconds = sanitized_build
    content = library.read_bytes()
    assert b"__asan_report" in content and b"__ubsan_handle" in content, "the sanitizer flags did not take effect"
    print(f"instrumented build took {seconds:.1f} s")


def test_kernel_cases_under_sanitizers(sanitized_build):
    library, env, _ = sanitized_build
    names = [case.name for case in kernel_cases.CASES]
    results = kernel_cases.run_isolated(names, library=library, env=env)
    failures = [f"{name}: {results[name].detail}" for name in names if not results[name].passed]
    assert not failures, f"{len(failures)} of {len(names)} cases failed:\n" + "\n\n".join(failures)
