"""Outlier Suppression+: channel-wise shifting and scaling, migrated into the neighbours.

Wei et al. 2023, "Outlier Suppression+: Accurate quantization of large language models by
equivalent and effective shifting and scaling". Outlier channels are often *asymmetric*
(a channel living in [3, 9]); scaling alone cannot center them. For a group of linears
``y_i = x @ W_i + b_i`` and per channel ``z_j = (max_j + min_j) / 2`` and ``s_j > 0``::

    y_i = ((x − z) / s) @ (diag(s) · W_i) + (b_i + z @ W_i)

``(x − z) / s`` is folded into the producer (LayerNorm ``β ← (β − z) / s``,
``γ ← γ / s``; a producing linear: its output columns and bias ``(b₀ − z) / s``), the
shift's effect into every consumer's bias, ``diag(s)`` into the consumer weights. The
shift needs a bias on both sides; a group whose producer or consumers have none is
scaled only (recorded), and a group without a foldable producer gets explicit
``Sub``/``Mul`` ops only when ``insert_ops`` allows it.

Scaling: ``s_j = max(1, max|x_j − z_j| / t)`` — channels above the threshold ``t`` are
squeezed to it, the rest untouched. OS+ searches ``t`` to minimise the quantized layer's
output error; here the candidates are quantiles of the shifted per-channel abs-max and
the error is the statistics-only estimate of SmoothQuant's α search
(:func:`outlierquant.numerics.estimates.estimated_output_error`) on the shifted statistics.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ChannelStats
from outlierquant.graph.edit import (
    group_weight_rows,
    transform_group_channels,
)
from outlierquant.graph.records import LinearGroup
from outlierquant.numerics.estimates import estimated_output_error, max_median_ratio
from outlierquant.options import check_fields
from outlierquant.passes.base import GroupRewritePass

logger = logging.getLogger(__name__)

__all__ = ["OutlierSuppressionOptions", "ShiftScaleOutliersPass", "shifted_stats"]


@dataclasses.dataclass(frozen=True)
class OutlierSuppressionOptions:
    """Options of :class:`ShiftScaleOutliersPass`.

    ``scale``: also search the OS+ scaling threshold (else shift only). ``quantiles``:
    candidate thresholds as quantiles of the shifted channel abs-max (1.0 = no scaling).
    ``insert_ops``: allow explicit ``Sub``/``Mul`` where no producer can absorb them.
    """

    scale: bool = True
    quantiles: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 1.0)
    insert_ops: bool = False
    relations: tuple[str, ...] = ("norm", "linear")
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.quantiles or any(not 0.0 < q <= 1.0 for q in self.quantiles):
            raise ValueError("quantiles: a non-empty list of numbers in (0, 1]")


def shifted_stats(st: ChannelStats, shift: np.ndarray) -> ChannelStats:
    """The statistics of ``x − shift`` (exact for min/max/mean/mean-square)."""
    minimum, maximum = st.minimum - shift, st.maximum - shift
    return dataclasses.replace(
        st,
        minimum=minimum,
        maximum=maximum,
        absmax=np.maximum(np.abs(minimum), np.abs(maximum)),
        mean=st.mean - shift,
        mean_sq=np.maximum(st.mean_sq - 2.0 * shift * st.mean + shift**2, 0.0),
        covariance=None,
    )


class ShiftScaleOutliersPass(GroupRewritePass):
    """Outlier Suppression+ shift (into biases / β) and threshold scaling (module docstring)."""

    name = "os+"
    needs_stats = True
    claims_equivalence = True
    options_type = OutlierSuppressionOptions
    one_to_one_channels = True

    def allow_insert(self) -> bool:
        return self.options.insert_ops


    def rewrite_group(self, graph: ir.Graph, group: LinearGroup, st, entry: dict[str, Any]) -> int | None:
        options = self.options
        producer = group.producer
        consumers_have_bias = all(l.bias is not None for l in group.linears)
        if producer.foldable:
            producer_has_bias = (producer.kind == "norm" and producer.norm.beta is not None) or (
                producer.kind == "linear" and producer.linear.bias is not None)
        else:
            producer_has_bias = True  # an inserted Sub carries the shift
        can_shift = consumers_have_bias and producer_has_bias
        shift = (st.minimum + st.maximum) / 2.0 if can_shift else np.zeros(group.in_features)
        if not can_shift:
            entry["shift_skipped"] = "no bias to absorb the shift (consumer or producer)"
        shifted = shifted_stats(st, shift)
        weights = group_weight_rows(group)
        s = np.ones(group.in_features)
        if options.scale:
            best = (estimated_output_error(shifted, weights, s), 1.0, s)
            for quantile in options.quantiles:
                threshold = float(np.quantile(shifted.absmax, quantile))
                if threshold <= 0:
                    continue
                candidate = np.maximum(1.0, shifted.absmax / threshold)
                err = estimated_output_error(shifted, weights, candidate)
                if err < best[0]:
                    best = (err, quantile, candidate)
            _, entry["threshold_quantile"], s = best
        if not can_shift and np.all(s == 1.0):
            entry["skipped"] = "nothing to do: no shift possible and scaling does not reduce the error"
            return None
        inserted = transform_group_channels(graph, group, s, shift if can_shift else None)
        entry["folded_into"] = producer.describe() if producer.foldable else "inserted Sub/Mul"
        entry.update(shifted=bool(can_shift), max_median_before=max_median_ratio(st.absmax),
                     max_median_after=max_median_ratio(shifted.absmax / s))
        return inserted
