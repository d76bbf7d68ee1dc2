"""onnxruntime's own quantizer, as the baseline every number is reported beside.

Presets (all calibrated on the same unpadded samples as our recipes, one sample per
batch, so padding never reaches onnxruntime's ranges either):

- ``ort-static-default``: ``quantize_static`` with its defaults (QDQ, int8 activations
  and weights, per-tensor weights, every supported op type; MatMul outputs and the
  LayerNorm/Add inputs get quantized too).
- ``ort-static-matmul``: the same choices as our ``w8a8``: MatMul only, int8
  per-channel weights, uint8 activations, MatMul outputs left in float.
- ``ort-dynamic``: ``quantize_dynamic`` (int8 weights, uint8 per-tensor activations
  whose range is computed at run time for every batch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from outlierquant.errors import InputError

logger = logging.getLogger(__name__)

PRESETS = ("ort-static-default", "ort-static-matmul", "ort-dynamic")


def ort_quantize(
    preset: str,
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    feeds: Sequence[dict] | None = None,
) -> Path:
    """Quantize with onnxruntime's own quantizer; writes ``output_path`` atomically."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if preset not in PRESETS:
        raise InputError(f"unknown baseline {preset!r} (allowed: {', '.join(PRESETS)})")
    output_path = Path(output_path)

    class _Reader(CalibrationDataReader):
        def __init__(self, items):
            self._items = list(items)
            self._pos = 0

        def get_next(self):
            if self._pos >= len(self._items):
                return None
            self._pos += 1
            return self._items[self._pos - 1]

    with _quiet_atomic_output(output_path) as tmp:
        if preset == "ort-dynamic":
            quantize_dynamic(str(model_path), str(tmp), weight_type=QuantType.QInt8)
        else:
            if not feeds:
                raise InputError(f"{preset} needs calibration data")
            kwargs = {}
            if preset == "ort-static-matmul":
                kwargs = dict(
                    op_types_to_quantize=["MatMul"],
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
                )
            quantize_static(str(model_path), str(tmp), _Reader(feeds), quant_format=QuantFormat.QDQ, **kwargs)
    return output_path


def ort_matmul_nbits(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    block_size: int = 32,
    symmetric: bool = False,
) -> Path:
    """onnxruntime's own weight-only int4 quantizer (``MatMulNBitsQuantizer``, round to
    nearest in blocks of ``block_size`` input rows): the int4 baseline. Written atomically."""
    output_path = Path(output_path)
    with _quiet_atomic_output(output_path) as tmp:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        logging.getLogger().setLevel(logging.ERROR)  # the import's basicConfig lowered it to INFO
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(model_path)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(tmp), False)
    return output_path


@contextlib.contextmanager
def _quiet_atomic_output(output_path: Path) -> Iterator[Path]:
    """A temporary path beside ``output_path`` for onnxruntime's quantizers to write; on
    success it (and any external-data file written with it) is renamed into place, on failure
    nothing is left. onnxruntime's quantizers log advice for their own users ("consider
    pre-processing", every MatMul at INFO) through the root logger: silenced meanwhile."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    root = logging.getLogger()
    root_level = root.level
    root.setLevel(logging.ERROR)
    try:
        tmp = tmpdir / output_path.name
        yield tmp
        for item in tmpdir.iterdir():
            if item.name != output_path.name:
                os.replace(item, output_path.parent / item.name)
        os.replace(tmp, output_path)
    finally:
        root.setLevel(root_level)
        shutil.rmtree(tmpdir, ignore_errors=True)
