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
  quantized model against the fp32 output ``y``, matching layers by node name (then by
  output name). An equivalence rewrite may have folded a per-channel scale or shift into
  a layer (SmoothQuant's ``1/s`` into V, OS+'s shift into a bias), so its output lives in
  a rescaled basis; the SQNR is then taken after the per-channel least-squares affine
  fit ``y ≈ α_j ŷ_j + β_j`` and the layer is flagged "aligned". A rotation of the
  residual stream is not per-channel and shows as a low SQNR: read those layers through
  the sensitivity ranking;
- the **sensitivity ranking**: the fp32 model with *one* linear quantized at a time by
  the ``w8a8`` machinery (:class:`~outlierquant.passes.quantize.QuantizeQDQPass`: int8
  per-channel weights, uint8 per-tensor static activations, every other node excluded),
  ranked by ``1 − cos`` of the model's first output against fp32.

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
)
from outlierquant.evaluate.report_data import (
    DEFAULT_RECURRING_FRACTION,
    DEFAULT_THRESHOLD,
    AnalysisReport,
    InputStats,
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
) -> AnalysisReport:
    """Analyse ``model_path`` on ``calibration_feeds`` and write the report into ``out_dir``.

    ``quantized``: a quantized version of the model, compared layer by layer.
    ``eval_feeds``: held-out probe samples (default: the first calibration feeds).
    ``sensitivity``: with ``quantized``, also rank layers by the cost of quantizing each
    alone; at most ``sensitivity_limit`` layers, those with the largest input
    max/median ratio first (``None``: all).

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
            fidelity_targets, report.unmatched_layers = match_linears(linears, quant_model)
        probe_fidelity(report, reference, quant_runner, fidelity_targets, probe, labels, progress)
        if quant_runner is not None and sensitivity:
            probe_sensitivity(report, model, stats, probe, reference, labels, sensitivity_limit, progress)

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


