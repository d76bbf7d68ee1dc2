"""The analysis report's data: per-input outlier statistics, per-layer fidelity, the
sensitivity ranking, and the JSON form written beside the HTML page (``analysis.json``)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

#: LLM.int8()'s outlier magnitude
DEFAULT_THRESHOLD = 6.0


#: share of a width's layer inputs in which a channel must be an outlier to recur
DEFAULT_RECURRING_FRACTION = 0.25


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
    #: unmatched node -> why it has no counterpart
    unmatched_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    #: node -> the passes of the quantized model's report that rewrote it
    rewritten: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: the recipe named in the quantized model's report (None: no report beside it)
    recipe: str | None = None
    #: how the sensitivity ranking quantizes each layer
    sensitivity_method: str = "plain w8a8 (int8 per-channel weights, uint8 per-tensor static activations)"
    #: model-level fidelity on the probe samples (see :func:`end_to_end_summary`)
    end_to_end: dict[str, Any] | None = None
    advice: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: linear -> the nearest linears upstream of it in the fp32 graph (its SQNR inherits their error)
    upstream: dict[str, list[str]] = dataclasses.field(default_factory=dict)
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
            "sensitivity_method": self.sensitivity_method,
            "unmatched_reasons": self.unmatched_reasons,
            "rewritten": self.rewritten,
            "recipe": self.recipe,
            "end_to_end": self.end_to_end,
            "advice": self.advice,
            "plots": {k: p.name for k, p in self.plots.items()},
        }


# --------------------------------------------------------------------------- advice

#: a layer whose output SQNR is below this is a candidate to keep in float (20 dB ≈ 10% error)
ADVICE_SQNR_DB = 20.0
#: ... and at least this many dB below the lowest SQNR of the linears upstream of it
#: (the SQNR in the quantized model is cumulative: a layer after a bad one inherits its error)
ADVICE_OWN_LOSS_DB = 3.0
#: ... or whose one-layer loss 1 − cos is this many times the median loss (and above ADVICE_MIN_LOSS)
ADVICE_LOSS_FACTOR = 4.0
ADVICE_MIN_LOSS = 1e-4
#: a recurring outlier channel worth an outlier method: abs-max at least this × its input's median
ADVICE_OUTLIER_FACTOR = 3.0
#: activations are the problem when an input's max/median ratio or kurtosis passes these
ADVICE_ACTIVATION_RATIO = 100.0
ADVICE_ACTIVATION_KURTOSIS = 100.0
#: at most this many layers in one "keep in float" advice
ADVICE_MAX_LAYERS = 6
#: end-to-end results this good need no change
GOOD_COSINE = 0.99
GOOD_PPL_DELTA = 0.05  # relative

#: the stated rules, in the order they are checked (shown on the page and in analysis.json)
ADVICE_RULES = (
    f"keep-float: a linear whose output SQNR in the quantized model is < {ADVICE_SQNR_DB:g} dB and "
    f"≥ {ADVICE_OWN_LOSS_DB:g} dB below the lowest SQNR of the linears upstream of it (its own loss, not an "
    "inherited one), or whose "
    f"one-layer sensitivity loss (1 − cos) is ≥ {ADVICE_LOSS_FACTOR:g}× the median loss and ≥ {ADVICE_MIN_LOSS:g}, "
    f"is listed for the recipe's exclude option (worst first, at most {ADVICE_MAX_LAYERS})",
    f"outlier-method: a recurring outlier channel whose abs-max is ≥ {ADVICE_OUTLIER_FACTOR:g}× the median channel "
    "of its input → a recipe that keeps outlier channels in float (llm-int8, or default which includes it), "
    "unless the recipe is one of those and the end-to-end target is met",
    f"weight-only: an input with max/median ≥ {ADVICE_ACTIVATION_RATIO:g} or kurtosis ≥ {ADVICE_ACTIVATION_KURTOSIS:g} "
    "while the end-to-end result misses its target → the activations are the problem: a weight-only recipe "
    "(rtn-w4a16, quantease-w4a16) leaves them in float",
    f"done: end-to-end cosine ≥ {GOOD_COSINE:g} (or perplexity within {GOOD_PPL_DELTA:.0%}) and no layer to keep in "
    "float → the quantized model is ready as it is",
)

_OUTLIER_RECIPES = ("llm-int8", "default")
_WEIGHT_ONLY_RECIPES = ("rtn-w4a16", "quantease-w4a16")


def end_to_end_ok(summary: dict[str, Any] | None) -> bool | None:
    """Whether the model-level result meets its target (None: not measured)."""
    if not summary:
        return None
    if summary.get("perplexity_delta") is not None and summary.get("perplexity_reference"):
        return summary["perplexity_delta"] <= GOOD_PPL_DELTA * summary["perplexity_reference"]
    cosine = summary.get("cosine_mean")
    return None if cosine is None else cosine >= GOOD_COSINE


def derive_advice(report: "AnalysisReport") -> list[dict[str, Any]]:
    """Concrete next steps from the measurements, by the rules in :data:`ADVICE_RULES`.

    Each item: ``rule``, ``text`` (one line), and where it applies ``layers`` (node names,
    worst first), ``exclude`` (the recipe option to set) or ``recipes`` (to try next).
    """
    advice: list[dict[str, Any]] = []
    ok = end_to_end_ok(report.end_to_end)

    # keep-float: low SQNR or an outsized share of the sensitivity loss
    scores: dict[str, tuple[float, str]] = {}
    measured = {f.node: f.sqnr_db for f in report.fidelity if math.isfinite(f.sqnr_db)}
    for f in report.fidelity:
        if not (math.isfinite(f.sqnr_db) and f.sqnr_db < ADVICE_SQNR_DB):
            continue
        inherited = [measured[n] for n in report.upstream.get(f.node, []) if n in measured]
        if inherited and f.sqnr_db > min(inherited) - ADVICE_OWN_LOSS_DB:
            continue  # its error is mostly inherited from the layers before it
        scores[f.node] = (f.sqnr_db, f"SQNR {f.sqnr_db:.1f} dB" + (
            f", {min(inherited) - f.sqnr_db:.1f} dB below its inputs' layers" if inherited else ""))
    if report.sensitivity:
        median = float(np.median([s.loss for s in report.sensitivity]))
        for s in report.sensitivity:
            if s.loss >= ADVICE_MIN_LOSS and s.loss >= ADVICE_LOSS_FACTOR * max(median, 0.0):
                why = f"1 − cos {s.loss:.1e} alone ({s.loss / median:.0f}× the median)" if median > 0 else \
                    f"1 − cos {s.loss:.1e} alone"
                previous = scores.get(s.node)
                # rank by SQNR where measured, sensitive-only layers after the low-SQNR ones
                scores[s.node] = (previous[0], previous[1] + "; " + why) if previous else (ADVICE_SQNR_DB + s.cosine, why)
    if scores:
        worst = sorted(scores, key=lambda n: (scores[n][0], n))[:ADVICE_MAX_LAYERS]
        labels = {f.node: f.label for f in report.fidelity} | {s.node: s.label for s in report.sensitivity}
        advice.append({
            "rule": "keep-float",
            "layers": worst,
            "exclude": worst,
            "reasons": {n: scores[n][1] for n in worst},
            "text": "keep in float: exclude: [" + ", ".join(worst) + "]  (" +
                    "; ".join(f"{labels.get(n, n)}: {scores[n][1]}" for n in worst) + ")",
        })

    # outlier-method: recurring channels far above the median channel
    hits: list[tuple[float, str, int]] = []
    for s in report.inputs:
        recurring = set(report.recurring.get(s.channels, []))
        median = s.median
        for j in s.outlier_channels(report.threshold):
            if j in recurring and median > 0 and s.absmax[j] >= ADVICE_OUTLIER_FACTOR * median:
                hits.append((float(s.absmax[j] / median), s.label, j))
    if hits and not (ok and report.recipe in _OUTLIER_RECIPES):
        hits.sort(reverse=True)
        channels = sorted({j for _, _, j in hits})
        recipes = [r for r in _OUTLIER_RECIPES if r != report.recipe]
        used = report.recipe in _OUTLIER_RECIPES
        text = (
            f"recurring outlier channels {', '.join(map(str, channels[:8]))} reach up to {hits[0][0]:.0f}× the median "
            f"channel ({hits[0][1]}): "
        )
        text += (f"the recipe {report.recipe!r} already keeps such channels in float; if the result is short, try "
                 f"{' or '.join(recipes)} with a lower ratio" if used else
                 f"try recipe {' or '.join(recipes)} (outlier channels kept in float)")
        advice.append({"rule": "outlier-method", "recipes": recipes, "channels": channels, "text": text})

    # weight-only: the activations themselves are the trouble
    heavy = [s for s in report.inputs if s.ratio >= ADVICE_ACTIVATION_RATIO or
             (math.isfinite(s.kurtosis) and s.kurtosis >= ADVICE_ACTIVATION_KURTOSIS)]
    if heavy and ok is False:
        heavy.sort(key=lambda s: -s.ratio)
        advice.append({
            "rule": "weight-only",
            "recipes": list(_WEIGHT_ONLY_RECIPES),
            "layers": [node for s in heavy[:ADVICE_MAX_LAYERS] for node in s.consumers],
            "text": f"{len(heavy)} layer inputs are heavy-tailed (worst {heavy[0].label}: max/median "
                    f"{heavy[0].ratio:.0f}, kurtosis {heavy[0].kurtosis:.0f}) and the end-to-end result misses its "
                    f"target: a weight-only recipe ({', '.join(_WEIGHT_ONLY_RECIPES)}) leaves activations in float",
        })

    if ok and not scores:
        advice.append({"rule": "done", "text": "the quantized model meets the end-to-end target and no layer stands "
                                               "out: nothing to change"})
    if not advice:
        advice.append({"rule": "none", "text": "no rule applies to these measurements" + (
            "" if report.quantized else "; pass --quantized for layer SQNR, sensitivity and the end-to-end result")})
    return advice


def finite_for_json(value: Any) -> Any:
    """Strict JSON: NaN and ±inf become null."""
    if isinstance(value, dict):
        return {k: finite_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_for_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
