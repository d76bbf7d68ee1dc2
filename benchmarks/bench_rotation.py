"""Rotation recipes (QuaRot, MambaQuant) on MiniLM and SmolLM2, beside plain W8A8 and onnxruntime.

MiniLM: sentence-embedding cosine vs fp32 on the bundled ``heldout`` sentences
(calibration: the bundled ``calibration`` sentences). SmolLM2-135M: perplexity on
held-out Wikipedia segments of 128 tokens (calibration: a disjoint slice). Recipes whose
rounding runs in float (``simulate-quant``: int4 weights/activations, per-token
activations) are marked "simulated": the accuracy is real, no speed-up is claimed.
The outlier profile of the rotated linear inputs (max/median of the per-channel abs-max,
before and after, measured on the calibration data) is printed for SmolLM2.

Passes that want covariances (``rotation: klt``, ``weight_rounding: quantease``) get them
from the pipeline (``run_recipe`` collects ``covariance_for=pass.covariance_targets(model)``).
``plain-w4a8`` / ``plain-w4a8-quantease``: the same simulated W4A8 without any rotation, with
round-to-nearest and with QuantEase weights, for the comparison QuaRot is measured by.

    python benchmarks/bench_rotation.py [--only minilm|smollm2] [--eval-segments 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MINILM_RECIPES = ("w8a8", "quarot-w8a8", "quarot-w8a8-static", "mambaquant-w8a8", "quarot-w4a8", "quarot-w4a4")
SMOLLM2_RECIPES = ("w8a8", "quarot-w8a8", "quarot-w8a8-static", "mambaquant-w8a8", "plain-w4a8",
                   "plain-w4a8-quantease", "quarot-w4a8", "quarot-w4a4")


def _plain_w4a8(rounding: str) -> dict:
    """The simulated W4A8 without any rotation (int4 g64 weights, int8 per-token activations)."""
    options = {"weight_bits": 4, "weight_group_size": 64, "activation_bits": 8, "activations": "per_token"}
    if rounding == "quantease":
        options.update(weight_rounding="quantease", quantease_iterations=4, quantease_damp=1.0)
    return {"name": "plain-w4a8" + ("-quantease" if rounding == "quantease" else ""),
            "description": f"simulated W4A8 without rotation ({rounding} int4 g64 weights, int8 per-token activations)",
            "passes": ["canonicalize", {"simulate-quant": options}]}


PLAIN = {"plain-w4a8": _plain_w4a8("rtn"), "plain-w4a8-quantease": _plain_w4a8("quantease")}


def quantize(model_path: Path, output: Path, recipe_name: str, feeds) -> dict:
    """The pipeline's recipe loop (it collects the covariances passes ask for)."""
    from outlierquant.modelio import load_model, save_model
    from outlierquant.pipeline import run_recipe
    from outlierquant.recipes import Recipe, load_recipe

    recipe = Recipe.from_dict(PLAIN[recipe_name]) if recipe_name in PLAIN else load_recipe(recipe_name)
    model = load_model(model_path)
    records = run_recipe(model, recipe, feeds, progress=False)
    save_model(model, output)
    return {"passes": records, "simulated": any(r.get("simulated") for r in records)}


def _table(header, rows) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def bench_minilm(workdir: Path) -> None:
    from outlierquant.evaluate.baselines import ort_quantize
    from outlierquant.evaluate.validate import validate
    from outlierquant.export import default_model_dir, export_model
    from outlierquant.export.data import (
        bundled_sentences,
        load_tokenizer,
        model_inputs,
        read_lines,
        text_feeds,
    )

    cache = os.environ.get("OUTLIERQUANT_TEST_CACHE")
    model = Path(cache) / "minilm" / "model.onnx" if cache else workdir / "minilm-fp32" / "model.onnx"
    if not model.is_file():
        model = export_model(default_model_dir(), model.parent)
    tokenizer = load_tokenizer(model.parent)
    spec = model_inputs(model)
    calibration = text_feeds(read_lines(bundled_sentences("calibration")), tokenizer=tokenizer, input_names=spec)
    heldout = text_feeds(read_lines(bundled_sentences("heldout")), tokenizer=tokenizer, input_names=spec)
    rows = []
    started = time.perf_counter()
    ort_path = ort_quantize("ort-static-matmul", model, workdir / "minilm-ort-static-matmul.onnx", calibration)
    report = validate(model, ort_path, heldout, latency_runs=0, progress=False)
    rows.append(("onnxruntime static W8A8 (MatMul)", "no", f"{report.embedding.cosine_mean:.5f}",
                 f"{report.embedding.cosine_min:.5f}", f"{time.perf_counter() - started:.0f}"))
    for recipe in MINILM_RECIPES:
        started = time.perf_counter()
        output = workdir / f"minilm-{recipe}.onnx"
        result = quantize(model, output, recipe, calibration)
        report = validate(model, output, heldout, latency_runs=0, progress=False)
        rows.append((recipe, "yes" if result["simulated"] else "no", f"{report.embedding.cosine_mean:.5f}",
                     f"{report.embedding.cosine_min:.5f}", f"{time.perf_counter() - started:.0f}"))
        print(f"  minilm {recipe}: {rows[-1][2]} / {rows[-1][3]}", flush=True)
    print(f"\nMiniLM: {len(heldout)} held-out sentences, {len(calibration)} calibration sentences; "
          "embedding cosine vs fp32")
    print(_table(("model", "simulated", "cos mean", "cos min", "seconds"), rows))


