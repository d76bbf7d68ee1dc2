"""SplitQuant: a layer split into three by weight-value clusters, each part quantized alone.

**SplitQuant** — Song & Lin 2025, "SplitQuant: Layer Splitting for Low-Bit Neural
Network Quantization". The weight values of a layer are clustered into three groups
(lower / middle / upper, 1-D k-means on the values, or fixed quantile thresholds) and the
layer becomes three layers reading the same input::

    y = x @ W = x @ (W ⊙ M_low) + x @ (W ⊙ M_mid) + x @ (W ⊙ M_up)

with ``M_*`` disjoint 0/1 masks covering ``W``. Each part is quantized with its own
per-output-channel scale, so the many small middle values get a fine grid that the few
extreme ones no longer dictate. The float split is exact up to float summation order;
the bias stays on the sum.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import is_excluded, linear_label, replace_linear, splittable
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SplitQuantOptions:
    """Options of :class:`SplitQuantPass`.

    ``method``: ``kmeans`` (1-D k-means with three clusters on the layer's weight values)
    or ``quantile`` (fixed thresholds at the ``quantiles`` of the values).
    ``iterations``: Lloyd iterations of the k-means. ``exclude``: substrings of node names
    left untouched. ``min_in_features``: smaller layers are not split.
    """

    method: Literal["kmeans", "quantile"] = "kmeans"
    quantiles: tuple[float, float] = (0.05, 0.95)
    iterations: int = 30
    exclude: tuple[str, ...] = ()
    min_in_features: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.quantiles) != 2 or not 0.0 < self.quantiles[0] < self.quantiles[1] < 1.0:
            raise ValueError(f"quantiles={self.quantiles}: two increasing numbers in (0, 1)")
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations}: must be >= 1")


def _kmeans_1d_boundaries(values: np.ndarray, iterations: int) -> tuple[float, float]:
    """Two boundaries splitting ``values`` into three 1-D k-means clusters (Lloyd)."""
    values = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    centroids = np.quantile(values, [1 / 6, 1 / 2, 5 / 6])
    lower = upper = 0.0
    for _ in range(iterations):
        lower, upper = (centroids[0] + centroids[1]) / 2, (centroids[1] + centroids[2]) / 2
        cuts = [0, int(np.searchsorted(values, lower, "left")), int(np.searchsorted(values, upper, "left")),
                values.size]
        updated = centroids.copy()
        for c in range(3):
            count = cuts[c + 1] - cuts[c]
            if count:
                updated[c] = (prefix[cuts[c + 1]] - prefix[cuts[c]]) / count
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = updated
    return float(lower), float(upper)


def split_weight_clusters(weight: np.ndarray, options: SplitQuantOptions) -> tuple[list[np.ndarray], tuple[float, float]]:
    """``W`` as three arrays (lower, middle, upper cluster; zeros elsewhere) that sum to ``W``."""
    if options.method == "kmeans":
        lower, upper = _kmeans_1d_boundaries(weight, options.iterations)
    else:
        lower, upper = (float(q) for q in np.quantile(weight, options.quantiles))
    low = weight < lower
    up = weight >= upper
    mid = ~(low | up)
    parts = [np.where(mask, weight, np.float32(0)).astype(weight.dtype) for mask in (low, mid, up)]
    return parts, (lower, upper)


class SplitQuantPass(OutlierPass):
    """SplitQuant: each linear becomes three equivalent linears over weight-value clusters."""

    name = "splitquant"
    needs_stats = False
    claims_equivalence = True
    options_type = SplitQuantOptions

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        options = self.options
        graph = model.graph
        layers: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for linear in analyze_graph(model).linears:
            reason = splittable(linear)
            if reason is None and is_excluded(linear, options.exclude):
                reason = "excluded by option"
            if reason is None and linear.in_features < options.min_in_features:
                reason = f"in_features {linear.in_features} < min_in_features"
            if reason:
                skipped.append({"linear": linear.name, "reason": reason})
                logger.info("splitquant: skip %s: %s", linear.name, reason)
                continue
            weight = np.asarray(linear.weight_array(), dtype=np.float32)
            parts, (lower, upper) = split_weight_clusters(weight, options)
            label = linear_label(linear, "splitquant")

            def build(tape: ir.tape.Tape, x: ir.Value, parts=parts, label=label) -> ir.Value:
                outputs = [
                    tape.op("MatMul", [x, tape.initializer(ir.tensor(np.ascontiguousarray(part)),
                                                           name=f"{label}_{cluster}_weight")])
                    for cluster, part in zip(("lower", "middle", "upper"), parts)
                ]
                return tape.op("Add", [tape.op("Add", [outputs[0], outputs[1]]), outputs[2]])

            replace_linear(graph, linear, build, label)
            absmax = float(np.abs(weight).max()) or 1.0
            layers.append({
                "linear": linear.name,
                "boundaries": [lower, upper],
                "cluster_sizes": [int(np.count_nonzero(p)) for p in parts],
                "middle_range_ratio": float(np.abs(parts[1]).max() / absmax),
            })
        logger.info("splitquant: %d linears split into 3, %d skipped", len(layers), len(skipped))
        return bool(layers), {"options": dataclasses.asdict(options), "layers": layers, "skipped": skipped}
