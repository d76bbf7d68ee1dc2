"""The Python API, shaped like optimum's ``ORTQuantizer``::

    from outlierquant.plugin.api import OutlierQuantizer

    quantizer = OutlierQuantizer.from_pretrained("path/to/hf-folder")   # or model.onnx, or .gguf
    result = quantizer.quantize("smoothquant-w8a8", "calibration.txt", "out/")
    print(result.path, result.report["passes"])
    print(quantizer.validate(result.path, "heldout.txt").format_table())
    quantizer.analyze("calibration.txt", "report/", quantized=result.path)

Recipes are built-in names, YAML files, :class:`~outlierquant.recipes.Recipe` objects, or
built in code from the passes' typed options with :func:`make_recipe`::

    from outlierquant.passes.quantize import QuantConfig
    recipe = make_recipe("mine", "canonicalize", ("quantize", QuantConfig(activations="per_token")))
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe

Calibration and evaluation data are a ``.txt`` (one sample per line) or ``.npz`` path, a
list of strings (tokenized with the tokenizer beside the model; causal LMs get fixed
128-token segments), or a list of feed dicts (input name -> array).

Every method raises :class:`~outlierquant.errors.OutlierQuantError` subclasses for bad
input, including what onnx, onnx_ir, onnxruntime or the operating system raise while
reading the user's files (:func:`~outlierquant.errors.translated`), and never writes over
one of its inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from outlierquant.errors import InputError, RecipeError, translated
from outlierquant.evaluate.validation_report import ValidationReport
from outlierquant.export.data import feeds_for_model, is_causal_lm

if TYPE_CHECKING:
    from outlierquant.evaluate.report_data import AnalysisReport
    from outlierquant.recipes import Recipe

logger = logging.getLogger(__name__)

__all__ = ["OutlierQuantizer", "QuantizationOutput", "make_recipe"]

#: a path to .txt/.npz, texts, or feed dicts
Data = Union[str, os.PathLike, Sequence[str], Sequence[dict]]



@dataclasses.dataclass
class QuantizationOutput:
    """What :meth:`OutlierQuantizer.quantize` wrote."""

    path: Path
    report: dict[str, Any]
    report_path: Path


def make_recipe(name: str, *steps: Any, description: str = "") -> "Recipe":
    """A validated :class:`Recipe` from pass names and typed options.

    Each step is a pass name (``"canonicalize"``), a ``(name, options)`` pair where options
    is the pass's frozen options dataclass or a dict, or a ready
    :class:`~outlierquant.recipes.PassSpec`. Only fields that differ from their defaults
    are recorded, so the YAML stays short and round-trips exactly.
    """
    from outlierquant.recipes import PassSpec, Recipe, validate_pass_options

    specs = []
    for index, step in enumerate(steps):
        if isinstance(step, PassSpec):
            specs.append(validate_pass_options(step.name, step.options_dict(), source=name))
            continue
        if isinstance(step, str):
            pass_name, options = step, {}
        elif isinstance(step, tuple) and len(step) == 2:
            pass_name, options = step
        else:
            raise RecipeError(f"{name}: step {index} must be a pass name, (name, options) or a PassSpec")
        if dataclasses.is_dataclass(options) and not isinstance(options, type):
            options = _changed_fields(options)
        elif options is None:
            options = {}
        elif not isinstance(options, dict):
            raise RecipeError(f"{name}: options of pass {pass_name!r} must be its options dataclass or a dict")
        specs.append(validate_pass_options(pass_name, options, source=name))
    if not specs:
        raise RecipeError(f"{name}: a recipe needs at least one pass")
    return Recipe(name=name, passes=tuple(specs), description=description)


def _changed_fields(options: Any) -> dict[str, Any]:
    changed = {}
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if value != default:
            changed[field.name] = list(value) if isinstance(value, tuple) else value
    return changed


class OutlierQuantizer:
    """Quantize, validate and analyse one fp32 ONNX model."""

    def __init__(self, onnx_path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> None:
        from outlierquant.modelio import load_model

        path = Path(onnx_path)
        if path.is_dir():
            path = path / "model.onnx"
        load_model(path)  # one clear error now rather than later
        self.model_path = path
        self.tokenizer = Path(tokenizer) if tokenizer is not None else None

    def __repr__(self) -> str:
        return f"OutlierQuantizer({str(self.model_path)!r})"

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        export_dir: str | os.PathLike | None = None,
        task: str | None = None,
        opset: int | None = None,
        tokenizer: str | os.PathLike | None = None,
        past: bool = True,
        library_name: str | None = "transformers",
    ) -> "OutlierQuantizer":
        """From an ``.onnx`` file, a folder holding ``model.onnx``, or a model to export.

        A Hugging Face folder, a ``.gguf`` file or (online) a hub id is exported first
        (optimum-onnx, the ``[export]`` extra) into ``export_dir`` (default: a new temporary
        folder, logged); a causal LM with its KV cache unless ``past=False`` or ``task``
        says otherwise; through ``library_name`` (default ``transformers``: a
        sentence-transformers folder gets ``last_hidden_state``; ``None``: optimum's choice).
        """
        from outlierquant.plugin.folders import resolve_source

        source = resolve_source(model)
        if not source.needs_export:
            return cls(source.onnx, tokenizer=tokenizer)
        source.check_export_extras()
        from outlierquant.export import export_model

        if export_dir is None:
            export_dir = tempfile.mkdtemp(prefix="outlierquant-export-")
            logger.info("exporting %s into %s", source.text, export_dir)
        with translated(source.text):
            exported = export_model(source.text, export_dir, task=task, opset=opset, past=past,
                                    library_name=library_name)
        return cls(exported, tokenizer=tokenizer)

    # -- data ------------------------------------------------------------------------

    def feeds(self, data: Data, *, limit: int | None = None, purpose: str = "calibration",
              text_column: str = "text") -> list[dict]:
        """Feeds for this model from a path (.txt, .jsonl, .npz), texts, feed dicts, an
        onnxruntime-style ``CalibrationDataReader`` (``get_next()`` until ``None``), or a
        Hugging Face ``datasets.Dataset`` (its ``text_column``)."""
        from outlierquant.export import data as data_mod

        data_mod.check_limit(limit)
        if hasattr(data, "get_next") and callable(data.get_next):
            data = list(iter(data.get_next, None))
        elif hasattr(data, "column_names") and not isinstance(data, (str, os.PathLike, dict)):
            columns = list(data.column_names)
            if text_column not in columns:
                raise InputError(f"{purpose} dataset has no column {text_column!r} (columns: {', '.join(columns)})")
            data = list(data[text_column])
        if isinstance(data, (str, os.PathLike)):
            with translated(data):
                return feeds_for_model(self.model_path, Path(data), tokenizer=self.tokenizer, limit=limit, purpose=purpose)
        if isinstance(data, dict):
            raise InputError(f"{purpose} data: a single feed dict; pass a list of them")
        items = list(data)
        if not items:
            raise InputError(f"the {purpose} data is empty")
        if all(isinstance(item, dict) for item in items):
            items = items[:limit] if limit is not None else items
            data_mod.check_feeds(items, source=f"{purpose} data", limits=data_mod.index_limits(self.model_path))
            return items
        if not all(isinstance(item, str) for item in items):
            raise InputError(f"{purpose} data: expected a path, a list of strings or a list of feed dicts")
        with translated(self.model_path):
            return self._text_feeds(items, limit=limit, purpose=purpose)

    def _text_feeds(self, texts: list[str], *, limit: int | None, purpose: str) -> list[dict]:
        from outlierquant.export import data as data_mod

        folder = self.tokenizer or data_mod.find_tokenizer_dir(self.model_path)
        if folder is None:
            raise InputError(f"{self.model_path}: no tokenizer files beside the model; pass tokenizer=DIR")
        tokenizer = data_mod.load_tokenizer(folder)
        spec = data_mod.model_inputs(self.model_path)
        texts = [t for t in texts if t.strip()]
        text_spec = data_mod.text_inputs(spec)  # a with-past decoder's cache is filled below
        if is_causal_lm(self.model_path):
            feeds = data_mod.lm_segments(texts, tokenizer=tokenizer, input_names=text_spec, seq_len=128,
                                         max_segments=limit)
        else:
            feeds = data_mod.text_feeds(texts[:limit] if limit else texts, tokenizer=tokenizer, input_names=text_spec)
        feeds = data_mod.fill_past(self.model_path, spec, feeds)
        if not feeds:
            raise InputError(f"the {purpose} texts give no samples")
        return feeds

    # -- the work --------------------------------------------------------------------

    def quantize(
        self,
        recipe: "str | os.PathLike | Recipe" = "default",
        calibration_data: Data | None = None,
        save_dir: str | os.PathLike = "outlierquant-quantized",
        *,
        stats: str | os.PathLike | None = None,
        file_name: str = "model.onnx",
        limit: int | None = None,
        progress: bool | None = None,
    ) -> QuantizationOutput:
        """Apply ``recipe`` and write ``save_dir/file_name`` with its ``.report.json``.

        The model's config, generation config and tokenizer files (and a
        sentence-transformers folder's module files) are copied beside the output with an
        ``ort_config.json`` recording the quantization, so the folder loads like the
        exported one (tokenizers, optimum's ``ORTModelFor*`` classes); the report's
        ``deployment`` entry names the class and the graph's outputs.
        """
        from outlierquant.pipeline import quantize_model
        from outlierquant.plugin import folders
        from outlierquant.recipes import Recipe, load_recipe

        protect = [Path(recipe)] if isinstance(recipe, (str, os.PathLike)) and Path(recipe).is_file() else []
        if isinstance(calibration_data, (str, os.PathLike)):
            protect.append(Path(calibration_data))
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe)
        if calibration_data is None and stats is None:
            raise InputError("quantize needs calibration_data (or stats saved by `outlierquant calibrate`)")
        feeds = self.feeds(calibration_data, limit=limit) if calibration_data is not None else None
        save_dir = Path(save_dir)
        source = self.model_path.parent
        same = save_dir.exists() and source.resolve() == save_dir.resolve()
        side = None if same else source
        protect += folders.folder_inputs(side)
        result = quantize_model(
            self.model_path, save_dir / file_name, recipe, feeds, stats_path=stats, progress=progress, protect=protect,
            extra_files=folders.folder_files_hook(side, recipe),
        )
        with translated(save_dir):
            folders.copy_module_folders(side, save_dir)
        return QuantizationOutput(path=result.output, report=result.report, report_path=result.report_path)

    def validate(
        self,
        candidate: str | os.PathLike,
        data: Data,
        *,
        limit: int | None = None,
        latency_batch: int = 16,
        latency_runs: int = 10,
        kernels: bool = True,
        progress: bool | None = None,
    ) -> "ValidationReport":
        """Compare ``candidate`` against this (fp32) model on held-out ``data``."""
        from outlierquant.evaluate.validate import validate

        candidate = Path(candidate)
        if candidate.is_dir():
            candidate = candidate / "model.onnx"
        options = None
        if kernels:
            from outlierquant import custom_ops

            if custom_ops.available():
                options = custom_ops.session_options()
        with translated(candidate):
            return validate(
                self.model_path,
                candidate,
                self.feeds(data, limit=limit, purpose="evaluation"),
                latency_batch=latency_batch,
                latency_runs=latency_runs,
                candidate_session_options=options,
                progress=progress,
            )

    def analyze(
        self,
        calibration_data: Data,
        out_dir: str | os.PathLike,
        quantized: str | os.PathLike | None = None,
        *,
        data: Data | None = None,
        limit: int | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> "AnalysisReport":
        """Write the outlier report (``out_dir/index.html``); see :func:`analyze_model`.

        ``data``: held-out probe samples; ``options``: ``probe_samples``, ``threshold``,
        ``recurring_fraction``, ``sensitivity``, ``sensitivity_limit``. Needs the
        ``[report]`` extra (matplotlib).
        """
        from outlierquant.errors import require_extra

        require_extra("analyze", "report")
        from outlierquant.evaluate.report import analyze_model

        if quantized is not None and Path(quantized).is_dir():
            quantized = Path(quantized) / "model.onnx"
        probe = None
        if data is not None:
            probe = self.feeds(data, limit=options.get("probe_samples", 8), purpose="probe")
        protect = [Path(item) for item in (calibration_data, data) if isinstance(item, (str, os.PathLike))]
        feeds = self.feeds(calibration_data, limit=limit)
        with translated(self.model_path):
            return analyze_model(
                self.model_path,
                feeds,
                out_dir,
                quantized=quantized,
                eval_feeds=probe,
                progress=progress,
                protect=protect,
                **options,
            )
