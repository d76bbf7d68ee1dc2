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

from outlierquant.errors import (
    InputError,
    OutlierQuantError,
    describe,
    is_dependency_error,
    missing_extra,
    require_extra,
    translated,
)

logger = logging.getLogger("outlierquant")


def check_outputs(outputs, inputs) -> None:
    """:func:`outlierquant.outputs.check_outputs`, imported when needed (it brings onnx_ir)."""
    from outlierquant import outputs as outputs_mod

    outputs_mod.check_outputs(outputs, inputs)


def feeds_for_model(*args, **kwargs):
    """:func:`outlierquant.export.data.feeds_for_model`, imported when a command reads data
    (it brings onnx_ir; ``optimum-cli``'s registration must stay light)."""
    from outlierquant.export import data

    return data.feeds_for_model(*args, **kwargs)


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


def _model_and_output(args, command: str) -> tuple[str, Path]:
    """MODEL and OUTPUT from either spelling: ``-m MODEL OUTPUT`` (optimum's) or ``MODEL -o OUTPUT``."""
    paths = [str(p) for p in getattr(args, "paths", None) or []]
    model = getattr(args, "model", None)
    if model is None:
        if not paths:
            raise InputError(f"{command} needs a model: -m MODEL (see outlierquant {command} --help)")
        model = paths.pop(0)
    output = getattr(args, "output", None)
    if output is not None and paths:
        raise InputError(f"{command}: the output is given twice ({paths[0]} and -o {output}); give one")
    if output is None:
        if not paths:
            raise InputError(f"{command} needs an output: OUTPUT_DIR after the model, or -o "
                             f"(see outlierquant {command} --help)")
        output = paths.pop(0)
    if paths:
        raise InputError(f"{command}: unexpected argument {paths[0]!r}")
    return str(model), Path(output)


def _library_name(args) -> str | None:
    """``--library-name``: ``transformers`` unless given (``auto``: optimum's own choice)."""
    name = getattr(args, "library_name", None) or "transformers"
    return None if name == "auto" else name


def _calibration_source(args, *, required: str | None = None):
    """``--calibration-data FILE`` (a ``save_to_disk`` folder becomes a dataset) or
    ``--dataset NAME`` as a data source; None when neither is given (``required`` names the
    command that then fails)."""
    from outlierquant.export.hf_datasets import DatasetSource, is_saved_dataset

    data = getattr(args, "calibration_data", None)
    name = getattr(args, "dataset", None)
    options = dict(split=getattr(args, "dataset_split", "train"), text_column=getattr(args, "text_column", "text"))
    if name is not None:
        if data is not None:
            raise InputError(f"give --calibration-data FILE or --dataset NAME, not both ({data} and {name})")
        return DatasetSource(name, config=getattr(args, "dataset_config", None), **options)
    if data is not None and is_saved_dataset(data):
        return DatasetSource(str(data), **options)
    if data is None and required is not None:
        raise InputError(f"{required} needs --calibration-data FILE or --dataset NAME")
    return data


# -- handlers ----------------------------------------------------------------------------


