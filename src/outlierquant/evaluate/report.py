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

import base64
import contextlib
import dataclasses
import datetime
import html
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from outlierquant.calibration.session import create_session
from outlierquant.emit.qdq import QuantConfig
from outlierquant.errors import InputError
from outlierquant.graph.values import is_constant
from outlierquant.progress import track

logger = logging.getLogger(__name__)

__all__ = ["AnalysisReport", "InputStats", "LayerFidelity", "Sensitivity", "analyze_model"]

#: LLM.int8()'s outlier magnitude
DEFAULT_THRESHOLD = 6.0
#: share of a width's layer inputs in which a channel must be an outlier to recur
DEFAULT_RECURRING_FRACTION = 0.25
_LINEAR_OPS = ("MatMul", "Gemm", "Conv")


@dataclasses.dataclass
class InputStats:
    """Statistics of one layer input (the activation one or more linears read)."""

    tensor: str
    consumers: list[str]
    label: str
    channels: int
    absmax: np.ndarray
    kurtosis: float = float("nan")
    #: channel -> share of probe tokens with |x| >= threshold (outlier channels only)
    outlier_token_share: dict[int, float] = dataclasses.field(default_factory=dict)

    @property
    def max(self) -> float:
        return float(self.absmax.max())

    @property
    def median(self) -> float:
        return float(np.median(self.absmax))

    @property
    def ratio(self) -> float:
        median = self.median
        return self.max / median if median > 0 else float("inf")

    def outlier_channels(self, threshold: float) -> list[int]:
        return [int(j) for j in np.flatnonzero(self.absmax >= threshold)]

    def to_dict(self, threshold: float) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "consumers": self.consumers,
            "label": self.label,
            "channels": self.channels,
            "absmax_max": self.max,
            "absmax_median": self.median,
            "max_median_ratio": self.ratio,
            "kurtosis": self.kurtosis,
            "outlier_channels": self.outlier_channels(threshold),
            "outlier_token_share": {str(k): v for k, v in sorted(self.outlier_token_share.items())},
        }


@dataclasses.dataclass
class LayerFidelity:
    node: str
    label: str
    sqnr_db: float
    aligned: bool = False
    raw_sqnr_db: float = float("nan")


@dataclasses.dataclass
class Sensitivity:
    node: str
    label: str
    cosine: float

    @property
    def loss(self) -> float:
        return 1.0 - self.cosine


