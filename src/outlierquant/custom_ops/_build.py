"""Build the kernel library: find onnxruntime's C/C++ API headers, compile, link.

Used by ``setup.py`` at install time, and therefore standard library only. The headers
are a build input that is never committed:

1. ``ORT_INCLUDE_DIR``, when set, must hold ``onnxruntime_lite_custom_op.h`` and friends.
2. Otherwise the stock headers (C API 29, onnxruntime 1.29) are taken from the npm
   package ``com.github.asus4.onnxruntime@0.4.9`` (its Android AAR carries ``headers/``),
   downloaded once from the npm registry, checked against a pinned SHA-256, and cached in
   ``$XDG_CACHE_HOME/outlierquant`` (``~/.cache/outlierquant``).

The library does not link libonnxruntime: the runtime that loads it hands over its API.
Environment: ``CXX`` picks the compiler; ``OUTLIERQUANT_KERNEL_CXXFLAGS`` adds compiler
flags (``build_library(extra_flags=...)`` adds compiler and linker flags).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

HEADERS_PACKAGE = "com.github.asus4.onnxruntime"
HEADERS_VERSION = "0.4.9"
HEADERS_URL = (
    "https://registry.npmjs.org/com.github.asus4.onnxruntime/-/com.github.asus4.onnxruntime-0.4.9.tgz"
)
HEADERS_SHA256 = "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
AAR_MEMBER = "package/Plugins/Android/onnxruntime.aar"
REQUIRED_HEADERS = (
    "onnxruntime_c_api.h",
    "onnxruntime_cxx_api.h",
    "onnxruntime_cxx_inline.h",
    "onnxruntime_lite_custom_op.h",
    "onnxruntime_float16.h",
)
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"


class KernelBuildError(RuntimeError):
    """The kernels could not be built; the message says what is missing."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "outlierquant"


def _has_headers(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_HEADERS)


