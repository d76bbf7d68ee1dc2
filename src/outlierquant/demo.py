"""``outlierquant demo``: the whole pipeline on the bundled all-MiniLM-L6-v2.

Export -> calibrate on the bundled calibration sentences -> quantize with onnxruntime's
own quantizer (the baselines) and with our recipes -> validate every model against fp32
on the bundled held-out sentences (never the calibration ones) -> one table.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from outlierquant.evaluate.validation_report import comparison_table

logger = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(workdir: Path, *, progress: bool | None = None, recipe: str = "default") -> str:
    from transformers import AutoTokenizer

    from outlierquant.evaluate.baselines import ort_quantize
    from outlierquant.evaluate.validate import validate
    from outlierquant.export import default_model_dir, export_model
    from outlierquant.export.data import bundled_sentences, model_inputs, text_feeds
    from outlierquant.pipeline import quantize_model

    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = workdir / "fp32" / "model.onnx"
    if not fp32.is_file():
        _say(f"[1/4] exporting the bundled all-MiniLM-L6-v2 to {fp32.parent}")
        export_model(default_model_dir(), fp32.parent)
    else:
        _say(f"[1/4] using the export in {fp32.parent}")

    tokenizer = AutoTokenizer.from_pretrained(fp32.parent)
    names = list(model_inputs(fp32))

    def feeds(split: str):
        lines = [l for l in bundled_sentences(split).read_text(encoding="utf-8").splitlines() if l.strip()]
        return text_feeds(lines, tokenizer=tokenizer, input_names=names)

    calibration, heldout = feeds("calibration"), feeds("heldout")
    _say(f"      {len(calibration)} calibration sentences, {len(heldout)} held-out sentences")

    candidates: list[tuple[str, Path]] = []
    _say("[2/4] onnxruntime's own quantizer (baselines)")
    for preset, label in (
        ("ort-dynamic", "onnxruntime dynamic int8"),
        ("ort-static-default", "onnxruntime static (its defaults)"),
        ("ort-static-matmul", "onnxruntime static (MatMul, per-channel, u8)"),
    ):
        out = workdir / f"{preset}.onnx"
        ort_quantize(preset, fp32, out, calibration)
        candidates.append((label, out))

    _say("[3/4] outlierquant recipes")
    recipes = ["w8a8"] + ([recipe] if recipe != "w8a8" else [])
    for name in recipes:
        out = workdir / f"outlierquant-{Path(name).stem}.onnx"
        quantize_model(fp32, out, name, calibration, progress=progress)
        candidates.append((f"outlierquant {Path(name).stem}", out))

    _say("[4/4] validating against fp32 on held-out sentences")
    rows = []
    for label, path in candidates:
        rows.append((label, validate(fp32, path, heldout, progress=progress)))
    table = comparison_table(rows, include_reference=True)
    print(table)
    return table
