"""Outlier diagnostics: what the activations of every linear layer look like, in one page.

For each *layer input* — the activation read by a MatMul/Gemm/Conv with a constant
weight; Q, K and V reading one norm output are one input — the report shows:

- the per-channel abs-max ``a_j = max |X_j|`` over the calibration data, as a heatmap
  (layers × channels, log colour scale), one per channel width;
- the **outlier channels** of the LLM.int8() paper (Dettmers et al. 2022, "LLM.int8():
  8-bit Matrix Multiplication for Transformers at Scale"): a feature is an outlier where
  its magnitude reaches 6. The paper calls it systematic when it recurs in at least 25%
  of the layers; here a channel is *recurring* when ``a_j >= threshold`` in at least
  ``recurring_fraction`` of the inputs of its width (at least two). The share of tokens
  over the threshold (the paper's third criterion, >= 6% of sequence positions) is
  measured on the probe samples and listed beside each channel;
- ``max_j a_j / median_j a_j``: how far the worst channel sits above a typical one — the
  range a per-tensor int8 scale must cover, in units of the typical channel's range;
- the Pearson kurtosis ``E[(x-μ)^4] / E[(x-μ)^2]^2`` of all values of the input (3 for a
  Gaussian; heavy-tailed, outlier-ridden activations reach the hundreds), streamed over a
  few probe samples.

With a quantized model as well, on the probe samples:

- per-layer **SQNR** ``10·log10(Σ y² / Σ (y − ŷ)²)`` of every linear's output ``ŷ`` in the
  quantized model against the fp32 output ``y``, matching layers by node name, then by
  output name, then — for a linear a pass rewrote into several nodes, as the passes'
  records in the quantization report beside the model (``OUT.report.json``) say — through
  the nodes that read its output, which keep their names; what stays unmatched is listed
  with the reason. The SQNR is cumulative: a layer inherits the error of those before it,
  so the advice counts only what a layer loses itself. An equivalence rewrite may have folded a per-channel scale or shift into
  a layer (SmoothQuant's ``1/s`` into V, OS+'s shift into a bias), so its output lives in
  a rescaled basis; the SQNR is then taken after the per-channel least-squares affine
  fit ``y ≈ α_j ŷ_j + β_j`` and the layer is flagged "aligned". A rotation of the
  residual stream is not per-channel and shows as a low SQNR: read those layers through
  the sensitivity ranking;
- the **sensitivity ranking**: the fp32 model with *one* linear quantized at a time by
  the ``w8a8`` machinery (:class:`~outlierquant.passes.quantize.QuantizeQDQPass`: int8
  per-channel weights, uint8 per-tensor static activations, every other node excluded),
  ranked by ``1 − cos`` of the model's first output against fp32. This is plain w8a8,
  not the quantized model's recipe, and the page says so;
- the **end-to-end result** on the probe samples
  (:func:`~outlierquant.evaluate.validate.validate`): sentence-embedding cosine for an
  encoder, perplexity and its delta for a causal LM, else the primary output's cosine;
- **advice**: which layers to keep in float (the recipe's ``exclude``) and which recipe to
  try next, by the few stated rules of :data:`~outlierquant.evaluate.report_data.ADVICE_RULES`.

Probe samples are the held-out feeds when given, else the first calibration feeds (the
page says which). Everything is written to ``out_dir``: ``index.html`` (plots inlined as
base64, so the one file is the report), the PNGs beside it, and ``analysis.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from outlierquant.errors import InputError
from outlierquant.evaluate.probes import (
    Labeller,
    Runner,
    layer_inputs,
    match_linears,
    probe_fidelity,
    probe_sensitivity,
    recurring_channels,
    rewritten_linears,
    upstream_linears,
)
from outlierquant.evaluate.report_data import (
    DEFAULT_RECURRING_FRACTION,
    DEFAULT_THRESHOLD,
    AnalysisReport,
    InputStats,
    derive_advice,
    finite_for_json,
    json_default,
)
from outlierquant.evaluate.report_html import write_html
from outlierquant.outputs import OutputUnit, check_outputs

logger = logging.getLogger(__name__)

__all__ = ["analyze_model", "check_report_folder"]


# --------------------------------------------------------------------------- entry point


def analyze_model(
    model_path: str | os.PathLike,
    calibration_feeds: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    quantized: str | os.PathLike | None = None,
    eval_feeds: Sequence[dict] | None = None,
    probe_samples: int = 8,
    threshold: float = DEFAULT_THRESHOLD,
    recurring_fraction: float = DEFAULT_RECURRING_FRACTION,
    sensitivity: bool = True,
    sensitivity_limit: int | None = 48,
    progress: bool | None = None,
    protect: Sequence[str | os.PathLike] = (),
    sensitivity_recipe: str | os.PathLike | None = None,
) -> AnalysisReport:
    """Analyse ``model_path`` on ``calibration_feeds`` and write the report into ``out_dir``.

    ``quantized``: a quantized version of the model, compared layer by layer.
    ``eval_feeds``: held-out probe samples (default: the first calibration feeds).
    ``sensitivity``: with ``quantized``, also rank layers by the cost of quantizing each
    alone; at most ``sensitivity_limit`` layers, those with the largest input
    max/median ratio first (``None``: all). Each layer is quantized with the ``quantize``
    pass settings of ``sensitivity_recipe`` (a built-in name or a YAML file; default: the
    recipe named in the quantized model's report, when it is a built-in one), or plain
    w8a8 where the recipe has no ``quantize`` pass (the report says which).

    The report's files appear in ``out_dir`` together, once everything is computed (an
    :class:`~outlierquant.outputs.OutputUnit`); none may replace one of the input files,
    the models or those in ``protect``.
    """
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.modelio import load_model
    from outlierquant.passes.canonicalize import CanonicalizePass

    model_path = Path(model_path)
    calibration_feeds = list(calibration_feeds)
    if not calibration_feeds:
        raise InputError("analyze: the calibration data gives no samples")
    if probe_samples < 1:
        raise InputError(f"probe_samples must be >= 1, got {probe_samples}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise InputError(f"threshold must be a finite number > 0, got {threshold}")
    if not 0 < recurring_fraction <= 1:
        raise InputError(f"recurring_fraction must be in (0, 1], got {recurring_fraction}")
    from outlierquant.modelio import model_files

    out_dir = Path(out_dir)
    protect = [*protect, *model_files(model_path), *(model_files(quantized) if quantized is not None else [])]
    check_report_folder(out_dir, protect)

    model = load_model(model_path)
    CanonicalizePass()(model)  # exact; the rewrites see this form too
    inputs_by_tensor = layer_inputs(model)
    if not inputs_by_tensor:
        raise InputError(f"{model_path}: no MatMul/Gemm/Conv with a constant weight to analyse")
    labels = Labeller([node for consumers in inputs_by_tensor.values() for node, _ in consumers])

    stats = collect_statistics(model, calibration_feeds, tensors=list(inputs_by_tensor), progress=progress)
    inputs = [
        InputStats(
            tensor=name,
            consumers=[node for node, _ in consumers],
            label=labels.group([node for node, _ in consumers]),
            channels=stats[name].channels,
            absmax=np.asarray(stats[name].absmax, dtype=np.float64),
        )
        for name, consumers in inputs_by_tensor.items()
        if name in stats and stats[name].channels > 1
    ]

    if eval_feeds is not None and len(eval_feeds):
        probe, probe_source = list(eval_feeds)[:probe_samples], "held-out data"
    else:
        probe, probe_source = calibration_feeds[:probe_samples], "calibration data (no held-out data given)"

    linears = [(node, output, axis) for consumers in inputs_by_tensor.values() for node, (output, axis) in consumers]
    report = AnalysisReport(
        model=str(model_path),
        inputs=inputs,
        threshold=threshold,
        recurring_fraction=recurring_fraction,
        recurring=recurring_channels(inputs, threshold, recurring_fraction),
        calibration_samples=len(calibration_feeds),
        probe_samples=len(probe),
        probe_source=probe_source,
        quantized=str(quantized) if quantized is not None else None,
    )

    with contextlib.ExitStack() as stack:
        reference = Runner(model, stack)
        quant_runner = None
        fidelity_targets: list[tuple[str, str, int, str]] = []
        if quantized is not None:
            quant_model = load_model(quantized, check=False)
            quant_runner = Runner(quant_model, stack, custom_ops=True)
            records, report.recipe = quantization_records(quantized)
            report.rewritten = rewritten_linears(records, [node for node, _, _ in linears])
            fidelity_targets, report.unmatched_layers, report.unmatched_reasons = match_linears(
                linears, quant_model, model, report.rewritten
            )
        probe_fidelity(report, reference, quant_runner, fidelity_targets, probe, labels, progress)
        if quant_runner is not None and sensitivity:
            config, report.sensitivity_method = sensitivity_config(sensitivity_recipe or report.recipe)
            probe_sensitivity(report, model, stats, probe, reference, labels, sensitivity_limit, progress, config)
    if quantized is not None:
        report.end_to_end = end_to_end_summary(model_path, quantized, probe, progress)
    if report.fidelity:
        try:
            report.upstream = upstream_linears(model, [node for node, _, _ in linears])
        except RecursionError:  # a graph too deep to walk: every low SQNR counts as the layer's own
            report.upstream = {}
    report.advice = derive_advice(report)

    from outlierquant.evaluate import plots

    with OutputUnit(out_dir, primary="index.html", protect=protect) as unit:
        report.plots = plots.write_plots(report, unit.staging)
        write_html(report, unit.staging)
        unit.path("analysis.json").write_text(
            json.dumps(finite_for_json(report.to_dict()), indent=1, default=json_default), encoding="utf-8"
        )
    report.plots = {key: out_dir / path.name for key, path in report.plots.items()}
    report.html_path = out_dir / "index.html"
    logger.info("analysis report written to %s", report.html_path)
    return report


def quantization_records(quantized: str | os.PathLike) -> tuple[list[dict], str | None]:
    """The pass records and recipe name of the report ``quantize`` wrote beside ``quantized``.

    ``OUT.onnx`` → ``OUT.report.json``; a folder → its ``model.report.json`` (or the one
    ``<stem>.report.json`` beside its model file). No report, or one that is not valid
    JSON: no records (the layers are then matched by name only).
    """
    path = Path(quantized)
    if path.is_dir():
        candidates = [path / "model.report.json", *sorted(path.glob("*.report.json"))]
    else:
        candidates = [path.with_name(path.stem + ".report.json"), path.with_name("model.report.json")]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("%s: not read (%s)", candidate, exc)
            continue
        if not isinstance(data, dict):
            continue
        recipe = data.get("recipe")
        name = recipe.get("name") if isinstance(recipe, dict) else recipe if isinstance(recipe, str) else None
        passes = data.get("passes")
        return (passes if isinstance(passes, list) else []), name
    return [], None


def sensitivity_config(recipe: str | os.PathLike | None):
    """(QuantConfig or None for plain w8a8, how the ranking quantizes) for ``recipe``.

    The recipe's last ``quantize`` pass gives the settings; its rewrites (smoothing,
    rotations) are not applied, and QuantEase rounding (which needs covariances) becomes
    round-to-nearest. A recipe by name that is not built in, or one without a ``quantize``
    pass, falls back to plain w8a8 and says why.
    """
    import dataclasses

    from outlierquant.errors import RecipeError
    from outlierquant.recipes import builtin_recipes, load_recipe, spec_options

    plain = "plain w8a8 (int8 per-channel weights, uint8 per-tensor static activations)"
    if recipe is None:
        return None, plain
    if not (Path(str(recipe)).suffix in (".yaml", ".yml") or str(recipe) in builtin_recipes()):
        return None, f"{plain}: the recipe {str(recipe)!r} is not a built-in one (pass it as a YAML file)"
    try:
        loaded = load_recipe(recipe)
    except RecipeError as exc:
        return None, f"{plain}: the recipe could not be read ({exc})"
    specs = [spec for spec in loaded.passes if spec.name == "quantize"]
    if not specs:
        others = ", ".join(spec.name for spec in loaded.passes if spec.name != "canonicalize")
        return None, f"{plain}: the recipe {loaded.name!r} has no quantize pass ({others})"
    config = spec_options(specs[-1])
    note = ""
    if getattr(config, "weight_rounding", "rtn") != "rtn":
        config = dataclasses.replace(config, weight_rounding="rtn")
        note = ", round-to-nearest weights instead of its QuantEase rounding"
    return config, (f"the quantize settings of the recipe {loaded.name!r} (activations {config.activations}, "
                    f"{config.weight_bits}-bit weights{note}), without its rewrites")


def end_to_end_summary(model_path, quantized, probe, progress) -> dict | None:
    """The model-level result on the probe samples, by :func:`~outlierquant.evaluate.validate.validate`:
    sentence-embedding cosine (mean, min) for an encoder, perplexity and its delta for a
    causal LM, else the primary output's cosine. None (with a warning) when it cannot run."""
    from outlierquant.errors import OutlierQuantError
    from outlierquant.evaluate.validate import validate

    try:
        result = validate(model_path, quantized, probe, latency_runs=0, progress=False)
    except (OutlierQuantError, ValueError, RuntimeError) as exc:
        logger.warning("end-to-end comparison skipped: %s", exc)
        return None
    summary: dict = {"task": result.task, "samples": result.samples, "primary_output": result.primary_output}
    primary = next((o for o in result.outputs if o.name == result.primary_output), None)
    if result.embedding is not None:
        summary.update(metric="sentence-embedding cosine", cosine_metric="sentence-embedding cosine", cosine_mean=result.embedding.cosine_mean,
                       cosine_min=result.embedding.cosine_min, spearman=result.embedding.spearman)
    elif primary is not None:
        summary.update(metric=f"cosine of {primary.name}", cosine_metric=f"cosine of {primary.name}", cosine_mean=primary.cosine_mean,
                       cosine_min=primary.cosine_min)
    if result.perplexity is not None:
        summary.update(metric="perplexity", perplexity_reference=result.perplexity.reference,
                       perplexity_candidate=result.perplexity.candidate, perplexity_delta=result.perplexity.delta,
                       tokens=result.perplexity.tokens)
    return summary


#: the files every report has (heatmaps are named after the widths found)
REPORT_FILES = ("index.html", "analysis.json", "ratio.png", "kurtosis.png", "sqnr.png", "sensitivity.png")


def check_report_folder(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> None:
    """Before any work: ``out_dir`` is (or can become) a folder, and no report file is an input."""
    from outlierquant.errors import OutputError

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file; the report needs a folder")
    check_outputs([out_dir / name for name in REPORT_FILES], inputs)


# --------------------------------------------------------------------------- graph


# --------------------------------------------------------------------------- running


# --------------------------------------------------------------------------- HTML


