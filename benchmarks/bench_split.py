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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

from outlierquant.evaluate.validation_report import comparison_table

OURS = ("w8a8", "llm-int8", "splitquant-w8a8", "adadim-w4a16", "quantease-w4a16", "quantease-w3a16", "qllm-w4a8")
BASELINES = ("ort-static-matmul", "ort-dynamic", "ort-int4-rtn")


def label_for(recipe: str, report: dict) -> str:
    """The recipe name with what its passes report: float share, assembly, AdaDim axes, simulation."""
    label = recipe
    for record in report["passes"]:
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

    kernel_options = custom_ops.session_options() if custom_ops.available() else None
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-split-"))
    out.mkdir(parents=True, exist_ok=True)
    work = scaffold.minilm(out / "fp32", args.model)
    baselines = scaffold.run_baselines(work, args.baselines, out, label="onnxruntime {}")
    recipes = scaffold.run_recipes(work, args.recipes, out, label=label_for)
    rows = (scaffold.validate_all(work, baselines, latency_runs=args.runs)
            + scaffold.validate_all(work, recipes, latency_runs=args.runs, candidate_session_options=kernel_options))
    notes = [f"{name} {c.seconds:.0f}s" for name, c in zip([*args.baselines, *args.recipes], baselines + recipes)]
    print(f"MiniLM: {len(work.calibration)} calibration / {len(work.heldout)} held-out sentences; latency batch 16, "
          f"median of {args.runs}")
    print(comparison_table(rows))
    print("quantize seconds: " + ", ".join(notes))

    if args.smollm2:
        fp32 = Path(args.smollm2_model) if args.smollm2_model else out / "smollm2" / "model.onnx"
        work = scaffold.smollm2(fp32.parent, 16, 24, fp32 if fp32.is_file() else None)
        rows = scaffold.validate_all(work, [scaffold.Candidate("fp32 (reference)", work.model, 0.0)], latency_runs=0)
        recipes = scaffold.run_recipes(work, ("w8a8-per-token", "llm-int8"), out, prefix="smollm2-", label=label_for)
        rows += scaffold.validate_all(work, recipes, latency_runs=0, candidate_session_options=kernel_options)
        print(f"SmolLM2-135M: {len(work.calibration)} calibration / {len(work.heldout)} held-out segments of 128 tokens")
        print(comparison_table(rows))


if __name__ == "__main__":
    main()
