"""QuaRot R2: a per-head rotation between the value and out projections, folded into both.

**R2 — values to out-projection** (:class:`RotateHeadsPass`). ``probs_h @ (V_h H) =
(probs_h @ V_h) H`` for a rotation ``H`` that acts inside each head, so a per-head
Hadamard folds into the V projection's columns and the O projection's rows
(``W_o ← (I ⊗ H)ᵀ W_o``), GQA included: O's input channel ``j`` carries the V channel
``channel_map[j]`` given by the analysis.

Every rotation pass claims equivalence and is tested for it (fp32 outputs before/after
agree to 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.attention import group_head_dim
from outlierquant.graph.edit import write_bias, write_linear_weight
from outlierquant.graph.shapes import propagate_ranks
from outlierquant.numerics.estimates import _profile_entry
from outlierquant.numerics.grids import as_f64
from outlierquant.numerics.hadamard import hadamard_block, hadamard_rotation
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RotateHeadsOptions:
    """Options of :class:`RotateHeadsPass`: ``seed`` for the random signs (0: plain Hadamard)."""

    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer")


class RotateHeadsPass(OutlierPass):
    """R2: a Hadamard inside every attention head, folded into V's columns and O's rows."""

    name = "rotate-heads"
    claims_equivalence = True
    options_type = RotateHeadsOptions

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:

        analysis = analyze_graph(model)
        graph = model.graph
        ranks = propagate_ranks(graph, list(graph))
        rotated, skipped = [], []
        for group in analysis.groups:
            producer = group.producer
            if producer.relation != "v_to_o":
                continue
            label = group.linears[0].name
            if not producer.foldable:
                skipped.append({"group": label, "skipped": producer.reason})
                continue
            head_dim = group_head_dim(group, ranks)
            if head_dim is None:
                skipped.append({"group": label, "skipped": "head size not found on the V → O path"})
                continue
            v = producer.linear
            channel_map = producer.channel_map
            if channel_map is None:
                channel_map = np.arange(group.in_features)
            if np.any(channel_map % head_dim != np.arange(len(channel_map)) % head_dim):
                skipped.append({"group": label, "skipped": "V → O channel map does not keep head offsets"})
                continue
            rng = np.random.default_rng(self.options.seed) if self.options.seed else None
            h = hadamard_rotation(head_dim, hadamard_block(head_dim, rng))
            if rng is not None:
                h = rng.choice([-1.0, 1.0], size=head_dim)[:, None] * h
            v_heads = v.out_features // head_dim
            v_rotation = np.kron(np.eye(v_heads), h)
            write_linear_weight(graph, v, as_f64(v.weight_array()) @ v_rotation, f"{v.name}_weight_rotated")
            if v.bias is not None:
                write_bias(graph, v, as_f64(v.bias_array()).reshape(-1) @ v_rotation, f"{v.name}_bias_rotated")
            # O's row j carries V channel channel_map[j]: block by head of O's input
            o_rotation = np.kron(np.eye(group.in_features // head_dim), h)
            for linear in group.linears:
                write_linear_weight(graph, linear, o_rotation.T @ as_f64(linear.weight_array()),
                              f"{linear.name}_weight_rotated")
            rotated.append({"group": label, "v": v.name, "head_dim": head_dim,
                            **_profile_entry(self.stats.get(group.input.name) if self.stats else None)})
        record = {"rotated": rotated, "skipped": skipped, "inserted_ops": 0}
        logger.info("rotate-heads: %d V → O pairs rotated, %d skipped", len(rotated), len(skipped))
        return bool(rotated), record
