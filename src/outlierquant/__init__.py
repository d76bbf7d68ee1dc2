"""outlierquant: outlier-aware post-training quantization for ONNX models.

The package is organised along the data flow of ``docs/architecture.md``::

    export/       model -> fp32 ONNX, and the data readers (text, .npz)
    calibration/  per-channel activation statistics streamed through onnxruntime
    passes/       graph analysis and rewrites (canonicalize, smooth, ..., quantize)
    custom_ops/   onnxruntime kernels and their reference definitions
    evaluate/     fidelity and task metrics, latency, size, the validation report
    recipes/      named recipes (YAML)
    plugin/       the ``outlierquant`` CLI, the optimum-cli command and the Python API

Imports are lazy: ``import outlierquant`` pulls in neither torch nor onnxruntime.
"""

from outlierquant.errors import OutlierQuantError

__version__ = "0.1.0"

__all__ = ["OutlierQuantError", "OutlierQuantizer", "make_recipe", "__version__"]


def __getattr__(name):  # lazy: the API pulls in onnxruntime and friends
    if name in ("OutlierQuantizer", "make_recipe"):
        from outlierquant.plugin import api

        return getattr(api, name)
    raise AttributeError(name)
