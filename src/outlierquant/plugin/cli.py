"""The ``outlierquant`` command line.

Subcommands: ``export``, ``calibrate``, ``quantize``, ``validate``, ``demo``. Heavy
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
from typing import Sequence

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

    model_path = Path(args.model)
    load_model(model_path)  # clear errors before tokenizing anything
    feeds = _feeds_for(model_path, args.calibration_data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration")
    stats = collect_statistics(model_path, feeds, progress=_progress(args))
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


def cmd_demo(args) -> int:
    from outlierquant.demo import run_demo

    run_demo(Path(args.workdir), progress=_progress(args), recipe=args.recipe)
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outlierquant",
        description="Outlier-aware post-training quantization for ONNX models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what every step does")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="Hugging Face folder, .gguf file or hub id -> DIR/model.onnx")
    p.add_argument("model", help="a local Hugging Face model folder, a .gguf file, or a hub id (online only)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--task", help="optimum task (default: from the model's config)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: optimum's choice)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("calibrate", help="collect per-channel activation statistics (.npz + .json)")
    p.add_argument("model", type=Path)
    p.add_argument("--calibration-data", required=True, type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("-o", "--output", required=True, type=Path, help="statistics path (writes PATH.npz and PATH.json)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=int, help="use at most this many samples")
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("quantize", help="apply a recipe: MODEL.onnx -> OUT.onnx + OUT.report.json")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--recipe", default="default", help="a built-in recipe name or a YAML file (default: default)")
    p.add_argument("--calibration-data", type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("--stats", type=Path, help="statistics saved by `outlierquant calibrate` (fp32 model)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=int, help="use at most this many calibration samples")
    p.set_defaults(handler=cmd_quantize)

    p = sub.add_parser("validate", help="compare a candidate against the reference on held-out data")
    p.add_argument("reference", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--data", required=True, type=Path, help=".txt or .npz held-out data (not the calibration data)")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--limit", type=int, help="use at most this many samples")
    p.add_argument("--latency-batch", type=int, default=16)
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--kernels", choices=("auto", "none"), default="auto", help="register outlierquant's kernels")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("demo", help="the bundled all-MiniLM-L6-v2: export, quantize, validate, one table")
    p.add_argument("--workdir", default="outlierquant-demo", help="where the models go (default: ./outlierquant-demo)")
    p.add_argument("--recipe", default="default", help="our recipe to show (default: default)")
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except OutlierQuantError as exc:
        message = " ".join(str(exc).split())
        print(f"outlierquant: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("outlierquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
