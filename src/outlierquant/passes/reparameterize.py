"""Scale reparameterization (RepQuant, DopQ-ViT): per-channel activation parameters folded
into the norm and the next weights, so one layer-wise scale quantizes the tensor.

**Scale reparameterization** (RepQuant, Li et al. 2024, "RepQuant: Towards Accurate
Post-Training Quantization of Large Transformer Models via Scale Reparameterization";
DopQ-ViT 2024, "DopQ-ViT: Towards Distribution-Friendly and Outlier-Aware Post-Training
Quantization for Vision Transformers"): calibrate per-channel asymmetric parameters
``(d_j, z_j)`` of a post-norm activation, then fold them into the norm and the next
weights so a single layer-wise scale quantizes it. With the target scale
``d̃ = median_j d_j`` (DopQ-ViT: the median is robust to outlier channels) and
``r_j = d_j / d̃``, ``c_j`` the center of channel ``j``'s range::

    γ ← γ / r,  β ← (β − c) / r,     W ← diag(r) · W,  b ← b + c @ W

:class:`ReparameterizeScalesPass` is a float rewrite (it claims equivalence); where the
norm cannot absorb it (a post-norm output that also feeds the residual) it inserts
``Sub``/``Mul`` only when ``insert_ops`` allows it, else it skips the group.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.graph.edit import (
    transform_group_channels,
)
from outlierquant.graph.records import LinearGroup
from outlierquant.numerics.estimates import max_median_ratio
from outlierquant.options import check_fields
from outlierquant.passes.base import GroupRewritePass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReparameterizeOptions:
    """Options of :class:`ReparameterizeScalesPass`.

    ``target``: the layer-wise scale the channel scales are mapped onto (``median``,
    DopQ-ViT; ``mean`` as RepQuant's plain choice). ``shift``: also move each channel's
    center into β and the next bias. ``insert_ops``: allow explicit ``Sub``/``Mul``
    where the producer cannot absorb the reparameterization.
    """

    target: Literal["median", "mean"] = "median"
    shift: bool = True
    insert_ops: bool = False
    relations: tuple[str, ...] = ("norm",)
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)


class ReparameterizeScalesPass(GroupRewritePass):
    """Channel-wise → layer-wise activation scale reparameterization (RepQuant, DopQ-ViT)."""

    name = "reparameterize"
    needs_stats = True
    claims_equivalence = True
    options_type = ReparameterizeOptions
    one_to_one_channels = True

    def allow_insert(self) -> bool:
        return self.options.insert_ops


    def rewrite_group(self, graph: ir.Graph, group: LinearGroup, st, entry: dict[str, Any]) -> int | None:
        options = self.options
        lo, hi = np.minimum(st.minimum, 0.0), np.maximum(st.maximum, 0.0)
        center = (st.minimum + st.maximum) / 2.0 if options.shift else np.zeros(group.in_features)
        producer = group.producer
        producer_takes_shift = not producer.foldable or (
            producer.kind == "norm" and producer.norm.beta is not None) or (
            producer.kind == "linear" and producer.linear.bias is not None)
        can_shift = options.shift and producer_takes_shift and all(l.bias is not None for l in group.linears)
        if options.shift and not can_shift:
            entry["shift_skipped"] = ("a linear of the group has no bias to absorb the shift" if producer_takes_shift
                                      else f"the producer ({producer.describe()}) has no bias or β to absorb it")
            center = np.zeros(group.in_features)
        width = st.maximum - st.minimum if options.shift and can_shift else hi - lo
        channel_scale = np.maximum(width, 1e-8) / 255.0
        target = np.median(channel_scale) if options.target == "median" else np.mean(channel_scale)
        r = channel_scale / target
        inserted = transform_group_channels(graph, group, r, center if can_shift else None)
        entry.update(target_scale=float(target), max_median_before=max_median_ratio(channel_scale),
                     shifted=bool(can_shift))
        return inserted