def cmd_export(args) -> int:
    from outlierquant.export import export_model
    from outlierquant.plugin.folders import resolve_source

    model, output = _model_and_output(args, "export")
    args.model = model
    source = resolve_source(model)
    if not source.needs_export:
        raise InputError(f"{model}: is already ONNX; quantize it: outlierquant quantize -m {model} OUTPUT_DIR")
    if getattr(args, "no_past", False) and (args.task or "").endswith("-with-past"):
        raise InputError(f"--no-past contradicts --task {args.task}")
    source.check_export_extras()
    missing = []
    folder = output
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    try:
        with translated(args.model):
            path = export_model(args.model, output, task=args.task, opset=args.opset,
                                past=not getattr(args, "no_past", False), library_name=_library_name(args))
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
    data = _calibration_source(args, required="calibrate")
    model = load_model(model_path)  # clear errors before tokenizing anything
    feeds = feeds_for_model(model_path, data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration")
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
    """One command: MODEL (.onnx, exported folder, HF folder, .gguf, hub id) -> OUTPUT.

    OUTPUT ending in ``.onnx`` is the file form (``OUT.onnx`` + ``OUT.report.json``);
    anything else is a folder that optimum's ORTModel classes load (``plugin/folders.py``).
    Everything that can be checked is checked before the export, the tokenizing or the
    calibration starts.
    """
    from outlierquant.calibration.stats import stats_files
    from outlierquant.export.data import TOKENIZER_FILES, find_tokenizer_dir, is_text_source, source_lines
    from outlierquant.modelio import load_model
    from outlierquant.pipeline import report_path_for
    from outlierquant.plugin import folders

    model_arg, output = _model_and_output(args, "quantize")
    recipe = _load_recipe(args.recipe)  # a bad recipe fails before any work
    source = folders.resolve_source(model_arg)
    no_past = getattr(args, "no_past", False)
    folders.check_export_options(source, task=args.task, library_name=args.library_name, no_past=no_past,
                                 opset=args.opset)
    data = _calibration_source(args)
    if data is None and args.stats is None:
        raise InputError("quantize needs --calibration-data FILE or --dataset NAME (or --stats from "
                         "`outlierquant calibrate`)")
    for given in (args.calibration_data, args.stats and stats_files(args.stats)[0], args.tokenizer):
        if given is not None and not Path(given).exists():
            raise InputError(f"{given}: no such file")
    folder_form = output.suffix.lower() != ".onnx"
    if folder_form and output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder; give OUTPUT_DIR, or -o FILE.onnx for one file")
    if folder_form and not output.exists() and output.suffix:
        raise InputError(f"{output}: the output is a folder or an .onnx file, not a {output.suffix} file")
    out_model = output / "model.onnx" if folder_form else output
    side_folder = (source.onnx.parent if source.onnx is not None else source.path if source.kind == "hf-folder"
                   else None)

    stats = stats_files(args.stats) if args.stats is not None else []
    protect = _inputs(args.calibration_data, _recipe_file(args.recipe), *stats)
    if folder_form:
        protect += [p for p in folders.folder_inputs(side_folder) if p.exists()]
    inputs = _inputs(*protect, models=[source.onnx] if source.onnx is not None else [])
    if source.path is not None and source.needs_export and source.path.is_file():
        inputs.append(source.path)
    targets = [out_model, out_model.with_name(out_model.name + ".data"), report_path_for(out_model)]
    if folder_form:
        targets += folders.folder_targets(output, side_folder)
    check_outputs(targets, inputs)
    if args.export_dir is not None:
        if not source.needs_export:
            raise InputError(f"{model_arg}: is already ONNX; --export-dir applies only to a model that is exported")
        check_outputs([Path(args.export_dir) / "model.onnx"], inputs)
    source.check_export_extras()
    if source.onnx is not None:
        load_model(source.onnx)  # a corrupt model fails before tokenizing anything
    text_data = data is not None and is_text_source(data)
    if text_data:
        source_lines(data)  # empty or unreadable text, or a dataset not there, fails first, naming it
    if text_data and args.tokenizer is None:
        if source.onnx is not None and find_tokenizer_dir(source.onnx) is None:
            raise InputError(f"{source.onnx}: no tokenizer files beside the model ({', '.join(TOKENIZER_FILES[:3])}, "
                             "...) for the text in --calibration-data; pass --tokenizer DIR")
        if source.kind == "hf-folder" and find_tokenizer_dir(source.path) is None:
            raise InputError(f"{source.path}: no tokenizer files in the model folder for the text in "
                             "--calibration-data; pass --tokenizer DIR")

    with contextlib.ExitStack() as stack:
        model_path = source.onnx
        if model_path is None:
            model_path = _export_for_quantize(args, source, output, stack)
            side_folder = model_path.parent
            load_model(model_path)
        feeds = None
        if data is not None:
            _status(args, f"reading {data}")
            feeds = feeds_for_model(model_path, data, tokenizer=args.tokenizer, limit=args.limit,
                                    purpose="calibration")
        _status(args, f"quantizing with recipe {recipe.name} ({len(recipe.passes)} passes)")
        result = _quantize(model_path, out_model, recipe, feeds, args, protect=protect,
                           side_folder=side_folder if folder_form else None)
    floating = result.report.get("float_channels")
    if floating:
        print(f"{floating['share']:.2%} of the rewritten linears' input channels stay in float "
              f"({floating['float']} of {floating['of_inputs']})", file=sys.stderr)
    for record in result.report.get("passes", []):
        for line in record.get("summary", []):  # what a pass wants a person to read
            print(line, file=sys.stderr)
    int8_weights = result.report.get("int8_weights") or {}
    if int8_weights.get("encoding") == "unsigned":
        print(f"int8 weights stored unsigned: {int8_weights['reason']}", file=sys.stderr)
    parts, sizes = result.report.get("size_parts"), result.report.get("size_bytes") or {}
    if parts and sizes.get("input"):
        shown = ", ".join(f"{name.replace('_', ' ')} {parts[name] / 2**20:.1f} MiB" for name in
                          ("linears", "lm_head", "embeddings", "side_paths", "rotations", "other") if parts.get(name))
        print(f"size {sizes['output'] / sizes['input']:.3f} of the input ({shown})", file=sys.stderr)
    if folder_form:
        hint = folders.loading_hint(result.report, output)
        if hint:
            print(hint, file=sys.stderr)
        print(f"{output}\n{result.report_path}")
    else:
        print(f"{result.output}\n{result.report_path}")
    return 0


def _status(args, message: str) -> None:
    """A step of the one command, on stderr while progress is shown (not with -q, not in logs)."""
    from outlierquant.progress import progress_enabled

    if progress_enabled(_progress(args)):
        print(message, file=sys.stderr, flush=True)


def _export_for_quantize(args, source, output: Path, stack: contextlib.ExitStack) -> Path:
    """Export ``source`` into ``--export-dir`` (kept) or a temporary folder beside the output."""
    import shutil
    import tempfile

    from outlierquant.export import export_model

    if args.export_dir is not None:
        folder = Path(args.export_dir)
    else:
        parent = output.parent
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent
        folder = Path(tempfile.mkdtemp(prefix=".outlierquant-export-", dir=parent))
        stack.callback(shutil.rmtree, folder, True)
    _status(args, f"exporting {source.text} with optimum-onnx into {folder}")
    with translated(source.text):
        return export_model(source.text, folder, task=args.task, opset=args.opset,
                            past=not getattr(args, "no_past", False), library_name=_library_name(args))


def _quantize(model_path: Path, out_model: Path, recipe, feeds, args, *, protect, side_folder: Path | None):
    from outlierquant.pipeline import quantize_model
    from outlierquant.plugin import folders

    hook = folders.folder_files_hook(side_folder, recipe) if side_folder is not None else None
    result = quantize_model(model_path, out_model, recipe, feeds, stats_path=args.stats, progress=_progress(args),
                            protect=protect, extra_files=hook, int8_weights=getattr(args, "int8_weights", None))
    if side_folder is not None:
        folders.copy_module_folders(side_folder, out_model.parent)
    return result


def cmd_validate(args) -> int:
    from outlierquant.evaluate.validate import validate
    from outlierquant.modelio import load_model

    reference, candidate = Path(args.reference), Path(args.candidate)
    inputs = _inputs(args.data, models=[reference, candidate])
    if args.json is not None:
        check_outputs([args.json], inputs)
    for path in (reference, candidate):
        load_model(path, check=False)
    providers = _providers(getattr(args, "provider", "cpu"))  # before any work
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
        providers=providers,
    )
    if args.json:
        report.save_json(args.json, protect=inputs)
    print(report.format_table())
    return 0


