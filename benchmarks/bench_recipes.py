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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

OURS = ("w8a8", "smoothquant-w8a8", "os+-w8a8", "outliertune-w8a8", "outliertune-search-w8a8", "default", "rtn-w4a16", "smoothquant+-w4a16")
BASELINES = ("ort-static-default", "ort-static-matmul", "ort-dynamic", "ort-matmulnbits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="fp32 MiniLM .onnx (default: export the bundled one)")
    parser.add_argument("--recipes", nargs="*", default=list(OURS))
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-recipes-"))
    out.mkdir(parents=True, exist_ok=True)
    work = scaffold.minilm(out / "fp32", args.model)
    candidates = (scaffold.run_baselines(work, args.baselines, out)
                  + scaffold.run_recipes(work, args.recipes, out, progress=None))
    reports = dict(scaffold.validate_all(work, candidates, latency_runs=args.runs))
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
    print(f"MiniLM held-out sentences: {len(work.heldout)}; calibration sentences: {len(work.calibration)}; "
          f"latency batch 16, median of {args.runs} (candidate/reference, same process); "
          f"ort-matmulnbits / *-w4a16: int4 weights, float activations (MatMulNBits, accuracy_level 0)")
    scaffold.print_table(header, rows)


if __name__ == "__main__":
    main()
