"""Build step for the custom onnxruntime kernels; all metadata lives in pyproject.toml.

The kernel library is declared as an Extension so that wheels are platform-tagged and
editable installs build it in place, but it is compiled by
``src/outlierquant/custom_ops/_build.py`` (it is not a Python extension module: no
Python headers, and it must not link libonnxruntime). When the build fails (no compiler,
no network for the headers) the install still succeeds without the kernels, unless
OUTLIERQUANT_REQUIRE_KERNELS=1; OUTLIERQUANT_SKIP_KERNELS=1 skips the build.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
KERNEL_EXTENSION = "outlierquant.custom_ops.outlierquant_ops"


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "_outlierquant_kernel_build", ROOT / "src" / "outlierquant" / "custom_ops" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _library_file_name() -> str:
    if sys.platform == "win32":
        return "outlierquant_ops.dll"
    if sys.platform == "darwin":
        return "liboutlierquant_ops.dylib"
    return "liboutlierquant_ops.so"


class BuildKernels(build_ext):
    def get_ext_filename(self, fullname):
        # distutils asks with the last name component, setuptools with the full name.
        parts = fullname.split(".")
        if fullname in (KERNEL_EXTENSION, KERNEL_EXTENSION.rsplit(".", 1)[-1]):
            return os.path.join(*parts[:-1], _library_file_name())
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != KERNEL_EXTENSION:
            return super().build_extension(ext)
        if os.environ.get("OUTLIERQUANT_SKIP_KERNELS") == "1":
            self.warn("OUTLIERQUANT_SKIP_KERNELS=1: not building the custom kernels")
            return
        builder = _load_builder()
        output = Path(self.get_ext_fullpath(ext.name))
        try:
            builder.build_library(output, Path(self.build_temp) / "outlierquant_ops")
        except Exception as error:
            if os.environ.get("OUTLIERQUANT_REQUIRE_KERNELS") == "1":
                raise
            self.warn(
                f"the outlierquant custom kernels were not built ({error}); "
                "the package installs without them and uses standard-op forms"
            )
            self._remove_stale_inplace_library(ext)

    def _remove_stale_inplace_library(self, ext):
        """An editable install must not keep using a library from an earlier build."""
        if not (self.inplace or getattr(self, "editable_mode", False)):
            return
        inplace_file, _ = self._get_inplace_equivalent(self.get_finalized_command("build_py"), ext)
        if os.path.exists(inplace_file):
            os.remove(inplace_file)
            self.warn(f"removed the stale kernel library {inplace_file}")


class PlatformWheel(bdist_wheel):
    """The library talks to onnxruntime's C API only, never to Python: tag the wheel
    py3-none-<platform> rather than for one CPython ABI."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


kernel_sources = sorted(
    str(path.relative_to(ROOT)) for path in (ROOT / "src" / "outlierquant" / "custom_ops" / "csrc").glob("*.cc")
)

setup(
    ext_modules=[
        Extension(
            KERNEL_EXTENSION,
            sources=kernel_sources,
            depends=["src/outlierquant/custom_ops/csrc/common.h"],
            language="c++",
            optional=True,  # an install without a compiler still succeeds (see build_extension)
        )
    ],
    cmdclass={"build_ext": BuildKernels, "bdist_wheel": PlatformWheel},
)
