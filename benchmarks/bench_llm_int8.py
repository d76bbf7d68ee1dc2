"""End-to-end cost of the ``llm-int8`` recipe: our kernel vs standard ops vs fp32.

The same model is quantized twice with the shipped ``llm-int8`` recipe's options — once emitting
``ai.outlierquant::MixedInt8MatMul`` (kernels: always), once the standard-op form
(MatMulInteger, kernels: never) — and each is validated against fp32 on held-out data
in one run: accuracy, and latency ratio at batch 16 measured with interleaved runs.

Usage: ``python benchmarks/bench_llm_int8.py [--smollm2] [--latency-runs 10]``.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def llm_int8_recipe(kernels: str):
    """The shipped ``llm-int8`` recipe with only ``kernels`` overridden (kernel vs standard form)."""
    from outlierquant import make_recipe
    from outlierquant.recipes import load_recipe

    shipped = load_recipe("llm-int8")
    passes = []
    for spec in shipped.passes:
        options = spec.options_dict()
        if spec.name == "llm_int8":
            options["kernels"] = kernels
        passes.append((spec.name, options) if options else spec.name)
    return make_recipe(f"llm-int8-{kernels}", *passes)


def run(label: str, fp32: Path, calibration, heldout, workdir: Path, runs: int) -> None:
    from outlierquant import custom_ops
    from outlierquant.evaluate.validate import comparison_table, validate
    from outlierquant.pipeline import quantize_model

    rows = []
    for kernels in ("always", "never"):
        if kernels == "always" and not custom_ops.available():
            print(f"kernels unavailable ({custom_ops.unavailable_reason()}): skipping the kernel row")
            continue
        out = workdir / f"{label}-llm-int8-{kernels}.onnx"
        result = quantize_model(fp32, out, llm_int8_recipe(kernels), calibration, progress=False)
        share = next(r for r in result.report["passes"] if r["pass"].startswith("llm")).get("float_channel_share")
        name = "llm-int8, MixedInt8MatMul kernel" if kernels == "always" else "llm-int8, standard ops"
        if share is not None:
            name += f" ({100 * share:.2f}% ch. float)"
        rows.append((name, validate(fp32, out, heldout, latency_runs=runs, progress=False)))
    print(f"\n{label}")
    print(comparison_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (slow)")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from outlierquant.export import default_model_dir, export_model, smollm2_gguf
    from outlierquant.export.data import bundled_sentences, lm_segments, model_inputs, read_lines, text_feeds, wikipedia_texts

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_model(default_model_dir(), tmp / "minilm")
        tokenizer = AutoTokenizer.from_pretrained(fp32.parent)
        names = model_inputs(fp32)
        calibration = text_feeds(read_lines(bundled_sentences("calibration")), tokenizer=tokenizer, input_names=names)
        heldout = text_feeds(read_lines(bundled_sentences("heldout")), tokenizer=tokenizer, input_names=names)
        run("all-MiniLM-L6-v2 (164 held-out sentences)", fp32, calibration, heldout, tmp, args.latency_runs)

        if args.smollm2:
            fp32 = args.workdir / "smollm2" / "fp32" / "model.onnx"
            if not fp32.is_file():
                export_model(smollm2_gguf(), fp32.parent)
            tokenizer = AutoTokenizer.from_pretrained(fp32.parent)
            names = model_inputs(fp32)

            def segments(split, count):
                texts = wikipedia_texts(split, limit=count * 4)
                return lm_segments(texts, tokenizer=tokenizer, input_names=names, seq_len=128, max_segments=count)

            run("SmolLM2-135M (24 held-out 128-token segments)", fp32, segments("calibration", 16),
                segments("heldout", 24), tmp, args.latency_runs)


if __name__ == "__main__":
    main()
