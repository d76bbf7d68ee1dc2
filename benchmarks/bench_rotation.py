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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

MINILM_RECIPES = ("w8a8", "quarot-w8a8", "quarot-w8a8-static", "mambaquant-w8a8", "quarot-w4a8", "quarot-w4a4")
SMOLLM2_RECIPES = ("w8a8", "quarot-w8a8", "quarot-w8a8-static", "mambaquant-w8a8", "plain-w4a8",
                   "plain-w4a8-quantease", "quarot-w4a8", "quarot-w4a4")


def _plain_w4a8(rounding: str):
    """The simulated W4A8 without any rotation (int4 g64 weights, int8 per-token activations)."""
    from outlierquant import make_recipe

    options = {"weight_bits": 4, "weight_group_size": 64, "activation_bits": 8, "activations": "per_token"}
    if rounding == "quantease":
        options.update(weight_rounding="quantease", quantease_iterations=4, quantease_damp=1.0)
    return make_recipe("plain-w4a8" + ("-quantease" if rounding == "quantease" else ""),
                       "canonicalize", ("simulate-quant", options),
                       description=f"simulated W4A8 without rotation ({rounding} int4 g64 weights, "
                                   "int8 per-token activations)")


def recipe(name: str):
    """A shipped recipe by name, or one of the plain W4A8 comparisons."""
    return {"plain-w4a8": _plain_w4a8("rtn"), "plain-w4a8-quantease": _plain_w4a8("quantease")}.get(name, name)


def measure(work: scaffold.Workload, quantize) -> tuple[scaffold.Candidate, object, str]:
    """``quantize()`` (one candidate) and its validation without latency; the seconds of both."""
    started = time.perf_counter()
    [candidate] = quantize()
    [(_, report)] = scaffold.validate_all(work, [candidate], latency_runs=0)
    return candidate, report, f"{time.perf_counter() - started:.0f}"


def _cached_or(workdir: Path, name: str) -> Path:
    cache = os.environ.get("OUTLIERQUANT_TEST_CACHE")
    return Path(cache) / name if cache else workdir / f"{name}-fp32"


def bench_minilm(workdir: Path) -> None:
    work = scaffold.minilm(_cached_or(workdir, "minilm"))
    rows = []
    candidate, report, seconds = measure(work, lambda: scaffold.run_baselines(
        work, ["ort-static-matmul"], workdir, prefix="minilm-", label="onnxruntime static W8A8 (MatMul)"))
    rows.append((candidate.label, "no", f"{report.embedding.cosine_mean:.5f}", f"{report.embedding.cosine_min:.5f}",
                 seconds))
    for name in MINILM_RECIPES:
        candidate, report, seconds = measure(work, lambda: scaffold.run_recipes(work, [recipe(name)], workdir,
                                                                                prefix="minilm-"))
        rows.append((name, "yes" if candidate.report["simulated"] else "no", f"{report.embedding.cosine_mean:.5f}",
                     f"{report.embedding.cosine_min:.5f}", seconds))
        print(f"  minilm {name}: {rows[-1][2]} / {rows[-1][3]}", flush=True)
    print(f"\nMiniLM: {len(work.heldout)} held-out sentences, {len(work.calibration)} calibration sentences; "
          "embedding cosine vs fp32")
    print(scaffold.table(("model", "simulated", "cos mean", "cos min", "seconds"), rows))


def bench_smollm2(workdir: Path, calibration_segments: int, eval_segments: int) -> None:
    work = scaffold.smollm2(_cached_or(workdir, "smollm2"), calibration_segments, eval_segments)
    rows = []
    profiles = []
    candidate, report, seconds = measure(work, lambda: scaffold.run_baselines(
        work, ["ort-dynamic"], workdir, prefix="smollm2-", label="onnxruntime dynamic W8A8"))
    fp32 = report.perplexity.reference
    rows.append((candidate.label, "no", f"{report.perplexity.candidate:.3f}", f"{report.perplexity.delta:+.3f}",
                 seconds))
    for name in SMOLLM2_RECIPES:
        candidate, report, seconds = measure(work, lambda: scaffold.run_recipes(work, [recipe(name)], workdir,
                                                                                prefix="smollm2-"))
        rows.append((name, "yes" if candidate.report["simulated"] else "no", f"{report.perplexity.candidate:.3f}",
                     f"{report.perplexity.delta:+.3f}", seconds))
        print(f"  smollm2 {name}: {rows[-1][2]} ({rows[-1][3]})", flush=True)
        for record in candidate.report["passes"]:
            for tensor, entry in (record.get("outliers") or {}).items():
                if "after_predicted" in entry:
                    profiles.append((name, record["pass"], tensor, entry["before"].get("rms_max_median"),
                                     entry["after_predicted"].get("rms_max_median")))
        candidate.path.unlink()  # the simulated ones are fp32-sized
        candidate.path.with_suffix(".report.json").unlink(missing_ok=True)
    print(f"\nSmolLM2-135M: {len(work.heldout)} held-out / {len(work.calibration)} calibration Wikipedia segments of 128 "
          f"tokens; fp32 perplexity {fp32:.3f}")
    print(scaffold.table(("model", "simulated", "perplexity", "delta vs fp32", "seconds"), rows))
    if profiles:
        print("\nper-channel RMS max/median of the residual readers' inputs (KLT run), before -> after:")
        for name, pass_name, tensor, before, after in profiles[:8]:
            print(f"  {name} {pass_name} {tensor}: {before} -> {after}")


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
