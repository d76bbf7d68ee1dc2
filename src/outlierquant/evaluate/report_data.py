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