def _download(url: str, destination: Path) -> str:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as response, open(destination, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _download_with_npm(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise KernelBuildError("npm is not installed")
    subprocess.run(
        [npm, "pack", f"{HEADERS_PACKAGE}@{HEADERS_VERSION}", "--silent", "--pack-destination", str(workdir)],
        check=True, capture_output=True, timeout=600,
    )
    found = sorted(workdir.glob("*.tgz"))
    if not found:
        raise KernelBuildError("npm pack produced no tarball")
    return found[0]


def fetch_headers() -> Path:
    """Return a folder with the pinned onnxruntime headers, downloading them once."""
    target = cache_dir() / f"onnxruntime-headers-api29-{HEADERS_SHA256[:16]}"
    if _has_headers(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        workdir = Path(scratch)
        tarball = workdir / "package.tgz"
        try:
            digest = _download(HEADERS_URL, tarball)
        except OSError as error:
            logger.info("direct download of the onnxruntime headers failed (%s); trying npm pack", error)
            tarball.unlink(missing_ok=True)
            try:
                tarball = _download_with_npm(workdir)
            except (OSError, subprocess.SubprocessError, KernelBuildError) as npm_error:
                raise KernelBuildError(
                    f"cannot download the onnxruntime headers ({error}; npm: {npm_error}); "
                    "set ORT_INCLUDE_DIR to a folder with onnxruntime's C/C++ API headers"
                ) from npm_error
            digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != HEADERS_SHA256:
            raise KernelBuildError(
                f"{HEADERS_PACKAGE}@{HEADERS_VERSION} has SHA-256 {digest}, expected {HEADERS_SHA256}"
            )
        with tarfile.open(tarball, "r:gz") as archive:
            member = archive.extractfile(AAR_MEMBER)
            if member is None:
                raise KernelBuildError(f"{AAR_MEMBER} missing from {HEADERS_PACKAGE}@{HEADERS_VERSION}")
            aar = member.read()
        staging = workdir / "headers"
        staging.mkdir()
        with zipfile.ZipFile(io.BytesIO(aar)) as aar_zip:
            for info in aar_zip.infolist():
                name = info.filename
                if name.startswith("headers/") and not info.is_dir() and "/" not in name[len("headers/"):]:
                    (staging / name[len("headers/"):]).write_bytes(aar_zip.read(info))
        if not _has_headers(staging):
            raise KernelBuildError("the downloaded package does not carry the onnxruntime headers")
        try:
            staging.rename(target)
        except OSError:
            if not _has_headers(target):  # another build won the race; anything else is an error
                raise
    logger.info("cached onnxruntime headers in %s", target)
    return target


def include_dir() -> Path:
    configured = os.environ.get("ORT_INCLUDE_DIR")
    if configured:
        folder = Path(configured)
        if not _has_headers(folder):
            raise KernelBuildError(f"ORT_INCLUDE_DIR={configured} lacks one of {', '.join(REQUIRED_HEADERS)}")
        return folder
    return fetch_headers()


def api_version(folder: Path) -> int:
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", (folder / "onnxruntime_c_api.h").read_text())
    if match is None:
        raise KernelBuildError(f"ORT_API_VERSION not found in {folder / 'onnxruntime_c_api.h'}")
    return int(match.group(1))


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(shlex.split(candidate)[0]):
            return candidate
    raise KernelBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


def compiler_command() -> list[str]:
    """The C++ compiler ``build_library`` uses, as an argument list."""
    return shlex.split(_compiler())


def build_library(output: Path, build_temp: Path, extra_flags: Sequence[str] = ()) -> Path:
    """Compile ``csrc/*.cc`` into the shared library ``output``.

    ``extra_flags`` go to the compiler and the linker after the defaults (a later ``-O``
    wins), e.g. ``-fsanitize=address,undefined`` for an instrumented build. ``output`` is
    replaced atomically: a process that has the old library loaded keeps its copy.
    """
    if sys.platform == "win32":
        raise KernelBuildError("building the kernels on Windows is not supported yet")
    headers = include_dir()
    version = api_version(headers)
    if version < 17:
        raise KernelBuildError(f"onnxruntime headers in {headers} are C API {version}; need >= 17")
    compiler = compiler_command()
    # -fno-trapping-math/-fno-math-errno let the clip/round loops vectorize; unlike
    # -ffast-math they keep IEEE results bit for bit, which the exact tests rely on.
    # -ffp-contract=off: the AVX-512 clone has FMA, and a fused a*b+c rounds once where
    # the other clones (and the numpy references) round twice.
    flags = ["-std=c++17", "-O3", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-fPIC",
             "-fvisibility=hidden",
             "-fvisibility-inlines-hidden", "-Wall", "-Wextra", f"-I{headers}"]
    flags += shlex.split(os.environ.get("OUTLIERQUANT_KERNEL_CXXFLAGS", ""))
    flags += list(extra_flags)
    build_temp.mkdir(parents=True, exist_ok=True)
    sources = sorted(SOURCE_DIR.glob("*.cc"))
    objects = [build_temp / (source.stem + ".o") for source in sources]

    def compile_one(pair: tuple[Path, Path]) -> None:
        source, obj = pair
        command = [*compiler, *flags, "-c", str(source), "-o", str(obj)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed:\n{shlex.join(command)}\n{result.stderr}")

    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        list(pool.map(compile_one, zip(sources, objects)))

    output.parent.mkdir(parents=True, exist_ok=True)
    staged = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    link = [*compiler, "-shared", *extra_flags, *[str(obj) for obj in objects], "-o", str(staged)]
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]
    else:
        script = build_temp / "exports.map"
        script.write_text("{ global: RegisterCustomOps; local: *; };\n")
        link += [f"-Wl,--version-script={script}", "-Wl,-O1"]
    try:
        result = subprocess.run(link, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"linking failed:\n{shlex.join(link)}\n{result.stderr}")
        os.replace(staged, output)
    finally:
        staged.unlink(missing_ok=True)
    return output
