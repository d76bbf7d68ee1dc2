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
import functools
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import is_excluded, linear_label, replace_linear, splittable
from outlierquant.numerics.slabs import slabs
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


class _SortedValues:
    """A weight's values sorted, in their own float32, with the float64 answers the k-means
    needs: prefix sums, first index at or above a float64 threshold, linear quantiles.

    Bounded memory: a float64 sorted copy and its float64 prefix sums were 4x the weight
    (1 GiB beside a 65536 x 512 LM head). Here only the float32 sort is held, with the
    prefix sum at every :data:`BLOCK`-th index; a prefix inside a block is the block's sum
    continued by ``np.cumsum`` with the carry added into the block's first value, which is
    the sequential float64 sum ``np.cumsum`` of the whole widened array computes, bit for bit.
    """

    BLOCK = 2**16

    def __init__(self, weight: np.ndarray) -> None:
        self.values = np.sort(np.asarray(weight, dtype=np.float32).reshape(-1))
        self.size = int(self.values.size)
        self._carries = [0.0]  # prefix sum before each block
        for start in range(0, self.size, self.BLOCK):
            self._carries.append(float(self._running(start, min(start + self.BLOCK, self.size))[-1]))

    def _running(self, start: int, stop: int) -> np.ndarray:
        """The prefix sums after each of ``values[start:stop]`` (``start`` on a block edge)."""
        chunk = self.values[start:stop].astype(np.float64)
        chunk[0] += self._carries[start // self.BLOCK]
        return np.cumsum(chunk)

    def prefix(self, index: int) -> float:
        """The float64 sum of the ``index`` smallest values, as ``np.cumsum`` adds them."""
        block, within = divmod(index, self.BLOCK)
        if within == 0:
            return self._carries[block]
        return float(self._running(block * self.BLOCK, index)[-1])

    def count_below(self, threshold: float) -> int:
        """How many values are ``< threshold`` compared in float64 (``searchsorted`` left on
        the widened array): for a float32 ``v``, ``v >= threshold`` exactly when ``v`` is at
        least the smallest float32 that is ``>= threshold``."""
        edge = np.float32(threshold)
        if float(edge) < threshold:
            edge = np.nextafter(edge, np.float32(np.inf))
        return int(np.searchsorted(self.values, edge, "left"))

    def quantiles(self, qs) -> np.ndarray:
        """``np.quantile(values.astype(float64), qs)`` (method ``linear``) from the neighbours
        of each virtual index only: numpy's own index, gamma and lerp arithmetic."""
        virtual = (self.size - 1) * np.asarray(qs, dtype=np.float64)
        previous = np.floor(virtual)
        gamma = virtual - previous
        low = np.minimum(previous.astype(np.intp), self.size - 1)
        high = np.minimum(low + 1, self.size - 1)
        a = self.values[low].astype(np.float64)
        b = self.values[high].astype(np.float64)
        diff = b - a
        result = a + diff * gamma
        upper = gamma >= 0.5
        result[upper] = (b - diff * (1 - gamma))[upper]
        return result


def _kmeans_1d_boundaries(values: _SortedValues, iterations: int) -> tuple[float, float]:
    """Two boundaries splitting the values into three 1-D k-means clusters (Lloyd)."""
    centroids = values.quantiles([1 / 6, 1 / 2, 5 / 6])
    lower = upper = 0.0
    for _ in range(iterations):
        lower, upper = (centroids[0] + centroids[1]) / 2, (centroids[1] + centroids[2]) / 2
        cuts = [0, values.count_below(lower), values.count_below(upper), values.size]
        updated = centroids.copy()
        for c in range(3):
            count = cuts[c + 1] - cuts[c]
            if count:
                updated[c] = (values.prefix(cuts[c + 1]) - values.prefix(cuts[c])) / count
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = updated
    return float(lower), float(upper)


def split_boundaries(values: _SortedValues, options: SplitQuantOptions) -> tuple[float, float]:
    """The two value boundaries of the three clusters: lower is ``w < lower``, upper ``w >= upper``."""
    if options.method == "kmeans":
        return _kmeans_1d_boundaries(values, options.iterations)
    # the float32 quantiles of the weight (they read only its order statistics)
    lower, upper = (float(q) for q in np.quantile(values.values, options.quantiles))
    return lower, upper


def cluster_part(weight: np.ndarray, bounds: tuple[float, float], cluster: int) -> np.ndarray:
    """Cluster ``cluster`` (0 lower, 1 middle, 2 upper) of ``weight``: its values, zeros elsewhere."""
    lower, upper = bounds
    weight = np.asarray(weight, dtype=np.float32)
    part = np.empty(weight.shape, dtype=np.float32)
    # a slab of rows at a time: the masks and the selection of a whole LM head were three
    # more copies of it at once
    for rows in slabs(weight.shape[0], int(np.prod(weight.shape[1:], dtype=np.int64))):
        block = weight[rows]
        low = block < lower
        up = block >= upper
        mask = (low, ~(low | up), up)[cluster]
        part[rows] = np.where(mask, block, np.float32(0))
    return part


def split_weight_clusters(weight: np.ndarray, options: SplitQuantOptions) -> tuple[list[np.ndarray], tuple[float, float]]:
    """``W`` as three arrays (lower, middle, upper cluster; zeros elsewhere) that sum to ``W``."""
    bounds = split_boundaries(_SortedValues(weight), options)
    return [cluster_part(weight, bounds, c) for c in range(3)], bounds


def _cluster_record(values: np.ndarray, bounds: tuple[float, float]) -> dict[str, Any]:
    """The report's cluster sizes (nonzero values) and middle range, from the sorted values."""
    # the masks compare float32 weights with the bounds rounded to float32 (numpy's weak scalars)
    cut_low = int(np.searchsorted(values, np.float32(bounds[0]), "left"))
    cut_up = int(np.searchsorted(values, np.float32(bounds[1]), "left"))
    zeros = (int(np.searchsorted(values, np.float32(0), "left")), int(np.searchsorted(values, np.float32(0), "right")))
    ranges = [(0, cut_low), (cut_low, max(cut_low, cut_up)), (max(cut_low, cut_up), values.size)]
    sizes = [(b - a) - max(0, min(b, zeros[1]) - max(a, zeros[0])) for a, b in ranges]
    absmax = float(max(abs(values[0]), abs(values[-1]))) if values.size else 0.0
    middle = ranges[1]
    middle_max = max(abs(values[middle[0]]), abs(values[middle[1] - 1])) if middle[1] > middle[0] else np.float32(0)
    return {"cluster_sizes": sizes, "middle_range_ratio": float(np.float32(middle_max) / (absmax or 1.0))}


def _part_tensor(read, bounds: tuple[float, float], cluster: int) -> ir.Tensor:
    return ir.tensor(cluster_part(read(), bounds, cluster))


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
            shape = ir.Shape(weight.shape)
            values = _SortedValues(weight)
            del weight
            bounds = split_boundaries(values, options)
            record = _cluster_record(values.values, bounds)
            del values
            label = linear_label(linear, "splitquant")
            # Each part is computed from the weight when read (the quantizer reads it once
            # and stores int8): three float copies of every weight held from here to the
            # quantize pass were 3x the model (an LM head's alone 384 MiB on a 65k vocabulary).
            parts = [ir.LazyTensor(functools.partial(_part_tensor, linear.weight_array, bounds, cluster),
                                   dtype=ir.DataType.FLOAT, shape=shape)
                     for cluster in range(3)]

            def build(tape: ir.tape.Tape, x: ir.Value, parts=parts, label=label) -> ir.Value:
                outputs = [
                    tape.op("MatMul", [x, tape.initializer(part, name=f"{label}_{cluster}_weight")])
                    for cluster, part in zip(("lower", "middle", "upper"), parts)
                ]
                return tape.op("Add", [tape.op("Add", [outputs[0], outputs[1]]), outputs[2]])

            replace_linear(graph, linear, build, label)
            layers.append({"linear": linear.name, "boundaries": list(bounds), **record})
        logger.info("splitquant: %d linears split into 3, %d skipped", len(layers), len(skipped))
        return bool(layers), {"options": dataclasses.asdict(options), "layers": layers, "skipped": skipped}
