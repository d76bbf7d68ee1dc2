"""Every recipe beside onnxruntime's own quantizer on the bundled MiniLM, in one run.

Calibration: the bundled ``calibration`` sentences; evaluation: the bundled ``heldout``
sentences (disjoint). For each model: sentence-embedding cosine mean/min vs fp32,
Spearman of pairwise similarities, size ratio, and latency ratio vs fp32 (batch 16,
median of ``--runs``) measured by :func:`outlierquant.evaluate.validate.validate` in this
process, plus the latency ratio vs plain onnxruntime static W8A8 (``ort-static-matmul``).

    python benchmarks/bench_recipes.py [--model DIR/model.onnx] [--runs 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

OURS = ("w8a8", "smoothquant-w8a8", "os+-w8a8", "outliertune-w8a8", "outliertune-search-w8a8", "default", "rtn-w4a16", "smoothquant+-w4a16")
BASELINES = ("ort-static-default", "ort-static-matmul", "ort-dynamic", "ort-matmulnbits")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="fp32 MiniLM .onnx (default: export the bundled one)")
    parser.add_argument("--recipes", nargs="*", default=list(OURS))
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from outlierquant.evaluate.baselines import ort_matmul_nbits, ort_quantize
    from outlierquant.evaluate.validate import validate
    from outlierquant.export.data import bundled_sentences, load_tokenizer, model_inputs, read_lines, text_feeds
    from outlierquant.pipeline import quantize_model

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-recipes-"))
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

    candidates: list[tuple[str, Path, float]] = []
    for preset in args.baselines:
        started = time.perf_counter()
        if preset == "ort-matmulnbits":
            path = ort_matmul_nbits(model, out / f"{preset}.onnx")  # RTN, asymmetric, block 32
        else:
            path = ort_quantize(preset, model, out / f"{preset}.onnx", calibration)
        logging.getLogger().setLevel(logging.WARNING)  # onnxruntime's quantizers lower it
        candidates.append((preset, path, time.perf_counter() - started))
    for recipe in args.recipes:
        started = time.perf_counter()
        result = quantize_model(model, out / f"{recipe}.onnx", recipe, calibration)
        candidates.append((recipe, result.output, time.perf_counter() - started))

    reports = {}
    for label, path, _ in candidates:
        reports[label] = validate(model, path, heldout, latency_batch=16, latency_runs=args.runs, progress=False)
    ort_ms = reports["ort-static-matmul"].latency.candidate_ms if "ort-static-matmul" in reports else None

    header = ("model", "emb cos mean", "emb cos min", "Spearman", "size ratio", "lat vs fp32", "lat vs ORT W8A8",
              "quantize s")
    rows = [("fp32", "1.000000", "1.000000", "1.0000", "1.000", "1.000", "", "")]
    for label, _, seconds in candidates:
        r = reports[label]
        e = r.embedding
        vs_ort = f"{r.latency.candidate_ms / ort_ms:.3f}" if ort_ms else ""
        rows.append((label, f"{e.cosine_mean:.6f}", f"{e.cosine_min:.6f}", f"{e.spearman:.4f}", f"{r.size_ratio:.3f}",
                     f"{r.latency.ratio:.3f}", vs_ort, f"{seconds:.1f}"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
    print(f"MiniLM held-out sentences: {len(heldout)}; calibration sentences: {len(calibration)}; "
          f"latency batch 16, median of {args.runs} (candidate/reference, same process); "
          f"ort-matmulnbits / *-w4a16: int4 weights, float activations (MatMulNBits, accuracy_level 0)")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


if __name__ == "__main__":
    main()
