"""The ``outlierquant`` command line.

Subcommands: ``export``, ``calibrate``, ``quantize``, ``validate``, ``analyze``, ``demo``. Heavy
libraries (torch, transformers, onnxruntime) are imported inside the handlers so that
``outlierquant --help`` is instant. An :class:`~outlierquant.errors.OutlierQuantError`
becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from outlierquant.errors import InputError, OutlierQuantError

logger = logging.getLogger("outlierquant")


def _progress(args) -> bool | None:
    return False if getattr(args, "quiet", False) else None


def _is_causal_lm(model_path: Path) -> bool:
    from outlierquant.export.data import model_inputs

    return "position_ids" in model_inputs(model_path) or any(
        name.startswith("past_key_values") for name in model_inputs(model_path)
    )


def _feeds_for(model_path: Path, data: Path, *, tokenizer: Path | None, limit: int | None, purpose: str):
    """Calibration or evaluation feeds: one unpadded sample each (LM text: fixed segments)."""
    from outlierquant.export import data as data_mod

    data = Path(data)
    if data.suffix == ".txt" and _is_causal_lm(model_path):
        tokenizer_dir = tokenizer or data_mod.find_tokenizer_dir(model_path)
        if tokenizer_dir is None:
            raise InputError(f"{model_path}: no tokenizer files beside the model; pass --tokenizer DIR")
        if not data.is_file():
            raise InputError(f"{data}: no such file")
        lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise InputError(f"{data}: no text (the file has no non-blank line)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        feeds = data_mod.lm_segments(
            lines, tokenizer=tok, input_names=list(data_mod.model_inputs(model_path)), seq_len=128, max_segments=limit
        )
    else:
        feeds = data_mod.load_feeds(data, model_path=model_path, tokenizer_dir=tokenizer, limit=limit)
    if not feeds:
        raise InputError(f"{data}: gives no {purpose} samples")
    return feeds


# -- handlers ----------------------------------------------------------------------------


def cmd_export(args) -> int:
    from outlierquant.export import export_model

    path = export_model(args.model, args.output, task=args.task, opset=args.opset)
    print(path)
    return 0


def cmd_calibrate(args) -> int:
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.modelio import load_model
    from outlierquant.passes.canonicalize import CanonicalizePass

    model_path = Path(args.model)
    model = load_model(model_path)  # clear errors before tokenizing anything
    feeds = _feeds_for(model_path, args.calibration_data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration")
    # Collected on the canonical form, as `quantize` sees the model, so that the tensor
    # names match when the saved statistics are reused.
    CanonicalizePass()(model)
    stats = collect_statistics(model, feeds, progress=_progress(args))
    stats.meta["model"] = str(model_path)
    written = stats.save(args.output)
    print(written)
    return 0


def cmd_quantize(args) -> int:
    from outlierquant.modelio import load_model
    from outlierquant.pipeline import quantize_model
    from outlierquant.recipes import load_recipe

    model_path = Path(args.model)
    if Path(args.output).resolve() == model_path.resolve():
        raise InputError(f"{args.output}: refusing to overwrite the input model")
    recipe = load_recipe(args.recipe)  # a bad recipe fails before any work
    load_model(model_path)
    feeds = None
    if args.calibration_data is not None:
        feeds = _feeds_for(
            model_path, args.calibration_data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration"
        )
    elif args.stats is None:
        raise InputError("quantize needs --calibration-data FILE (or --stats from `outlierquant calibrate`)")
    result = quantize_model(model_path, args.output, recipe, feeds, stats_path=args.stats, progress=_progress(args))
    floating = result.report.get("float_channels")
    if floating:
        print(f"{floating['share']:.2%} of the rewritten linears' input channels stay in float "
              f"({floating['float']} of {floating['of_inputs']})", file=sys.stderr)
    for record in result.report.get("passes", []):
        if record.get("pass") == "online-hadamard":  # its gate decides per group: say what it did
            rotated = len(record.get("rotated", []))
            gated = sum(1 for entry in record.get("skipped", []) if "static_sqnr_db" in entry)
            print(f"online Hadamard rotation on {rotated} linear groups"
                  + (f" ({gated} left unrotated: estimated static SQNR at or above the gate)" if gated else ""),
                  file=sys.stderr)
        probs = record.get("probs_residual") if record.get("pass") == "llm_int8" else None
        if probs:  # also a per-layer decision when gated
            print(f"residual int8 attention probabilities in {probs['residual_matmuls']} of "
                  f"{len(probs['matmuls'])} probs x V MatMuls", file=sys.stderr)
    print(f"{result.output}\n{result.report_path}")
    return 0


def cmd_validate(args) -> int:
    from outlierquant.evaluate.validate import validate
    from outlierquant.modelio import load_model

    reference, candidate = Path(args.reference), Path(args.candidate)
    for path in (reference, candidate):
        load_model(path, check=False)
    feeds = _feeds_for(reference, args.data, tokenizer=args.tokenizer, limit=args.limit, purpose="evaluation")
    session_options = None
    if args.kernels == "auto":
        from outlierquant import custom_ops

        if getattr(custom_ops, "available", lambda: False)():
            session_options = custom_ops.session_options()
    report = validate(
        reference,
        candidate,
        feeds,
        latency_batch=args.latency_batch,
        latency_runs=args.latency_runs,
        candidate_session_options=session_options,
        progress=_progress(args),
    )
    print(report.format_table())
    if args.json:
        report.save_json(args.json)
    return 0


def cmd_analyze(args) -> int:
    from outlierquant.evaluate.report import analyze_model
    from outlierquant.modelio import load_model

    model_path = Path(args.model)
    load_model(model_path)
    if args.quantized is not None:
        load_model(args.quantized, check=False)
    feeds = _feeds_for(model_path, args.calibration_data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration")
    probe = None
    if args.data is not None:
        probe = _feeds_for(model_path, args.data, tokenizer=args.tokenizer, limit=args.probe_samples, purpose="probe")
    report = analyze_model(
        model_path,
        feeds,
        args.output,
        quantized=args.quantized,
        eval_feeds=probe,
        probe_samples=args.probe_samples,
        threshold=args.threshold,
        sensitivity=args.sensitivity_layers > 0,
        sensitivity_limit=args.sensitivity_layers or None,
        progress=_progress(args),
    )
    print(report.html_path)
    return 0


def cmd_demo(args) -> int:
    from outlierquant.demo import run_demo

    run_demo(Path(args.workdir), progress=_progress(args), recipe=args.recipe)
    return 0


# -- parser ------------------------------------------------------------------------------
# Each subcommand's arguments are defined once, here; the optimum-cli command
# (plugin/optimum_command.py) builds its parsers from the same table.


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local Hugging Face model folder, a .gguf file, or a hub id (online only)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--task", help="optimum task (default: from the model's config)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: optimum's choice)")


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("--calibration-data", required=True, type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("-o", "--output", required=True, type=Path, help="statistics path (writes PATH.npz and PATH.json)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=int, help="use at most this many samples")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--recipe", default="default", help="a built-in recipe name or a YAML file (default: default)")
    p.add_argument("--calibration-data", type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("--stats", type=Path, help="statistics saved by `outlierquant calibrate` (fp32 model)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=int, help="use at most this many calibration samples")


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--data", required=True, type=Path, help=".txt or .npz held-out data (not the calibration data)")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--limit", type=int, help="use at most this many samples")
    p.add_argument("--latency-batch", type=int, default=16)
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--kernels", choices=("auto", "none"), default="auto", help="register outlierquant's kernels")


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the fp32 model")
    p.add_argument("--calibration-data", required=True, type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("-o", "--output", required=True, type=Path, help="report folder (writes index.html + PNGs)")
    p.add_argument("--quantized", type=Path, help="a quantized version of the model: per-layer SQNR + sensitivity")
    p.add_argument("--data", type=Path, help="held-out probe data (default: the first calibration samples)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=int, help="use at most this many calibration samples")
    p.add_argument("--probe-samples", type=int, default=8, help="samples for kurtosis, SQNR and sensitivity (default: 8)")
    p.add_argument("--threshold", type=float, default=6.0, help="outlier magnitude (default: 6, LLM.int8())")
    p.add_argument("--sensitivity-layers", type=int, default=48,
                   help="rank at most this many layers, quantized one at a time (default: 48; 0: skip)")


def add_recipes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show this recipe as YAML (default: list them all)")


def cmd_recipes(args) -> int:
    from outlierquant.recipes import builtin_recipes, load_recipe

    if args.name:
        print(load_recipe(args.name).to_yaml(), end="")
        return 0
    names = builtin_recipes()
    width = max(map(len, names))
    for name in names:
        recipe = load_recipe(name)
        summary = " ".join(recipe.description.split())
        summary = summary if len(summary) <= 100 else summary[:97] + "..."
        print(f"{name:<{width}}  {summary}")
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="outlierquant-demo", help="where the models go (default: ./outlierquant-demo)")
    p.add_argument("--recipe", default="default", help="our recipe to show (default: default)")


def add_common_arguments(p: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """``-v`` and ``-q``: on the root parser, and again on each subcommand so they may follow it."""
    # SUPPRESS on subcommands: their default must not overwrite a flag given before the subcommand
    extra = {"default": argparse.SUPPRESS} if subcommand else {}
    p.add_argument("-v", "--verbose", action="store_true", help="log what every step does", **extra)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars", **extra)


#: name -> (help, add_arguments, handler); the handlers are looked up lazily by name
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "export": ("Hugging Face folder, .gguf file or hub id -> DIR/model.onnx", add_export_arguments, "cmd_export"),
    "calibrate": ("collect per-channel activation statistics (.npz + .json)", add_calibrate_arguments, "cmd_calibrate"),
    "quantize": ("apply a recipe: MODEL.onnx -> OUT.onnx + OUT.report.json", add_quantize_arguments, "cmd_quantize"),
    "validate": ("compare a candidate against the reference on held-out data", add_validate_arguments, "cmd_validate"),
    "analyze": ("outlier diagnostics: an HTML report with per-layer plots", add_analyze_arguments, "cmd_analyze"),
    "recipes": ("list the built-in recipes, or print one as YAML", add_recipes_arguments, "cmd_recipes"),
    "demo": ("the bundled all-MiniLM-L6-v2: export, quantize, validate, one table", add_demo_arguments, "cmd_demo"),
}


def handler_for(name: str) -> Callable[[argparse.Namespace], int]:
    return globals()[SUBCOMMANDS[name][2]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outlierquant",
        description="Outlier-aware post-training quantization for ONNX models.",
    )
    add_common_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        add_common_arguments(p, subcommand=True)
        p.set_defaults(handler=handler_for(name))
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_handler(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a handler: an OutlierQuantError becomes one stderr line and its exit code."""
    try:
        return handler(args)
    except OutlierQuantError as exc:
        message = " ".join(str(exc).split())
        print(f"outlierquant: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("outlierquant: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_handler(args.handler, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