def bench_smollm2(workdir: Path, calibration_segments: int, eval_segments: int) -> None:
    from transformers import AutoTokenizer

    from outlierquant.evaluate.baselines import ort_quantize
    from outlierquant.evaluate.validate import validate
    from outlierquant.export import export_model, smollm2_gguf
    from outlierquant.export.data import lm_segments, model_inputs, wikipedia_texts

    cache = os.environ.get("OUTLIERQUANT_TEST_CACHE")
    model = Path(cache) / "smollm2" / "model.onnx" if cache else workdir / "smollm2-fp32" / "model.onnx"
    if not model.is_file():
        model = export_model(smollm2_gguf(), model.parent)
    tokenizer = AutoTokenizer.from_pretrained(model.parent)
    names = list(model_inputs(model))

    def segments(split: str, count: int):
        return lm_segments(wikipedia_texts(split, limit=count * 4), tokenizer=tokenizer, input_names=names,
                           seq_len=128, max_segments=count)

    calibration = segments("calibration", calibration_segments)
    heldout = segments("heldout", eval_segments)
    rows = []
    profiles = []
    started = time.perf_counter()
    ort_path = ort_quantize("ort-dynamic", model, workdir / "smollm2-ort-dynamic.onnx", calibration)
    report = validate(model, ort_path, heldout, latency_runs=0, progress=False)
    fp32 = report.perplexity.reference
    rows.append(("onnxruntime dynamic W8A8", "no", f"{report.perplexity.candidate:.3f}",
                 f"{report.perplexity.delta:+.3f}", f"{time.perf_counter() - started:.0f}"))
    for recipe in SMOLLM2_RECIPES:
        started = time.perf_counter()
        output = workdir / f"smollm2-{recipe}.onnx"
        result = quantize(model, output, recipe, calibration)
        report = validate(model, output, heldout, latency_runs=0, progress=False)
        rows.append((recipe, "yes" if result["simulated"] else "no", f"{report.perplexity.candidate:.3f}",
                     f"{report.perplexity.delta:+.3f}", f"{time.perf_counter() - started:.0f}"))
        print(f"  smollm2 {recipe}: {rows[-1][2]} ({rows[-1][3]})", flush=True)
        for record in result["passes"]:
            for name, entry in (record.get("outliers") or {}).items():
                if "after_predicted" in entry:
                    profiles.append((recipe, record["pass"], name, entry["before"].get("rms_max_median"),
                                     entry["after_predicted"].get("rms_max_median")))
        os.remove(output)
    print(f"\nSmolLM2-135M: {len(heldout)} held-out / {len(calibration)} calibration Wikipedia segments of 128 "
          f"tokens; fp32 perplexity {fp32:.3f}")
    print(_table(("model", "simulated", "perplexity", "delta vs fp32", "seconds"), rows))
    if profiles:
        print("\nper-channel RMS max/median of the residual readers' inputs (KLT run), before -> after:")
        for recipe, pass_name, name, before, after in profiles[:8]:
            print(f"  {recipe} {pass_name} {name}: {before} -> {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("minilm", "smollm2"))
    parser.add_argument("--calibration-segments", type=int, default=16)
    parser.add_argument("--eval-segments", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-rotation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "minilm"):
        bench_minilm(workdir)
    if args.only in (None, "smollm2"):
        bench_smollm2(workdir, args.calibration_segments, args.eval_segments)


if __name__ == "__main__":
    main()
