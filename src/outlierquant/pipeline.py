"""The quantization pipeline: load -> (calibrate -> pass)* -> save, with a report.

Statistics are collected on the model *as it stands* when a pass asks for them: a
smoothing pass changes the activations the quantizer later sees, so stats gathered
before it would be wrong. Consecutive passes that do not modify the model share one
calibration when it covers the tensors each of them reads (a pass that calibrates only
its own groups leaves the next one to collect again). The input model is never
modified; the output, its external data and its report are written into a private folder
and renamed into place together, so a failure leaves no half-written file.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats, stats_files
from outlierquant.errors import CalibrationError, InputError, translated
from outlierquant.graph.sizes import size_breakdown
from outlierquant.modelio import (check_finite_weights, load_model, model_file_bytes, model_files,
                                  release_freed_memory)
from outlierquant.outputs import OutputUnit, check_outputs, write_model
from outlierquant.recipes import Recipe, instantiate, load_recipe

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantizeResult:
    output: Path
    report_path: Path
    report: dict[str, Any]


def report_path_for(output: Path) -> Path:
    return output.with_name(output.stem + ".report.json")


def _covers(stats: ActivationStats | None, targets, covariance_for) -> bool:
    """Whether ``stats`` has every target tensor (and the requested covariances)."""
    if stats is None:
        return False
    for target in targets:
        if (target if isinstance(target, str) else target.tensor) not in stats:
            return False
    return all(name in stats and stats[name].covariance is not None for name in covariance_for)


def _target_name(target) -> str:
    return target if isinstance(target, str) else target.tensor


def _missing(targets, covariance_for, kept: dict) -> list:
    """The targets ``kept`` lacks, or holds without a covariance this pass reads."""
    want_cov = set(covariance_for)
    return [t for t in targets if _target_name(t) not in kept
            or (_target_name(t) in want_cov and kept[_target_name(t)].covariance is None)]


def _later_targets(recipe: Recipe, index: int, model: ir.Model, kept: dict, wanted: list) -> list:
    """The tensors the later passes of ``recipe`` that read statistics name on ``model`` as it
    is now, that neither ``kept`` nor ``wanted`` holds: collected in the same run over the
    data (fetching a tensor costs far less than running the model again). A later pass whose
    targets cannot be named on this model is left to collect its own."""
    have = set(kept) | {_target_name(t) for t in wanted}
    extra = []
    for spec in recipe.passes[index + 1:]:
        try:
            later = instantiate(spec)
            if "stats" not in later.reads():
                continue
            targets = later.calibration_targets(model)
        except Exception as exc:  # noqa: BLE001 - a look-ahead only; the pass itself reports the error
            logger.debug("pass %s: no look-ahead calibration targets (%s)", spec.name, exc)
            continue
        for target in targets:
            if _target_name(target) not in have:
                have.add(_target_name(target))
                extra.append(target)
    return extra


def run_recipe(
    model: ir.Model,
    recipe: Recipe,
    feeds: Sequence[dict] | None,
    *,
    stats: ActivationStats | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Apply ``recipe`` to ``model`` in place; returns one record per pass.

    ``progress`` shows the pass-level display (:class:`~outlierquant.progress.PassProgress`:
    pass i/N, its name, elapsed time, ETA) and the calibration bars; with INFO logging
    (``-v``) each pass is followed by its detail (modified, seconds, calibration, summary).
    """
    from outlierquant.calibration.collect import collect_statistics
    from outlierquant.progress import PassProgress

    records: list[dict[str, Any]] = []
    stale = stats is None
    display = PassProgress(len(recipe.passes), progress=progress)
    verbose = logger.isEnabledFor(logging.INFO)
    for index, spec in enumerate(recipe.passes):
        display.start(index, spec.name)
        # a saved statistics file describes the input model: valid until a pass modifies it
        pass_ = instantiate(spec)
        started = time.perf_counter()
        calibration_seconds = 0.0
        if "stats" in pass_.reads():
            targets = pass_.calibration_targets(model)
            covariance_for = pass_.covariance_targets(model)
            covered = _covers(stats, targets, covariance_for)
            if not stale and not covered and not feeds:
                logger.warning("pass %s: the statistics lack some of the tensors it reads and no calibration "
                               "data was given; the layers without statistics are left as they are", spec.name)
            if stale or (feeds and not covered):
                # statistics still valid (collected before passes that changed nothing, or
                # carried through an equivalence rewrite) are kept; only the tensors they lack
                # are collected, with those the later passes will read on this model, so a
                # pass that changes nothing leaves the next one nothing to collect
                if not feeds:
                    raise CalibrationError(f"pass {spec.name!r} needs calibration data and none was given")
                if targets:
                    t0 = time.perf_counter()
                    kept = {} if stale or stats is None else dict(stats.tensors)
                    wanted = _missing(targets, covariance_for, kept)
                    wanted += _later_targets(recipe, index, model, kept, wanted)
                    fresh = collect_statistics(
                        model,
                        feeds,
                        tensors=wanted,
                        covariance_for=[name for name in covariance_for if name not in kept
                                        or kept[name].covariance is None],
                        progress=progress,
                    )
                    stats = ActivationStats(tensors={**kept, **fresh.tensors}, meta=fresh.meta)
                    calibration_seconds = time.perf_counter() - t0
                    stale = False
                else:  # nothing this pass could rewrite: it records why, with empty statistics
                    stats = ActivationStats(tensors={}, meta={"tensors": 0})
                    stale = True
            pass_.with_stats(stats)
        if "feeds" in pass_.reads():
            if not feeds:
                raise CalibrationError(f"pass {spec.name!r} runs the calibration data through the model itself "
                                       "(statistics alone are not enough) and none was given")
            pass_.with_feeds(feeds)
        result = pass_(model)
        # A rewritten graph's dropped nodes and values reference each other (onnx-ir keeps
        # uses and producers), so the weights they held wait for the cycle collector, which
        # counts objects, not bytes: collect now, or a replaced LM head lingers for passes;
        # then the freed heap goes back to the system, or the next pass starts at this peak
        gc.collect()
        release_freed_memory()
        record = dict(getattr(result, "record", {}) or {"pass": spec.name})
        record["modified"] = bool(result.modified)
        record["seconds"] = round(time.perf_counter() - started, 3)
        if calibration_seconds:
            record["calibration_seconds"] = round(calibration_seconds, 3)
        records.append(record)
        if result.modified and not pass_.preserves_statistics:
            carry = pass_.carried_statistics() if pass_.claims_equivalence else None
            if carry is None or stale or stats is None:
                stale = True
            else:
                stats = carry.apply(stats)
                record["statistics_carried"] = stats.meta["carried"]
        detail = pass_detail(record)
        if display.enabled:
            display.end(detail if verbose else ())
        else:
            logger.info("pass %s: %s", spec.name, "; ".join(detail))
    display.done()
    return records