def _providers(provider: str) -> tuple[str, ...]:
    """onnxruntime providers for ``--provider``; CUDA only where onnxruntime-gpu provides it."""
    if provider == "cpu":
        return ("CPUExecutionProvider",)
    import onnxruntime as ort

    from outlierquant.errors import MissingExtraError, install_hint

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingExtraError("--provider cuda: this onnxruntime has no CUDAExecutionProvider (it is the CPU "
                                f"build, or CUDA is missing): {install_hint('gpu')}, then see the README's GPU section")
    return ("CUDAExecutionProvider", "CPUExecutionProvider")


def cmd_analyze(args) -> int:
    require_extra("analyze", "report")  # the plots: one line, before any work
    from outlierquant.evaluate.report import analyze_model, check_report_folder
    from outlierquant.modelio import load_model

    model_path = Path(args.model)
    inputs = _inputs(args.calibration_data, args.data, models=[model_path, args.quantized])
    check_report_folder(args.output, inputs)
    load_model(model_path)
    if args.quantized is not None:
        load_model(args.quantized, check=False)
    data = _calibration_source(args, required="analyze")
    feeds = feeds_for_model(model_path, data, tokenizer=args.tokenizer, limit=args.limit, purpose="calibration")
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
            sensitivity_recipe=args.recipe,
        )
    e2e = report.end_to_end or {}
    if e2e.get("perplexity_delta") is not None:
        print(f"end-to-end: perplexity {e2e['perplexity_reference']:.3f} -> {e2e['perplexity_candidate']:.3f} "
              f"({e2e['perplexity_delta']:+.3f}) on {e2e['samples']} probe samples")
    elif e2e.get("cosine_mean") is not None:
        print(f"end-to-end: {e2e['metric']} mean {e2e['cosine_mean']:.4f}, min {e2e['cosine_min']:.4f} "
              f"on {e2e['samples']} probe samples")
    for item in report.advice:
        print(f"advice ({item['rule']}): {item['text']}")
    print(report.html_path)
    return 0


