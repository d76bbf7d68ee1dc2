"""Pipeline cost: calibration time, quantize time and peak RSS.

Cases (each in its own process, so peak RSS is that case's alone):

- ``minilm``: the bundled all-MiniLM-L6-v2, calibrated on the bundled calibration
  sentences, quantized with ``w8a8``;
- ``large``: the synthetic > 2 GB decoder of ``tests/large_model.py`` (random weights,
  external data), calibrated on random hidden states, quantized with ``w8a8``.

Usage: ``python benchmarks/bench_pipeline.py [--cases minilm,large]``. Prints a table;
asserts nothing (timings are facts about one machine, not pass/fail criteria).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scaffold  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(case: str, workdir: Path) -> dict:
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.modelio import load_model, model_file_bytes
    from outlierquant.outputs import save_model
    from outlierquant.pipeline import run_recipe
    from outlierquant.recipes import load_recipe

    if case == "minilm":
        work = scaffold.minilm(workdir / "minilm")
        model_path, feeds = work.model, work.calibration
    elif case == "large":
        sys.path.insert(0, str(ROOT / "tests"))
        from large_model import build_large_decoder, large_decoder_feeds

        model_path = build_large_decoder(workdir / "large")
        feeds = large_decoder_feeds(16)
    else:
        raise SystemExit(f"unknown case {case!r}")

    rss_before = _peak_rss_mib()
    t0 = time.perf_counter()
    model = load_model(model_path)
    stats = collect_statistics(model, feeds, progress=False)
    calibration_s = time.perf_counter() - t0
    rss_calibration = _peak_rss_mib()
    t1 = time.perf_counter()
    run_recipe(model, load_recipe("w8a8"), feeds, stats=stats, progress=False)
    out = save_model(model, workdir / f"{case}-w8a8.onnx")
    quantize_s = time.perf_counter() - t1
    return {
        "case": case,
        "model_mib": model_file_bytes(model_path) / 2**20,
        "output_mib": model_file_bytes(out) / 2**20,
        "samples": len(feeds),
        "calibration_s": calibration_s,
        "quantize_s": quantize_s,
        "peak_rss_before_mib": rss_before,
        "peak_rss_calibration_mib": rss_calibration,
        "peak_rss_mib": _peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="minilm,large")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.workdir))))
        return
    rows = []
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-{case}-") as tmp:
            done = subprocess.run(
                [sys.executable, __file__, "--case", case, "--workdir", tmp],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"case {case} failed")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    scaffold.print_table(
        ("case", "model MiB", "out MiB", "samples", "calib s", "quant s", "peak RSS MiB", "RSS/model"),
        [(r["case"], f"{r['model_mib']:.0f}", f"{r['output_mib']:.0f}", f"{r['samples']:d}", f"{r['calibration_s']:.1f}",
          f"{r['quantize_s']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] / r['model_mib']:.2f}") for r in rows],
    )


if __name__ == "__main__":
    main()