def pass_detail(record: dict[str, Any]) -> list[str]:
    """What ``-v`` shows after a pass: modified, time (calibration), its summary lines."""
    head = f"{'modified' if record.get('modified') else 'unchanged'} in {record.get('seconds', 0):.1f}s"
    if record.get("calibration_seconds"):
        head += f" (calibration {record['calibration_seconds']:.1f}s)"
    if record.get("simulated"):
        head += ", simulated"
    return [head, *[str(line) for line in record.get("summary", [])]]


def quantize_model(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    recipe: str | Recipe,
    calibration_feeds: Iterable[dict] | None,
    *,
    stats_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    protect: Iterable[str | os.PathLike] = (),
    extra_files: Callable[[dict[str, Any], Callable[[str], Path]], None] | None = None,
    int8_weights: str | None = None,
) -> QuantizeResult:
    """Quantize ``model_path`` with ``recipe`` into ``output_path`` (+ ``.report.json``).

    The model, its external data (if any) and the report appear together or not at all
    (:class:`~outlierquant.outputs.OutputUnit`). None of them may be an input file: the
    model, its external data, the statistics, nor anything listed in ``protect`` (the
    calibration data, the recipe file); that is checked before any work.

    ``extra_files(report, staged)``: writes more files into the same unit (``staged(name)``
    is where to write the file that becomes ``output_path.parent / name``) and may add to
    the report before it is written; the plugin's output folders use it for the config,
    tokenizer and ``ort_config.json``.

    ``int8_weights``: ``auto``, ``signed`` or ``unsigned`` storage of int8 weight codes
    (:mod:`outlierquant.numerics.int8`; ``None``: ``OUTLIERQUANT_INT8_WEIGHTS``, else ``auto``).
    """
    from outlierquant.numerics.int8 import describe_encoding, encoding_set

    model_path = Path(model_path)
    output_path = Path(output_path)
    if output_path.suffix != ".onnx":
        raise InputError(f"{output_path}: the output must be an .onnx file")
    data_path = output_path.with_name(output_path.name + ".data")
    report_path = report_path_for(output_path)
    inputs = [*model_files(model_path), *protect]
    if stats_path:
        inputs += stats_files(stats_path)
    check_outputs([output_path, data_path, report_path], inputs)
    if isinstance(recipe, str):
        recipe = load_recipe(recipe)
    feeds = list(calibration_feeds) if calibration_feeds is not None else None
    if feeds is not None and not feeds:
        raise CalibrationError("calibration data is empty")
    stats = ActivationStats.load(stats_path) if stats_path else None

    started = time.perf_counter()
    model = load_model(model_path)
    with translated(model_path), encoding_set(int8_weights):
        check_finite_weights(model, model_path)
        records = run_recipe(model, recipe, feeds, stats=stats, progress=progress)
        encoding = describe_encoding()

    import onnxruntime

    from outlierquant import __version__

    with OutputUnit(output_path.parent, primary=output_path.name, protect=inputs) as unit:
        write_model(model, unit, output_path.name)
        seconds = time.perf_counter() - started
        report = {
            "outlierquant_version": __version__,
            "onnxruntime_version": onnxruntime.__version__,
            "model": str(model_path),
            "output": str(output_path),
            "recipe": recipe.to_dict(),
            "calibration_samples": len(feeds) if feeds is not None else 0,
            "passes": records,
            "simulated": any(r.get("simulated") for r in records),
            "float_channels": float_channel_summary(records),
            # how int8 weight codes are stored, and why (signed ones saturate on x86 without VNNI)
            "int8_weights": encoding,
            "seconds": round(seconds, 3),
            "size_bytes": {"input": model_file_bytes(model_path),
                           "output": unit.staged_bytes(output_path, data_path)},
            # the output's weights by part (linears, lm_head, embeddings, side paths, ...)
            "size_parts": size_breakdown(model),
        }
        if extra_files is not None:
            extra_files(report, unit.path)
        unit.path(report_path).write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
    return QuantizeResult(output_path, report_path, report)


def float_channel_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The input channels left in float by the split passes, over the linears they rewrote.

    LLM.int8()'s split reports its float channels and the input channels it saw
    (``float_channels`` / ``input_channels``); a pass that adds float side paths to linears
    another pass already counted (a split rotation) reports ``side_path_float_channels``.
    ``None`` when no pass splits channels.
    """
    total = floating = side = 0
    for record in records:
        if "input_channels" in record:
            total += int(record["input_channels"])
            floating += int(record.get("float_channels", 0))
        side += int(record.get("side_path_float_channels", 0))
    if not total:
        return None
    return {"float": floating + side, "of_inputs": total, "share": (floating + side) / total,
            "in_rotation_side_paths": side}


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