def cmd_demo(args) -> int:
    require_extra("demo", "export", "models")
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


def _examples(p: argparse.ArgumentParser, *lines: str, usage: str | None = None) -> None:
    """End the subcommand's help with examples (the same under optimum-cli)."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    if usage is not None:
        p.usage = usage


def _add_model_and_output(p: argparse.ArgumentParser, *, model_help: str, output_help: str,
                          onnx_model_alias: bool = False) -> None:
    """``-m MODEL OUTPUT`` (optimum's spelling) or ``MODEL -o OUTPUT``; resolved by :func:`_model_and_output`."""
    flags = ["-m", "--model"] + (["--onnx_model", "--onnx-model"] if onnx_model_alias else [])
    p.add_argument(*flags, dest="model", metavar="MODEL", help=model_help)
    p.add_argument("paths", nargs="*", metavar="MODEL_OR_OUTPUT",
                   help="positional form: MODEL OUTPUT, or OUTPUT alone after -m MODEL")
    p.add_argument("-o", "--output", type=Path, help=output_help)


def _add_export_options(p: argparse.ArgumentParser, *, for_quantize: bool = False) -> None:
    when = " (when MODEL is exported first)" if for_quantize else ""
    p.add_argument("--task", help="optimum task (default: from the model's config; a causal LM: "
                   f"text-generation-with-past){when}")
    p.add_argument("--library-name", choices=("transformers", "sentence_transformers", "timm", "diffusers", "auto"),
                   help="library optimum exports through (default: transformers, so a sentence-transformers "
                   "folder gets last_hidden_state, which ORTModelForFeatureExtraction and sentence-transformers' "
                   f"ONNX backend read; sentence_transformers gives token_embeddings/sentence_embedding){when}")
    p.add_argument("--no-past", action="store_true",
                   help=f"export a causal LM without its KV cache (text-generation){when}")
    p.add_argument("--opset", type=positive_int, help=f"ONNX opset (default: optimum's choice){when}")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_and_output(p, model_help="a local Hugging Face model folder, a .gguf file, or a hub id (online only)",
                          output_help="output folder (model.onnx, config and tokenizer)")
    _add_export_options(p)
    _examples(p, "outlierquant export -m ./all-MiniLM-L6-v2 exported/",
              "outlierquant export -m SmolLM2-135M-Instruct.Q4_1.gguf smollm2/ --no-past",
              "outlierquant export ./bert-folder -o exported/ --library-name sentence_transformers",
              usage="%(prog)s -m MODEL OUTPUT_DIR [options]   (or: %(prog)s MODEL -o OUTPUT_DIR)")


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hugging Face datasets (the [datasets] extra; nothing is downloaded)")
    g.add_argument("--dataset", metavar="NAME", help="calibration text from a datasets dataset instead of "
                   "--calibration-data: a name in the local Hugging Face cache, or a local folder of data files "
                   "(a save_to_disk folder can also be given as --calibration-data)")
    g.add_argument("--dataset-config", metavar="CONFIG", help="the dataset's configuration name, if it has several")
    g.add_argument("--dataset-split", default="train", metavar="SPLIT", help="the split to read (default: train)")
    g.add_argument("--text-column", default="text", metavar="COLUMN", help="the column holding the text (default: text)")


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the fp32 model: an .onnx file or an exported folder")
    p.add_argument("--calibration-data", type=Path, metavar="FILE",
                   help="required unless --dataset: .txt (one sample per line), .jsonl (a \"text\" field per line), "
                   ".npz feeds, or a datasets save_to_disk folder")
    _add_dataset_options(p)
    p.add_argument("-o", "--output", required=True, type=Path, help="statistics path (writes PATH.npz and PATH.json)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=positive_int, help="use at most this many samples")
    _examples(p, "outlierquant calibrate exported/model.onnx --calibration-data calib.txt -o stats",
              "outlierquant quantize -m exported/ quantized/ --stats stats --recipe w8a8")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_and_output(
        p, onnx_model_alias=True,
        model_help="an .onnx file, an exported folder, a Hugging Face folder, a .gguf file or (online) a hub id; "
                   "anything but ONNX is exported first",
        output_help="OUTPUT_DIR: a folder the matching ORTModelFor* class loads (model.onnx, config, tokenizer, "
                    "ort_config.json, report); a path ending in .onnx writes that file and OUT.report.json only")
    p.add_argument("--recipe", default="default", metavar="R",
                   help="a built-in recipe name (see `outlierquant recipes`) or a YAML file (default: default)")
    p.add_argument("--calibration-data", type=Path, metavar="FILE",
                   help="required unless --dataset or --stats: .txt (one sample per line), .jsonl (a \"text\" field "
                   "per line), .npz feeds, or a datasets save_to_disk folder")
    _add_dataset_options(p)
    p.add_argument("--stats", type=Path, metavar="PATH", help="statistics saved by `outlierquant calibrate` (fp32 model), "
                   "instead of --calibration-data")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=positive_int, help="use at most this many calibration samples")
    p.add_argument("--int8-weights", choices=("auto", "signed", "unsigned"), default=None,
                   help="how int8 weight codes are stored: signed runs fastest on x86 CPUs with VNNI, unsigned "
                        "(zero point 128) is exact on x86 CPUs without it, where onnxruntime's u8 x s8 kernels "
                        "saturate (default: auto, from this CPU; or $OUTLIERQUANT_INT8_WEIGHTS)")
    p.add_argument("--export-dir", type=Path, metavar="DIR", help="keep the fp32 export here (default: a temporary folder, "
                   "removed afterwards) when MODEL is exported first; validate against it")
    _add_export_options(p, for_quantize=True)
    _examples(p, "outlierquant quantize -m ./all-MiniLM-L6-v2 minilm-int8/ --recipe default --calibration-data calib.txt",
              "outlierquant quantize -m SmolLM2.gguf smollm2-int8/ --recipe w8a8 --calibration-data wiki.txt "
              "--export-dir smollm2-fp32/",
              "outlierquant quantize exported/model.onnx -o quantized.onnx --recipe w8a8 --calibration-data calib.txt",
              "outlierquant quantize -m ./all-MiniLM-L6-v2 out/ --dataset ./my_saved_dataset --text-column sentence",
              "optimum-cli outlierquant quantize --onnx_model exported/ -o quantized/ --calibration-data calib.txt",
              usage="%(prog)s -m MODEL OUTPUT_DIR --recipe R --calibration-data FILE [options]\n"
                    "       %(prog)s MODEL.onnx -o OUT.onnx --recipe R --calibration-data FILE [options]")


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", type=Path, help="the fp32 model (.onnx file or exported folder)")
    p.add_argument("candidate", type=Path, help="the quantized model (.onnx file or the quantize output folder)")
    p.add_argument("--data", required=True, type=Path, metavar="FILE",
                   help="required: .txt, .jsonl or .npz held-out data (not the calibration data)")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: beside the reference model)")
    p.add_argument("--limit", type=positive_int, help="use at most this many samples")
    p.add_argument("--latency-batch", type=positive_int, default=16,
                   help="batch size of the latency measurement (default: 16)")
    p.add_argument("--latency-runs", type=nonnegative_int, default=10,
                   help="timed runs per model, interleaved (default: 10; 0: no latency)")
    p.add_argument("--kernels", choices=("auto", "none"), default="auto",
                   help="register outlierquant's kernels for the candidate (default: auto, when they load)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="onnxruntime execution provider for both models (default: cpu; cuda needs "
                   "onnxruntime-gpu, the [gpu] extra)")
    _examples(p, "outlierquant validate exported/ quantized/ --data heldout.txt --json validation.json")


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the fp32 model (.onnx file or exported folder)")
    p.add_argument("--calibration-data", type=Path, metavar="FILE",
                   help="required unless --dataset: .txt (one sample per line), .jsonl (a \"text\" field per line), "
                   ".npz feeds, or a datasets save_to_disk folder")
    _add_dataset_options(p)
    p.add_argument("-o", "--output", required=True, type=Path, help="report folder (writes index.html + PNGs)")
    p.add_argument("--quantized", type=Path, help="a quantized version of the model: per-layer SQNR + sensitivity")
    p.add_argument("--data", type=Path, help="held-out probe data (default: the first calibration samples)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="tokenizer folder (default: beside the model)")
    p.add_argument("--limit", type=positive_int, help="use at most this many calibration samples")
    p.add_argument("--probe-samples", type=positive_int, default=8,
                   help="samples for kurtosis, SQNR and sensitivity (default: 8)")
    p.add_argument("--threshold", type=positive_float, default=6.0, help="outlier magnitude (default: 6, LLM.int8())")
    p.add_argument("--sensitivity-layers", type=nonnegative_int, default=48,
                   help="rank at most this many layers, quantized one at a time (default: 48; 0: skip)")
    p.add_argument("--recipe", metavar="R", help="rank sensitivity with this recipe's quantize settings (a built-in "
                   "name or a .yaml file; default: the recipe in the quantized model's report; plain w8a8 where the "
                   "recipe has no quantize pass)")
    _examples(p, "outlierquant analyze exported/model.onnx --calibration-data calib.txt -o report/",
              "outlierquant analyze exported/ --calibration-data calib.txt --quantized quantized/ -o report/",
              'needs the [report] extra: pip install "outlierquant[report]"')


def add_recipes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="print this recipe as YAML (full description, passes, options) and "
                   "its row of the table (default: the table of all built-in recipes)")
    _examples(p, "outlierquant recipes", "outlierquant recipes default > my-recipe.yaml   # then edit it")


def cmd_recipes(args) -> int:
    from outlierquant.recipes import builtin_recipes
    from outlierquant.recipes.summary import recipe_table, summarize

    if args.name:
        recipe = _load_recipe(args.name)
        print(recipe.to_yaml(), end="")
        summary = summarize(recipe)
        print(f"# method: {summary.method}\n# bits: {summary.bits}\n# runs as: {summary.execution}"
              f"{' (onnxruntime rounds in float: accuracy is real, speed is not)' if summary.simulated else ''}"
              f"\n# our kernels: {summary.kernels}")
        return 0
    print(recipe_table([_load_recipe(name) for name in builtin_recipes()]))
    print("\nsimulated: onnxruntime runs the rounding in float (the accuracy is real, the speed is not)\n"
          "if built: uses our kernels when they load, standard ops otherwise\n"
          "outlierquant recipes NAME: one recipe in full (description, passes, options) as YAML")
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="outlierquant-demo", help="where the models go (default: ./outlierquant-demo)")
    p.add_argument("--recipe", default="default", help="our recipe to show (default: default)")
    _examples(p, "outlierquant demo", "outlierquant demo --recipe smoothquant-w8a8 --workdir /tmp/demo",
              'needs the [export,models] extras: pip install "outlierquant[export,models]"')


