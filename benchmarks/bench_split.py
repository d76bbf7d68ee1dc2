"""Mixed-precision split and outlier-aware weight rounding beside plain W8A8 and onnxruntime.

MiniLM (bundled checkpoint): calibration on the bundled ``calibration`` sentences, accuracy
on the disjoint ``heldout`` sentences: sentence-embedding cosine mean/min vs fp32, size
ratio, latency ratio vs fp32 (batch 16, median of ``--runs``, same process, one machine).
Baselines: onnxruntime's static and dynamic W8A8 and its int4 weight-only RTN
(``MatMul4BitsQuantizer``, block 32). With ``--smollm2``: perplexity of ``llm-int8`` on
SmolLM2-135M held-out Wikipedia segments beside plain W8A8 per-token and fp32.

Our recipes go through ``quantize_model``, which collects the input covariances that
AdaDim and QuantEase read (``OutlierPass.covariance_targets``). Models with the
``ai.outlierquant`` kernel are run with the kernel library registered.

    python benchmarks/bench_split.py [--recipes ...] [--runs 10] [--smollm2] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

OURS = ("w8a8", "llm-int8", "splitquant-w8a8", "adadim-w4a16", "quantease-w4a16", "quantease-w3a16", "qllm-w4a8")
BASELINES = ("ort-static-matmul", "ort-dynamic", "ort-int4-rtn")


def quantize(model_path: Path, output: Path, recipe_name: str, feeds) -> tuple[Path, list[dict]]:
    """``quantize_model``; returns the output and the per-pass records of its report."""
    from outlierquant.pipeline import quantize_model

    result = quantize_model(model_path, output, recipe_name, feeds, progress=False)
    return output, result.report["passes"]


def label_for(recipe: str, records: list[dict]) -> str:
    """The recipe name with what its passes report: float share, assembly, AdaDim axes, simulation."""
    label = recipe
    for record in records:
        if "float_channel_share" in record:
            label += f" [{record['form']}, {100 * record['float_channel_share']:.2f}% ch float]"
        if "added_share" in record:
            label += f" [+{100 * record['added_share']:.1f}% ch, {record['merged_pairs']} merged]"
        if "dimension_counts" in record:
            counts = record["dimension_counts"]
            label += f" [per-OC {counts['per_oc']} / per-IC {counts['per_ic']}]"
        if record.get("simulated"):
            label += " (simulated)"
    return label


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="fp32 MiniLM .onnx (default: export the bundled one)")
    parser.add_argument("--recipes", nargs="*", default=list(OURS))
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--smollm2", action="store_true", help="also measure llm-int8 perplexity on SmolLM2")
    parser.add_argument("--smollm2-model", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from outlierquant import custom_ops
    from outlierquant.evaluate.baselines import ort_matmul_nbits, ort_quantize
    from outlierquant.evaluate.validate import comparison_table, validate
    from outlierquant.export.data import bundled_sentences, load_tokenizer, model_inputs, read_lines, text_feeds

    kernel_options = custom_ops.session_options() if custom_ops.available() else None
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-split-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
    else:
        from outlierquant.export import default_model_dir, export_model

        model = export_model(default_model_dir(), out / "fp32")
    tokenizer = load_tokenizer(model.parent)
    spec = model_inputs(model)
    calibration = text_feeds(read_lines(bundled_sentences("calibration")), tokenizer=tokenizer, input_names=spec)
    heldout = text_feeds(read_lines(bundled_sentences("heldout")), tokenizer=tokenizer, input_names=spec)

    rows, notes = [], []
    for preset in args.baselines:
        started = time.perf_counter()
        if preset == "ort-int4-rtn":
            path = ort_matmul_nbits(model, out / f"{preset}.onnx", symmetric=True)
        else:
            path = ort_quantize(preset, model, out / f"{preset}.onnx", calibration)
        notes.append(f"{preset} {time.perf_counter() - started:.0f}s")
        rows.append((f"onnxruntime {preset}", validate(model, path, heldout, latency_batch=16,
                                                        latency_runs=args.runs, progress=False)))
    for recipe in args.recipes:
        started = time.perf_counter()
        path, records = quantize(model, out / f"{recipe}.onnx", recipe, calibration)
        notes.append(f"{recipe} {time.perf_counter() - started:.0f}s")
        rows.append((label_for(recipe, records), validate(model, path, heldout, latency_batch=16, latency_runs=args.runs,
                                     candidate_session_options=kernel_options, progress=False)))
    print(f"MiniLM: {len(calibration)} calibration / {len(heldout)} held-out sentences; latency batch 16, "
          f"median of {args.runs}")
    print(comparison_table(rows))
    print("quantize seconds: " + ", ".join(notes))

    if args.smollm2:
        from outlierquant.export import export_model, smollm2_gguf
        from outlierquant.export.data import lm_segments, wikipedia_texts

        fp32 = Path(args.smollm2_model) if args.smollm2_model else out / "smollm2" / "model.onnx"
        if not fp32.is_file():
            export_model(smollm2_gguf(), fp32.parent)
        tok = load_tokenizer(fp32.parent)
        names = list(model_inputs(fp32))

        def segments(split: str, count: int):
            return lm_segments(wikipedia_texts(split, limit=count * 4), tokenizer=tok, input_names=names,
                               seq_len=128, max_segments=count)

        calibration, heldout = segments("calibration", 16), segments("heldout", 24)
        rows = [("fp32 (reference)", validate(fp32, fp32, heldout, latency_runs=0, progress=False))]
        for recipe in ("w8a8-per-token", "llm-int8"):
            path, records = quantize(fp32, out / f"smollm2-{recipe}.onnx", recipe, calibration)
            rows.append((label_for(recipe, records), validate(fp32, path, heldout, latency_runs=0,
                                         candidate_session_options=kernel_options, progress=False)))
        print(f"SmolLM2-135M: {len(calibration)} calibration / {len(heldout)} held-out segments of 128 tokens")
        print(comparison_table(rows))


if __name__ == "__main__":
    main()
