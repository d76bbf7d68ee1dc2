"""The ``outlierquant`` command line.

Subcommands: ``export``, ``calibrate``, ``quantize``, ``validate``, ``analyze``, ``demo``. Heavy
libraries (torch, transformers, onnxruntime) are imported inside the handlers so that
``outlierquant --help`` is instant.

One error boundary (:func:`run_handler`): an :class:`~outlierquant.errors.OutlierQuantError`,
an OS error, or an error raised inside onnx, onnx_ir, onnxruntime or protobuf while they
read the user's files becomes one line on stderr, ``outlierquant: error: <file>: <problem>``,
and exit code 2; ``--debug`` shows the traceback instead. Dependencies' warnings and log
lines are silenced while a command runs (``-v`` lets them through), so that line is the
only one. Anything else raised by our own code is a bug and keeps its traceback.

No command writes over one of its inputs: every output path is checked against the input
files (through symlinks and hard links) before any work, and outputs are written through
:class:`~outlierquant.outputs.OutputUnit`, so a failure or a signal leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

from outlierquant.errors import InputError, OutlierQuantError, describe, is_dependency_error, translated
from outlierquant.export.data import feeds_for_model
from outlierquant.outputs import Terminated, check_outputs, terminate_as_exception

logger = logging.getLogger("outlierquant")


def _progress(args) -> bool | None:
    return False if getattr(args, "quiet", False) else None


def _inputs(*paths: Path | str | None, models: Sequence[Path | str | None] = ()) -> list[Path]:
    """The files a command reads: models with their external data, then ``paths``."""
    from outlierquant.modelio import model_files

    files: list[Path] = []
    for model in models:
        if model is not None and Path(model).exists():
            files += model_files(model)
    files += [Path(p) for p in paths if p is not None and Path(p).exists()]
    return files


def _load_recipe(name: str):
    """A recipe, with errors that name the recipe file (or name) they are about."""
    from outlierquant.errors import RecipeError
    from outlierquant.recipes import load_recipe

    try:
        return load_recipe(name)
    except RecipeError as exc:
        if str(exc).startswith(str(name)) or str(exc).startswith(f"unknown recipe {name!r}"):
            raise
        raise RecipeError(f"{name}: {exc}") from exc


def _recipe_file(recipe: str) -> Path | None:
    path = Path(recipe)
    return path if path.is_file() else None


# -- handlers ----------------------------------------------------------------------------


def cmd_export(args) -> int:
    from outlierquant.export import export_model

    output = Path(args.output)
    if getattr(args, "no_past", False) and (args.task or "").endswith("-with-past"):
        raise InputError(f"--no-past contradicts --task {args.task}")
    missing = []
    folder = output
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    try:
        with translated(args.model):
            path = export_model(args.model, output, task=args.task, opset=args.opset,
                                past=not getattr(args, "no_past", False))
    except BaseException:
        for created in missing:  # the folders this run made, if the export left them empty
            with contextlib.suppress(OSError):
                created.rmdir()
        raise
    print(path)
    return 0


def cmd_calibrate(args) -> int:
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.calibration.stats import stats_files
    from outlierquant.modelio import load_model
    from outlierquant.passes.canonicalize import CanonicalizePass

    model_path = Path(args.model)
    inputs = _inputs(args.calibration_data, args.tokenizer, models=[model_path])
    check_outputs(stats_files(args.output), inputs)
    model = load_model(model_path)  # clear errors before tokenizing anything
    feeds = feeds_for_model(model_path, args.calibration_data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration")
    # Collected on the canonical form, as `quantize` sees the model, so that the tensor
    # names match when the saved statistics are reused.
    with translated(model_path):
        CanonicalizePass()(model)
        stats = collect_statistics(model, feeds, progress=_progress(args))
    stats.meta["model"] = str(model_path)
    written = stats.save(args.output, protect=inputs)
    print(written)
    return 0


def cmd_quantize(args) -> int:
    from outlierquant.calibration.stats import stats_files
    from outlierquant.modelio import load_model
    from outlierquant.pipeline import quantize_model, report_path_for

    model_path = Path(args.model)
    output = Path(args.output)
    stats = stats_files(args.stats) if args.stats is not None else []
    protect = _inputs(args.calibration_data, _recipe_file(args.recipe), *stats)
    inputs = _inputs(*protect, models=[model_path])
    check_outputs([output, output.with_name(output.name + ".data"), report_path_for(output)], inputs)
    recipe = _load_recipe(args.recipe)  # a bad recipe fails before any work
    load_model(model_path)
    feeds = None
    if args.calibration_data is not None:
        feeds = feeds_for_model(
            model_path, args.calibration_data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration"
        )
    elif args.stats is None:
        raise InputError("quantize needs --calibration-data FILE (or --stats from `outlierquant calibrate`)")
    result = quantize_model(model_path, output, recipe, feeds, stats_path=args.stats, progress=_progress(args),
                            protect=protect)
    floating = result.report.get("float_channels")
    if floating:
        print(f"{floating['share']:.2%} of the rewritten linears' input channels stay in float "
              f"({floating['float']} of {floating['of_inputs']})", file=sys.stderr)
    for record in result.report.get("passes", []):
        for line in record.get("summary", []):  # what a pass wants a person to read
            print(line, file=sys.stderr)
    print(f"{result.output}\n{result.report_path}")
    return 0


def cmd_validate(args) -> int:
    from outlierquant.evaluate.validate import validate
    from outlierquant.modelio import load_model

    reference, candidate = Path(args.reference), Path(args.candidate)
    inputs = _inputs(args.data, models=[reference, candidate])
    if args.json is not None:
        check_outputs([args.json], inputs)
    for path in (reference, candidate):
        load_model(path, check=False)
    feeds = feeds_for_model(reference, args.data, tokenizer=args.tokenizer, limit=args.limit, purpose="evaluation")
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
    if args.json:
        report.save_json(args.json, protect=inputs)
    print(report.format_table())
    return 0


def cmd_analyze(args) -> int:
    from outlierquant.evaluate.report import analyze_model, check_report_folder
    from outlierquant.modelio import load_model

    model_path = Path(args.model)
    inputs = _inputs(args.calibration_data, args.data, models=[model_path, args.quantized])
    check_report_folder(args.output, inputs)
    load_model(model_path)
    if args.quantized is not None:
        load_model(args.quantized, check=False)
    feeds = feeds_for_model(model_path, args.calibration_data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration")
    probe = None
    if args.data is not None:
        probe = feeds_for_model(model_path, args.data, tokenizer=args.tokenizer, limit=args.probe_samples, purpose="probe")
    with translated(model_path):
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
            protect=inputs,
        )
    print(report.html_path)
    return 0


def cmd_demo(args) -> int:
    from outlierquant.demo import run_demo

    run_demo(Path(args.workdir), progress=_progress(args), recipe=args.recipe)
    return 0


# -- parser ------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the full usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"outlierquant: error: {' '.join(message.split())} (see {self.prog} --help)\n")
# Each subcommand's arguments are defined once, here; the optimum-cli command
# (plugin/optimum_command.py) builds its parsers from the same table.


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local Hugging Face model folder, a .gguf file, or a hub id (online only)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--task", help="optimum task (default: from the model's config; a causal LM: "
                   "text-generation-with-past)")
    p.add_argument("--no-past", action="store_true",
                   help="export a causal LM without its KV cache (text-generation)")
    p.add_argument("--opset", type=positive_int, help="ONNX opset (default: optimum's choice)")


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("--calibration-data", required=True, type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("-o", "--output", required=True, type=Path, help="statistics path (writes PATH.npz and PATH.json)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=positive_int, help="use at most this many samples")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--recipe", default="default", help="a built-in recipe name or a YAML file (default: default)")
    p.add_argument("--calibration-data", type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("--stats", type=Path, help="statistics saved by `outlierquant calibrate` (fp32 model)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=positive_int, help="use at most this many calibration samples")


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--data", required=True, type=Path, help=".txt or .npz held-out data (not the calibration data)")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--limit", type=positive_int, help="use at most this many samples")
    p.add_argument("--latency-batch", type=positive_int, default=16)
    p.add_argument("--latency-runs", type=nonnegative_int, default=10)
    p.add_argument("--kernels", choices=("auto", "none"), default="auto", help="register outlierquant's kernels")


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the fp32 model")
    p.add_argument("--calibration-data", required=True, type=Path, help=".txt (one sample per line) or .npz feeds")
    p.add_argument("-o", "--output", required=True, type=Path, help="report folder (writes index.html + PNGs)")
    p.add_argument("--quantized", type=Path, help="a quantized version of the model: per-layer SQNR + sensitivity")
    p.add_argument("--data", type=Path, help="held-out probe data (default: the first calibration samples)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=positive_int, help="use at most this many calibration samples")
    p.add_argument("--probe-samples", type=positive_int, default=8,
                   help="samples for kurtosis, SQNR and sensitivity (default: 8)")
    p.add_argument("--threshold", type=positive_float, default=6.0, help="outlier magnitude (default: 6, LLM.int8())")
    p.add_argument("--sensitivity-layers", type=nonnegative_int, default=48,
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
    """``-v``, ``-q`` and ``--debug``: on the root parser, and again on each subcommand so they may follow it."""
    # SUPPRESS on subcommands: their default must not overwrite a flag given before the subcommand
    extra = {"default": argparse.SUPPRESS} if subcommand else {}
    p.add_argument("-v", "--verbose", action="store_true", help="log what every step does", **extra)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars", **extra)
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback", **extra)


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
    parser = _Parser(
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


#: loggers of dependencies whose warnings would come before our one error line
_DEPENDENCY_LOGGERS = ("onnx_ir", "onnxscript", "onnxruntime", "onnx", "transformers", "optimum", "torch", "root")


@contextlib.contextmanager
def quiet_dependencies(loud: bool = False, *, onnxruntime: bool = True) -> Iterator[None]:
    """Silence dependencies' Python warnings, log lines and (``onnxruntime``) onnxruntime's own logger."""
    if loud:
        yield
        return
    loggers = [logging.getLogger(None if name == "root" else name) for name in _DEPENDENCY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger_ in loggers[:-1]:
            logger_.setLevel(logging.CRITICAL)
        if onnxruntime or "onnxruntime" in sys.modules:
            import onnxruntime as ort

            ort.set_default_logger_severity(4)
        try:
            yield
        finally:
            for logger_, level in zip(loggers, levels):
                logger_.setLevel(level)


def run_handler(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a handler behind the error boundary; returns the exit code.

    An OutlierQuantError, or an OS or dependency error (:func:`~outlierquant.errors.is_dependency_error`),
    becomes one stderr line and exit code 2; SIGINT gives 130, SIGTERM 143, each after
    the outputs in progress were removed. ``--debug`` re-raises instead.
    """

    debug = getattr(args, "debug", False)
    try:
        loud = getattr(args, "verbose", False) or debug
        with terminate_as_exception(), quiet_dependencies(loud, onnxruntime=getattr(args, "command", "") != "recipes"):
            return handler(args)
    except KeyboardInterrupt:
        print("outlierquant: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print("outlierquant: terminated", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        if debug or not (isinstance(exc, OutlierQuantError) or is_dependency_error(exc)):
            raise
        print(f"outlierquant: error: {describe(exc)}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, OutlierQuantError) else 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    configure_logging(args.verbose)
    return run_handler(args.handler, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