def add_common_arguments(p: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """``-v``, ``-q`` and ``--debug``: on the root parser, and again on each subcommand so they may follow it."""
    # SUPPRESS on subcommands: their default must not overwrite a flag given before the subcommand
    extra = {"default": argparse.SUPPRESS} if subcommand else {}
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log what every step does; after each pass, what it did", **extra)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display (passes, bars, steps)", **extra)
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback", **extra)


#: name -> (help, add_arguments, handler); the handlers are looked up lazily by name
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "export": ("Hugging Face folder, .gguf file or hub id -> DIR/model.onnx (optional: quantize exports too)",
               add_export_arguments, "cmd_export"),
    "calibrate": ("collect per-channel activation statistics (.npz + .json)", add_calibrate_arguments, "cmd_calibrate"),
    "quantize": ("apply a recipe: MODEL (ONNX, HF folder, .gguf, hub id) -> a folder ORTModelFor* loads",
                 add_quantize_arguments, "cmd_quantize"),
    "validate": ("compare a candidate against the reference on held-out data", add_validate_arguments, "cmd_validate"),
    "analyze": ("outlier diagnostics: an HTML report with per-layer plots", add_analyze_arguments, "cmd_analyze"),
    "recipes": ("the built-in recipes as a table, or one of them in full (YAML)", add_recipes_arguments,
                "cmd_recipes"),
    "demo": ("the bundled all-MiniLM-L6-v2: export, quantize, validate, one table", add_demo_arguments, "cmd_demo"),
}


def handler_for(name: str) -> Callable[[argparse.Namespace], int]:
    return globals()[SUBCOMMANDS[name][2]]


def build_parser() -> argparse.ArgumentParser:
    from outlierquant import __version__

    parser = _Parser(
        prog="outlierquant",
        description="Outlier-aware post-training quantization for ONNX models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  outlierquant recipes\n"
               "  outlierquant quantize -m ./all-MiniLM-L6-v2 minilm-int8/ --recipe default --calibration-data calib.txt\n"
               "  outlierquant validate exported/ minilm-int8/ --data heldout.txt\n"
               "  outlierquant COMMAND --help",
    )
    parser.add_argument("--version", action="version", version=f"outlierquant {__version__}",
                        help="print the version and exit")
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
    # transformers sets its own logger's level when it first configures it: tell it by name
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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

    from outlierquant.outputs import Terminated, terminate_as_exception

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
    except BrokenPipeError:  # `outlierquant recipes | head`: the reader has gone, nothing to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (lives until exit: no flush error then)
        return 0
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc)
        if debug or hint is None:
            raise
        print(f"outlierquant: error: {hint}", file=sys.stderr)
        return hint.exit_code
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