@dataclasses.dataclass
class AnalysisReport:
    model: str
    inputs: list[InputStats]
    threshold: float
    recurring_fraction: float
    #: channel width -> recurring outlier channels of that width
    recurring: dict[int, list[int]]
    calibration_samples: int
    probe_samples: int
    probe_source: str
    quantized: str | None = None
    fidelity: list[LayerFidelity] = dataclasses.field(default_factory=list)
    unmatched_layers: list[str] = dataclasses.field(default_factory=list)
    sensitivity: list[Sensitivity] = dataclasses.field(default_factory=list)
    sensitivity_note: str = ""
    html_path: Path | None = None
    plots: dict[str, Path] = dataclasses.field(default_factory=dict)

    def worst_inputs(self, count: int = 10) -> list[InputStats]:
        return sorted(self.inputs, key=lambda s: (-s.ratio, s.label))[:count]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "quantized": self.quantized,
            "threshold": self.threshold,
            "recurring_fraction": self.recurring_fraction,
            "recurring_outlier_channels": {str(k): v for k, v in self.recurring.items()},
            "calibration_samples": self.calibration_samples,
            "probe_samples": self.probe_samples,
            "probe_source": self.probe_source,
            "inputs": [s.to_dict(self.threshold) for s in self.inputs],
            "fidelity": [dataclasses.asdict(f) for f in self.fidelity],
            "unmatched_layers": self.unmatched_layers,
            "sensitivity": [dataclasses.asdict(s) for s in self.sensitivity],
            "sensitivity_note": self.sensitivity_note,
            "plots": {k: p.name for k, p in self.plots.items()},
        }


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
    :class:`~outlierquant.modelio.OutputUnit`); none may replace one of the input files,
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
    layer_inputs = _layer_inputs(model)
    if not layer_inputs:
        raise InputError(f"{model_path}: no MatMul/Gemm/Conv with a constant weight to analyse")
    labels = _Labeller([node for consumers in layer_inputs.values() for node, _ in consumers])

    stats = collect_statistics(model, calibration_feeds, tensors=list(layer_inputs), progress=progress)
    inputs = [
        InputStats(
            tensor=name,
            consumers=[node for node, _ in consumers],
            label=labels.group([node for node, _ in consumers]),
            channels=stats[name].channels,
            absmax=np.asarray(stats[name].absmax, dtype=np.float64),
        )
        for name, consumers in layer_inputs.items()
        if name in stats and stats[name].channels > 1
    ]

    if eval_feeds is not None and len(eval_feeds):
        probe, probe_source = list(eval_feeds)[:probe_samples], "held-out data"
    else:
        probe, probe_source = calibration_feeds[:probe_samples], "calibration data (no held-out data given)"

    linears = [(node, output, axis) for consumers in layer_inputs.values() for node, (output, axis) in consumers]
    report = AnalysisReport(
        model=str(model_path),
        inputs=inputs,
        threshold=threshold,
        recurring_fraction=recurring_fraction,
        recurring=_recurring_channels(inputs, threshold, recurring_fraction),
        calibration_samples=len(calibration_feeds),
        probe_samples=len(probe),
        probe_source=probe_source,
        quantized=str(quantized) if quantized is not None else None,
    )

    with contextlib.ExitStack() as stack:
        reference = _Runner(model, stack)
        quant_runner = None
        fidelity_targets: list[tuple[str, str, int, str]] = []
        if quantized is not None:
            quant_model = load_model(quantized, check=False)
            quant_runner = _Runner(quant_model, stack, custom_ops=True)
            fidelity_targets, report.unmatched_layers = _match_linears(linears, quant_model)
        _probe(report, reference, quant_runner, fidelity_targets, probe, labels, progress)
        if quant_runner is not None and sensitivity:
            _sensitivity(report, model, stats, probe, reference, labels, sensitivity_limit, progress)

    from outlierquant.evaluate import plots
    from outlierquant.modelio import OutputUnit

    with OutputUnit(out_dir, primary="index.html", protect=protect) as unit:
        report.plots = plots.write_plots(report, unit.staging)
        _write_html(report, unit.staging)
        unit.path("analysis.json").write_text(
            json.dumps(_finite(report.to_dict()), indent=1, default=_json_default), encoding="utf-8"
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
    from outlierquant.modelio import check_outputs

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file; the report needs a folder")
    check_outputs([out_dir / name for name in REPORT_FILES], inputs)


# --------------------------------------------------------------------------- graph


def _layer_inputs(model) -> dict[str, list[tuple[str, tuple[str, int]]]]:
    """activation input tensor -> [(linear node name, (output tensor, output channel axis))]."""

    found: dict[str, list[tuple[str, tuple[str, int]]]] = {}
    for index, node in enumerate(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _LINEAR_OPS or len(node.inputs) < 2:
            continue
        first, second = node.inputs[0], node.inputs[1]
        if first is None or second is None or not node.outputs:
            continue
        if is_constant(second) and not is_constant(first):
            activation = first
        elif node.op_type != "Conv" and is_constant(first) and not is_constant(second):
            activation = second
        else:
            continue
        if not activation.name:
            continue
        name = node.name or f"{node.op_type}_{index}"
        axis = 1 if node.op_type == "Conv" else -1
        found.setdefault(activation.name, []).append((name, (node.outputs[0].name, axis)))
    return found


def _match_linears(linears, quant_model) -> tuple[list[tuple[str, str, int, str]], list[str]]:
    """(fp32 output, quantized output, axis, node) for each linear found in both models."""
    by_node = {n.name: n for n in quant_model.graph if n.name}
    produced = {out.name for n in quant_model.graph for out in n.outputs}
    matched, unmatched = [], []
    for node_name, output, axis in linears:
        node = by_node.get(node_name)
        if node is not None and node.outputs and node.outputs[0].name:
            matched.append((output, node.outputs[0].name, axis, node_name))
        elif output in produced:
            matched.append((output, output, axis, node_name))
        else:
            unmatched.append(node_name)
    if unmatched:
        logger.info("%d linears have no counterpart in the quantized model", len(unmatched))
    return matched, unmatched


class _Labeller:
    """Short, readable layer names: the common prefix and the op suffix stripped."""

    def __init__(self, names: Iterable[str]) -> None:
        names = list(names)
        parts = [n.strip("/").split("/") for n in names]
        common = 0
        if len(parts) > 1:
            while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
                common += 1
        self._short = {}
        for name, p in zip(names, parts):
            rest = p[common:]
            if len(rest) > 1 and rest[-1].split("_")[0] in _LINEAR_OPS:
                rest = rest[:-1]
            self._short[name] = "/".join(rest) or name

    def __call__(self, name: str) -> str:
        return self._short.get(name, name)

    def group(self, names: Sequence[str]) -> str:
        shorts = [self(n) for n in names]
        if len(shorts) == 1:
            return shorts[0]
        split = [s.split("/") for s in shorts]
        common = 0
        while all(len(p) > common + 1 for p in split) and len({p[common] for p in split}) == 1:
            common += 1
        head = "/".join(split[0][:common])
        tails = ",".join("/".join(p[common:]) for p in split)
        return f"{head}/{{{tails}}}" if head else "{" + tails + "}"


def _recurring_channels(inputs: Sequence[InputStats], threshold: float, fraction: float) -> dict[int, list[int]]:
    recurring: dict[int, list[int]] = {}
    by_width: dict[int, list[InputStats]] = {}
    for s in inputs:
        by_width.setdefault(s.channels, []).append(s)
    for width, group in sorted(by_width.items()):
        if len(group) < 2:
            continue
        hits = np.sum([s.absmax >= threshold for s in group], axis=0)
        needed = max(2, math.ceil(fraction * len(group)))
        channels = [int(j) for j in np.flatnonzero(hits >= needed)]
        if channels:
            recurring[width] = channels
    return recurring


# --------------------------------------------------------------------------- running


class _Runner:
    """One onnxruntime session over an in-memory model with extra outputs added lazily."""

    def __init__(self, model, stack: contextlib.ExitStack, *, custom_ops: bool = False) -> None:
        self.model = model
        self.stack = stack
        self.custom_ops = custom_ops
        self.outputs = [v.name for v in model.graph.outputs]
        self.session = None
        self.extra: list[str] = []

    def open(self, extra: Sequence[str]) -> None:
        import onnxruntime as ort


        self.extra = [name for name in dict.fromkeys(extra) if name not in self.outputs]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        if self.custom_ops:
            from outlierquant import custom_ops

            if custom_ops.available():
                options = custom_ops.session_options(options)
        try:
            self.session = create_session(self.model, self.extra, options, None, self.stack)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot load the model for analysis ({first})") from exc

    def run(self, feed: dict) -> dict[str, np.ndarray]:
        names = self.outputs + self.extra
        return dict(zip(names, self.session.run(names, feed)))


class _Moments:
    """Streaming raw moments of all values of a tensor, for the kurtosis."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = np.zeros(4)

    def update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64, copy=False).ravel()
        x2 = x * x
        self.n += x.size
        self.sums += (x.sum(), x2.sum(), (x2 * x).sum(), (x2 * x2).sum())

    def kurtosis(self) -> float:
        if self.n == 0:
            return float("nan")
        m1, m2, m3, m4 = self.sums / self.n
        var = m2 - m1 * m1
        if var <= 0:
            return float("nan")
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        return float(central4 / (var * var))


class _AlignedError:
    """Σy², Σ(y−ŷ)² and the per-channel sums for the affine fit ``y ≈ α ŷ + β``."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.sums: list[np.ndarray] | None = None  # n, Σŷ, Σy, Σŷ², Σŷy, Σy² per channel

    def update(self, ref: np.ndarray, cand: np.ndarray, axis: int) -> None:
        ref = np.moveaxis(ref.astype(np.float64, copy=False), axis, -1).reshape(-1, ref.shape[axis])
        cand = np.moveaxis(cand.astype(np.float64, copy=False), axis, -1).reshape(-1, cand.shape[axis])
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum((ref - cand) ** 2))
        block = [
            np.full(ref.shape[1], ref.shape[0], dtype=np.float64),
            cand.sum(0),
            ref.sum(0),
            (cand * cand).sum(0),
            (cand * ref).sum(0),
            (ref * ref).sum(0),
        ]
        self.sums = block if self.sums is None else [a + b for a, b in zip(self.sums, block)]

    def sqnr(self) -> tuple[float, float]:
        """(raw SQNR, SQNR after the per-channel affine fit) in dB."""
        from outlierquant.evaluate.metrics import sqnr_from_sums

        raw = sqnr_from_sums(self.signal, self.noise)
        n, sc, sr, scc, scr, srr = self.sums
        with np.errstate(invalid="ignore", divide="ignore"):
            var_c = scc - sc * sc / n
            cov = scr - sc * sr / n
            var_r = srr - sr * sr / n
            residual = np.where(var_c > 1e-12 * np.maximum(scc, 1e-30), var_r - cov * cov / var_c, var_r)
        aligned = sqnr_from_sums(self.signal, float(np.maximum(residual, 0.0).sum()))
        return raw, aligned


def _probe(report, reference, quant_runner, fidelity_targets, feeds, labels, progress) -> None:
    moments = {s.tensor: _Moments() for s in report.inputs}
    outlier_counts: dict[str, np.ndarray] = {}
    token_counts: dict[str, int] = {}
    reference.open(list(moments) + [ref for ref, _, _, _ in fidelity_targets])
    if quant_runner is not None:
        quant_runner.open([cand for _, cand, _, _ in fidelity_targets])
    errors = {node: _AlignedError() for _, _, _, node in fidelity_targets}
    by_tensor = {s.tensor: s for s in report.inputs}
    for feed in track(feeds, desc="probing layers", unit="sample", progress=progress):
        ref_out = reference.run(feed)
        for name, acc in moments.items():
            value = ref_out[name]
            acc.update(value)
            rows = np.abs(value.reshape(-1, value.shape[-1])) >= report.threshold
            if rows.shape[1] == by_tensor[name].channels:
                outlier_counts[name] = outlier_counts.get(name, 0) + rows.sum(0)
                token_counts[name] = token_counts.get(name, 0) + rows.shape[0]
        if quant_runner is not None:
            cand_out = quant_runner.run(feed)
            for ref_name, cand_name, axis, node in fidelity_targets:
                ref_value, cand_value = ref_out[ref_name], cand_out[cand_name]
                if ref_value.shape != cand_value.shape:
                    continue
                errors[node].update(ref_value, cand_value, axis)
        del ref_out
    for name, acc in moments.items():
        s = by_tensor[name]
        s.kurtosis = acc.kurtosis()
        if name in outlier_counts:
            share = outlier_counts[name] / max(token_counts[name], 1)
            s.outlier_token_share = {j: float(share[j]) for j in s.outlier_channels(report.threshold)}
    for _, _, _, node in fidelity_targets:
        error = errors[node]
        if error.sums is None:
            report.unmatched_layers.append(node)
            continue
        raw, aligned = error.sqnr()
        use_aligned = aligned > raw + 3.0
        report.fidelity.append(
            LayerFidelity(node, labels(node), aligned if use_aligned else raw, aligned=use_aligned, raw_sqnr_db=raw)
        )


def _sensitivity(report, model, stats, feeds, reference, labels, limit, progress) -> None:
    """Quantize one linear at a time (w8a8 static) and measure the first output's cosine."""
    import onnx_ir as ir
    import onnxruntime as ort

    from outlierquant.evaluate.metrics import cosine_rows
    from outlierquant.passes.quantize import QuantizeQDQPass

    nodes = [node for s in sorted(report.inputs, key=lambda s: -s.ratio) for node in s.consumers]
    all_linears = [node for s in report.inputs for node in s.consumers]
    if limit is not None and len(nodes) > limit:
        report.sensitivity_note = (
            f"{limit} of {len(nodes)} linears measured: those whose input has the largest max/median ratio"
        )
        nodes = nodes[:limit]
    first_output = reference.outputs[0]
    reference_outputs = [reference.run(feed)[first_output] for feed in feeds]
    proto = ir.to_proto(model)
    for node in track(nodes, desc="sensitivity", unit="layer", progress=progress):
        candidate = ir.from_proto(proto)
        _copy_external_base(model, candidate)
        config = QuantConfig(
            activations="static",
            activation_type="uint8",
            dynamic_matmuls=False,
            exclude_nodes=tuple(n for n in all_linears if n != node),
        )
        QuantizeQDQPass(config).with_stats(stats)(candidate)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        with contextlib.ExitStack() as stack:
            session = create_session(candidate, [], options, None, stack)
            cosines = [
                cosine_rows(ref, session.run([first_output], feed)[0]) for ref, feed in zip(reference_outputs, feeds)
            ]
        report.sensitivity.append(Sensitivity(node, labels(node), float(np.mean(np.concatenate(cosines)))))
    report.sensitivity.sort(key=lambda s: (s.cosine, s.label))


def _copy_external_base(source, target) -> None:
    """Point the external tensors of a proto round-trip back at the source model's folder."""
    import onnx_ir as ir

    bases = {
        v.name: v.const_value.base_dir
        for v in source.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if not bases:
        return
    for name, value in target.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and name in bases:
            tensor.base_dir = bases[name]


# --------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#1d2b3a;color:#fff;padding:22px 36px}
header h1{margin:0 0 6px;font-size:24px} header p{margin:2px 0;color:#c9d3de;font-size:14px}
main{padding:8px 36px 40px;max-width:1400px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:18px 24px;margin:18px 0}
h2{font-size:19px;margin:0 0 10px} p.note{color:#56616d;font-size:13.5px;margin:6px 0 12px;max-width:1050px}
.cards{display:flex;flex-wrap:wrap;gap:14px;margin-top:18px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 20px;min-width:190px}
.card .v{font-size:26px;font-weight:600} .card .k{font-size:12.5px;color:#56616d;text-transform:uppercase;letter-spacing:.04em}
.card.bad .v{color:#c0392b} .card.good .v{color:#1e8449}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.row{display:flex;flex-wrap:wrap;gap:18px} .row>div{flex:1 1 560px;min-width:0}
table{border-collapse:collapse;font-size:13.5px;width:100%}
th,td{padding:5px 10px;border-bottom:1px solid #e4e7eb;text-align:right;white-space:nowrap}
th{background:#f0f2f5;position:sticky;top:0} td.l,th.l{text-align:left;white-space:normal}
tr.hot td{background:#fdecea} code{font-size:12.5px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
footer{color:#7b8691;font-size:12.5px;padding:0 36px 30px}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:,.{digits}f}"


def _card(value: str, key: str, tone: str = "") -> str:
    return f'<div class="card {tone}"><div class="v">{html.escape(value)}</div><div class="k">{html.escape(key)}</div></div>'


def _write_html(report: AnalysisReport, out_dir: Path) -> Path:
    e = html.escape
    t = report.threshold
    with_outliers = [s for s in report.inputs if s.outlier_channels(t)]
    worst = report.worst_inputs(1)[0]
    recurring_total = sum(len(v) for v in report.recurring.values())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>outlierquant analysis — {e(Path(report.model).name)}</title><style>{_CSS}</style></head><body>",
        "<header><h1>Activation outlier analysis</h1>",
        f"<p>model <code style='background:#2c3e50;color:#fff'>{e(report.model)}</code></p>",
    ]
    if report.quantized:
        parts.append(f"<p>quantized <code style='background:#2c3e50;color:#fff'>{e(report.quantized)}</code></p>")
    parts.append(
        f"<p>{report.calibration_samples} calibration samples · {report.probe_samples} probe samples from "
        f"{e(report.probe_source)} · outlier threshold |x| ≥ {t:g} (LLM.int8())</p></header><main>"
    )
    cards = [
        _card(str(len(report.inputs)), "layer inputs analysed"),
        _card(f"{len(with_outliers)}", f"inputs with |x| ≥ {t:g}", "bad" if with_outliers else "good"),
        _card(str(recurring_total), "recurring outlier channels", "bad" if recurring_total else "good"),
        _card(f"{_num(worst.ratio)}×", "worst max / median"),
    ]
    if report.fidelity:
        lowest = min(report.fidelity, key=lambda f: f.sqnr_db)
        cards.append(_card(f"{_num(lowest.sqnr_db)} dB", "lowest layer SQNR", "bad" if lowest.sqnr_db < 20 else ""))
    if report.sensitivity:
        cards.append(_card(f"{report.sensitivity[0].cosine:.4f}", "cos, most sensitive layer"))
    parts.append(f"<div class='cards'>{''.join(cards)}</div>")

    recurring_text = "; ".join(
        f"width {w}: channel{'s' if len(ch) > 1 else ''} {', '.join(map(str, ch))}" for w, ch in report.recurring.items()
    ) or "none"
    parts.append("<section><h2>Per-channel abs-max, every layer input</h2>")
    parts.append(
        "<p class='note'>Each row is the activation a linear layer reads (Q, K and V sharing one input are one row), "
        "each column a channel; the colour is max |x| over the calibration data on a log scale. "
        f"Recurring outlier channels (|x| ≥ {t:g} in at least {report.recurring_fraction:.0%} of the inputs of "
        f"that width) are marked with red triangles: <b>{e(recurring_text)}</b>.</p>"
    )
    for key in [k for k in report.plots if k.startswith("heatmap")]:  # most rows first
        parts.append(_img(report.plots[key], "channel abs-max heatmap"))
    parts.append("</section>")

    parts.append("<section><h2>How far the worst channel sits above the rest</h2><div class='row'>")
    parts.append(
        "<div><p class='note'>max / median of the per-channel abs-max. A per-tensor int8 scale spends its 255 "
        "levels on the largest channel: at a ratio of 100 a typical channel gets about 2–3 of them.</p>"
        f"{_img(report.plots['ratio'], 'max/median ratio')}</div>"
    )
    parts.append(
        "<div><p class='note'>Kurtosis of all values of the input on the probe samples (3 for a Gaussian, "
        "dashed line). Heavy tails mean a few huge values set the range.</p>"
        f"{_img(report.plots['kurtosis'], 'kurtosis')}</div></div></section>"
    )

    parts.append("<section><h2>Worst layer inputs</h2><table><tr><th class='l'>layer input</th><th>channels</th>"
                 "<th>max |x|</th><th>median</th><th>max/median</th><th>kurtosis</th>"
                 f"<th class='l'>channels ≥ {t:g} (share of probe tokens)</th></tr>")
    for s in report.worst_inputs(12):
        outliers = s.outlier_channels(t)
        shown = ", ".join(
            f"{j}" + (f" ({s.outlier_token_share[j]:.0%})" if j in s.outlier_token_share else "") for j in outliers[:8]
        )
        if len(outliers) > 8:
            shown += f", … {len(outliers) - 8} more"
        parts.append(
            f"<tr class='{'hot' if outliers else ''}'><td class='l'>{e(s.label)}</td><td>{s.channels}</td>"
            f"<td>{_num(s.max, 2)}</td><td>{_num(s.median, 3)}</td><td>{_num(s.ratio)}</td>"
            f"<td>{_num(s.kurtosis)}</td><td class='l'>{e(shown) or '–'}</td></tr>"
        )
    parts.append("</table></section>")

    if report.quantized:
        parts.append("<section><h2>Quantized model: per-layer SQNR of the linear outputs</h2>")
        parts.append(
            "<p class='note'>10·log10(Σy² / Σ(y−ŷ)²) of each linear's output against fp32 on the probe samples "
            "(higher is better; 20 dB ≈ 10% relative error). Hatched bars: the layer's output channels were "
            "rescaled by an equivalence rewrite, compared after a per-channel affine fit.</p>"
        )
        if "sqnr" in report.plots:
            parts.append(_img(report.plots["sqnr"], "per-layer SQNR"))
        if report.unmatched_layers:
            parts.append(
                f"<p class='note'>{len(report.unmatched_layers)} linears have no counterpart in the quantized "
                f"model: {e(', '.join(report.unmatched_layers[:6]))}{' …' if len(report.unmatched_layers) > 6 else ''}</p>"
            )
        parts.append("</section>")
        if report.sensitivity:
            parts.append("<section><h2>Sensitivity ranking: one layer quantized at a time (w8a8)</h2>")
            parts.append(
                "<p class='note'>The fp32 model with only this linear quantized (int8 per-channel weights, uint8 "
                "per-tensor static activations); 1 − cosine of the model output against fp32. The layers at the "
                f"top are where an outlier method pays off. {e(report.sensitivity_note)}</p>"
            )
            parts.append("<div class='row'><div>" + _img(report.plots["sensitivity"], "sensitivity ranking") + "</div>")
            parts.append("<div><table><tr><th>#</th><th class='l'>layer</th><th>cosine</th><th>1 − cos</th></tr>")
            for rank, s in enumerate(report.sensitivity[:15], 1):
                parts.append(
                    f"<tr><td>{rank}</td><td class='l'>{e(s.label)}</td><td>{s.cosine:.5f}</td>"
                    f"<td>{s.loss:.2e}</td></tr>"
                )
            parts.append("</table></div></div></section>")

    from outlierquant import __version__

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(
        f"</main><footer>outlierquant {e(__version__)} · {stamp} · numbers in <code>analysis.json</code> "
        "beside this page</footer></body></html>"
    )
    path = out_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _finite(value: Any) -> Any:
    """Strict JSON: NaN and ±inf become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
