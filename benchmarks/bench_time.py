"""Where quantization time goes: per recipe, per pass and per phase, beside onnxruntime.

Phases (exclusive wall time; a phase nested in another is not counted twice):

- ``load``: reading the fp32 model into the IR;
- ``session``: building onnxruntime sessions (serializing the augmented graph included);
- ``run``: ``InferenceSession.run`` over calibration data (statistics collection and the
  passes that stream tensors themselves, e.g. llm-int8's gated probabilities);
- ``reduce``: folding fetched activations into statistics (``_Collector.fold``);
- ``search``: per-group searches on statistics (SmoothQuant / OutlierTune α, the
  static-SQNR gate);
- ``rounding``: QuantEase weight rounding (quarot-w8a8's quantize);
- ``save``: writing the output model;
- ``other``: the rest, mostly graph analysis and edits inside the passes.

Workloads: ``minilm`` (/tmp/oqcache/minilm, the 164 bundled calibration sentences) and
``smollm2`` (/tmp/oqcache/smollm2-past, 32 Wikipedia calibration segments of 128 tokens
with their KV cache, prepared as ``bench_deploy.py`` does). Each recipe runs ``--repeat``
times in this process after one warm-up run (imports, first session); the table shows
the fastest run and its split. ``--baselines`` adds onnxruntime's ``quantize_static``
(``ort-static-matmul``: our ``w8a8``'s choices; ``ort-static-default``) on the same data.

Usage::

    python benchmarks/bench_time.py --workload minilm --recipes default llm-int8 w8a8 --repeat 2
    python benchmarks/bench_time.py --workload smollm2 --recipes default --repeat 1 --no-warmup

``--recipe-dir`` reads the recipes from a folder, so two source trees (``PYTHONPATH=OLD/src``)
run the same recipes. Prints a markdown table and, with ``--json PATH``, writes the rows. Asserts nothing: the
machine is shared, so timings are noisy; ``uptime`` is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scaffold  # noqa: E402

PHASES = ("load", "session", "run", "reduce", "search", "rounding", "save", "other")


class PhaseClock:
    """Exclusive time per phase: a wrapped call's time minus its wrapped children's."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open call: [child seconds]

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                children = self._stack.pop()[0]
                self.totals[phase] = self.totals.get(phase, 0.0) + elapsed - children
                if self._stack:
                    self._stack[-1][0] += elapsed
        return timed

    def reset(self) -> None:
        self.totals = {}


