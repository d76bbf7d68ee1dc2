"""End-to-end cost of the ``llm-int8`` recipe: our kernel vs standard ops vs fp32.

The same model is quantized twice with the shipped ``llm-int8`` recipe's options — once emitting
``ai.outlierquant::MixedInt8MatMul`` (kernels: custom), once the standard-op form
(MatMulInteger, kernels: standard) — and each is validated against fp32 on held-out data
in one run: accuracy, and latency ratio at batch 16 measured with interleaved runs.

Usage: ``python benchmarks/bench_llm_int8.py [--smollm2] [--latency-runs 10]``.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaffold  # noqa: E402

from outlierquant.evaluate.validation_report import comparison_table


def llm_int8_recipe(kernels: str):
    """The shipped ``llm-int8`` recipe with only ``kernels`` overridden (kernel vs standard form)."""
    from outlierquant import make_recipe
    from outlierquant.recipes import load_recipe

    shipped = load_recipe("llm-int8")
    passes = []
    for spec in shipped.passes:
        options = spec.options_dict()
        if spec.name == "llm-int8":
            options["kernels"] = kernels
        passes.append((spec.name, options) if options else spec.name)
    return make_recipe(f"llm-int8-{kernels}", *passes)


def label_for(stem: str, report: dict) -> str:
    share = next(r for r in report["passes"] if r["pass"].startswith("llm")).get("float_channel_share")
    name = "llm-int8, MixedInt8MatMul kernel" if stem.endswith("-custom") else "llm-int8, standard ops"
    return name + (f" ({100 * share:.2f}% ch. float)" if share is not None else "")


def run(label: str, work: scaffold.Workload, workdir: Path, runs: int) -> None:
    from outlierquant import custom_ops

    recipes = []
    for kernels in ("custom", "standard"):
        if kernels == "custom" and not custom_ops.available():
            print(f"kernels unavailable ({custom_ops.unavailable_reason()}): skipping the kernel row")
            continue
        recipes.append(llm_int8_recipe(kernels))
    candidates = scaffold.run_recipes(work, recipes, workdir, prefix=f"{label}-", label=label_for)
    rows = scaffold.validate_all(work, candidates, latency_runs=runs)
    print(f"\n{label}")
    print(comparison_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (slow)")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run("all-MiniLM-L6-v2 (164 held-out sentences)", scaffold.minilm(tmp / "minilm"), tmp, args.latency_runs)
        if args.smollm2:
            run("SmolLM2-135M (24 held-out 128-token segments)", scaffold.smollm2(args.workdir / "smollm2" / "fp32", 16, 24),
                tmp, args.latency_runs)


if __name__ == "__main__":
    main()