@contextlib.contextmanager
def instrumented(clock: PhaseClock):
    """Patch the functions each phase is made of; restore them afterwards."""
    import onnxruntime

    from outlierquant import pipeline
    from outlierquant.calibration import collect
    from outlierquant.numerics import estimates

    patches = [
        (pipeline, "load_model", "load"),
        (pipeline, "write_model", "save"),
        (collect, "create_session", "session"),
        (onnxruntime.InferenceSession, "run", "run"),
        (collect._Collector, "fold", "reduce"),
    ]
    # the searches are imported by name into the pass modules: patch them where they are read
    import importlib

    for module_name in ("outlierquant.passes.smooth", "outlierquant.passes.outliertune",
                        "outlierquant.passes.online_hadamard", "outlierquant.passes.llm_int8",
                        "outlierquant.passes.quantize"):
        module = importlib.import_module(module_name)
        for name in ("search_alpha", "estimated_static_sqnr_db", "estimated_output_error"):
            if hasattr(module, name):
                patches.append((module, name, "search"))
        if hasattr(module, "quantease_int8_weight"):
            patches.append((module, "quantease_int8_weight", "rounding"))
    for name in ("search_alpha",):
        patches.append((estimates, name, "search"))
    saved = []
    for owner, name, phase in patches:
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, clock.wrap(phase, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def workload(name: str, segments: int):
    from outlierquant.export.data import lm_segments, load_tokenizer, model_inputs, wikipedia_texts

    if name == "minilm":
        work = scaffold.minilm("/tmp/oqcache/minilm", "/tmp/oqcache/minilm/model.onnx")
        return work.model, work.calibration, work.data
    if name == "smollm2":
        from outlierquant.export.past import is_past_input, with_past_feeds

        model = Path("/tmp/oqcache/smollm2-past/model.onnx")
        tokenizer = load_tokenizer(model.parent)
        text_inputs = {k: v for k, v in model_inputs(model).items() if not is_past_input(k)}
        texts = lm_segments(wikipedia_texts("calibration", limit=segments * 4), tokenizer=tokenizer,
                            input_names=text_inputs, seq_len=128, max_segments=segments)
        feeds = with_past_feeds(model, texts)
        return model, feeds, f"{len(texts)} Wikipedia segments of 128 tokens ({len(feeds)} feeds with the cache)"
    raise SystemExit(f"unknown workload {name!r}")


def time_recipe(model: Path, feeds, recipe: str, out_dir: Path, clock: PhaseClock, recipe_dir: str | None = None) -> dict:
    from outlierquant.pipeline import quantize_model

    clock.reset()
    output = out_dir / f"{recipe}.onnx"
    source = str(Path(recipe_dir) / f"{recipe}.yaml") if recipe_dir else recipe
    for path in (output, output.with_name(output.name + ".data"), output.with_name(f"{recipe}.report.json")):
        path.unlink(missing_ok=True)
    started = time.perf_counter()
    with instrumented(clock):
        result = quantize_model(model, output, source, feeds, progress=False)
    total = time.perf_counter() - started
    phases = dict(clock.totals)
    phases["other"] = total - sum(phases.values())
    passes = [(r["pass"], r.get("seconds", 0.0), r.get("calibration_seconds", 0.0)) for r in result.report["passes"]]
    import hashlib

    digest = hashlib.sha256(output.read_bytes()).hexdigest()[:16]
    return {"recipe": recipe, "total": total, "phases": phases, "passes": passes, "sha256": digest}


def time_baseline(model: Path, feeds, name: str, out_dir: Path) -> dict:
    from outlierquant.evaluate.baselines import ort_quantize

    output = out_dir / f"{name}.onnx"
    started = time.perf_counter()
    ort_quantize(name, model, output, feeds)
    return {"recipe": name, "total": time.perf_counter() - started, "phases": {}, "passes": [], "sha256": ""}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "(uptime unavailable)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--recipes", nargs="+", default=["default", "llm-int8", "quarot-w8a8", "w8a8",
                                                          "smoothquant-w8a8"])
    parser.add_argument("--baselines", nargs="*", default=["ort-static-matmul"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--segments", type=int, default=32, help="SmolLM2 calibration segments")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--recipe-dir", help="read RECIPE.yaml from this folder (the same recipes for two trees)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    model, feeds, data = workload(args.workload, args.segments)
    print(f"# {args.workload}: {model} ({data})")
    print(f"# before: {uptime()}")
    clock = PhaseClock()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-time-") as tmp:
        out_dir = Path(tmp)
        if not args.no_warmup and args.recipes:
            time_recipe(model, feeds, "w8a8", out_dir, clock, args.recipe_dir)
        for recipe in args.recipes:
            runs = [time_recipe(model, feeds, recipe, out_dir, clock, args.recipe_dir) for _ in range(max(1, args.repeat))]
            best = min(runs, key=lambda r: r["total"])
            best["runs"] = [round(r["total"], 2) for r in runs]
            rows.append(best)
            print(f"# {recipe}: {best['runs']} s; passes "
                  + ", ".join(f"{n} {s:.2f}s (cal {c:.2f})" for n, s, c in best["passes"]), flush=True)
        for name in args.baselines:
            runs = [time_baseline(model, feeds, name, out_dir) for _ in range(max(1, args.repeat))]
            best = min(runs, key=lambda r: r["total"])
            best["runs"] = [round(r["total"], 2) for r in runs]
            rows.append(best)
    print(f"# after: {uptime()}")
    ort = next((r["total"] for r in rows if r["recipe"] == "ort-static-matmul"), None)
    header = ["recipe", "total s", *PHASES, "x ort-static-matmul", "sha256[:16]"]
    table = []
    for row in rows:
        phases = row["phases"]
        table.append([row["recipe"], f"{row['total']:.2f}",
                      *[f"{phases[p]:.2f}" if p in phases else "" for p in PHASES],
                      f"{row['total'] / ort:.2f}" if ort else "", row["sha256"]])
    scaffold.print_table(header, table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
