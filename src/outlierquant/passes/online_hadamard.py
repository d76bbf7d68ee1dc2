"""QuaRot R4: an online Hadamard in front of linears with no foldable producer.

**R4 — online Hadamard** (:class:`OnlineHadamardPass`). A linear whose input has no
producer a rotation folds into — the FFN down projection after ``SiLU(gate) ⊙ up`` or
GELU, the linears after a post-norm LayerNorm whose output also feeds the residual —
gets an explicit rotation ``x ← x H`` inserted in front of it and ``W ← Hᵀ W`` folded into
its weight. The inserted op costs run time and is listed in the record: the
``ai.outlierquant::HadamardTransform`` kernel when it is available and the option
``kernels`` is ``auto`` (or ``custom``), otherwise the Kronecker form with standard ops
(two small constant MatMuls, ``p×p`` and ``q×q``, ``d = p·q``), written with the
constant on the *left* of both MatMuls so that the quantizer never mistakes the rotation
for a linear layer and quantizes its (outlier-heavy) input.

*Outlier split before the rotation* (``outlier_ratio``; LLM.int8()'s decomposition, Dettmers
et al. 2022, in front of R4). A Hadamard spreads one huge channel over every channel of
its token, so a token that carries a massive activation stretches the *per-tensor* range
of the whole rotated tensor. With the input channels ``O`` whose calibrated ``max |x_j|``
reaches ``outlier_ratio`` × the group's median channel max taken out first::

    x W = ((x ⊙ m) H)(Hᵀ W_I) + Gather(x, O) W_O

(``m`` the 0/1 mask of the other channels, ``W_I`` = ``W`` with the rows of ``O`` zeroed,
``W_O`` = those rows): the mask is the rotation's prescale, and the thin float side path
is tagged :data:`~outlierquant.graph.tags.KEEP_FLOAT_KEY` so no quantizer touches it.
On SmolLM2's down projections this takes the static per-tensor int8 output error of
the inlier part 10-20× below the unrotated one (and below per-token int8 without the
rotation).

*Gate* (``rotate_below_db``). The rotation costs run time, and per-channel activation
scales already serve an input whose outlier channels are the same from token to token.
A group is rotated only when the estimated SQNR of its output under static int8 with
the best such scales (:func:`~outlierquant.numerics.estimates.estimated_static_sqnr_db`, from
the calibration statistics) is below the threshold. Measured: 23-30 dB on 28 of
SmolLM2's 30 down projections (rare spikes that move from channel to channel), 31.9-39.9
dB on MiniLM's FFN2.

*Smoothing before the rotation* (MambaQuant's smooth-fused rotation): ``smooth_alpha`` applies SmoothQuant-style scales
``s = max|x|^α`` before an online rotation (``x ← (x / s) H``, ``W ← Hᵀ diag(s) W``),
folded into the inserted op's constant, so the rotation starts from equalized channels.

Every rotation pass claims equivalence and is tested for it (fp32 outputs before/after
agree to 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from outlierquant.emit.kernels import use_kernel
from outlierquant.emit.mixed_int8 import add_float_side_path, without_channels
from outlierquant.emit.rotation import hadamard_kernel_node, hadamard_left_form
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import write_linear_weight
from outlierquant.graph.records import LinearGroup
from outlierquant.graph.tags import KEEP_FLOAT_KEY, ROTATED_NORM_KEY
from outlierquant.graph.values import add_initializer, first_in_graph
from outlierquant.numerics.estimates import _profile_entry, estimated_static_sqnr_db
from outlierquant.numerics.grids import as_f64
from outlierquant.numerics.hadamard import hadamard_block, hadamard_rotation
from outlierquant.numerics.outliers import select_outlier_channels
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnlineHadamardOptions:
    """Options of :class:`OnlineHadamardPass`.

    ``groups``: ``unfoldable`` — every linear group a rotation cannot fold into its
    producer (after an activation, ``act(gate) ⊙ up``, post-norm norms); ``all`` — also
    the groups behind a foldable norm (for models where R1 is not applied);
    ``activation`` — only the groups behind a nonlinearity (the FFN down projection),
    not those behind a post-norm LayerNorm.
    ``kernels``: ``auto`` (the custom kernel when available, else standard ops),
    ``standard`` or ``custom`` (error when unavailable).
    ``smooth_alpha``: smooth-fused rotation (MambaQuant): ``x ← (x / s) H`` with
    ``s = max|x|^α`` (needs statistics); ``None`` for a plain Hadamard.
    ``min_features``: groups narrower than this are left alone.
    ``outlier_ratio``: take the input channels whose calibrated max |x_j| reaches this
    multiple of the group's median channel max out of the rotation, into a float side
    path (needs statistics); ``None``: rotate every channel.
    ``rotate_below_db``: rotate a group only when the estimated SQNR of its static int8
    output with the best per-channel activation scales
    (:func:`~outlierquant.numerics.estimates.estimated_static_sqnr_db`, from calibration
    statistics) is below this many dB; the others are left to the quantizer as they are
    (needs statistics). ``None``: rotate every candidate.
    """

    groups: Literal["unfoldable", "all", "activation"] = "unfoldable"
    kernels: Literal["auto", "standard", "custom"] = "auto"
    smooth_alpha: float | None = None
    min_features: int = 2
    outlier_ratio: float | None = None
    rotate_below_db: float | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.outlier_ratio is not None and not (
                isinstance(self.outlier_ratio, (int, float)) and self.outlier_ratio > 1.0):
            raise ValueError(f"outlier_ratio={self.outlier_ratio!r}: a number > 1 or null")
        if self.rotate_below_db is not None and not (
                isinstance(self.rotate_below_db, (int, float)) and not isinstance(self.rotate_below_db, bool)
                and np.isfinite(self.rotate_below_db)):
            raise ValueError(f"rotate_below_db={self.rotate_below_db!r}: a number of dB or null")
        if self.smooth_alpha is not None and not (
                isinstance(self.smooth_alpha, (int, float)) and 0.0 <= self.smooth_alpha <= 1.0):
            raise ValueError(f"smooth_alpha={self.smooth_alpha!r}: a number in [0, 1] or null")


def _finite(value: float) -> float | None:
    """``value`` rounded for the report (JSON has no infinities: ``None`` for those)."""
    return round(value, 2) if np.isfinite(value) else None


def _online_candidate(group: LinearGroup, mode: str) -> bool:
    """Whether ``group`` gets an online rotation: never V → O (R2 folds it); groups behind
    a foldable norm only in mode ``all`` (R1 rotates them when it applies)."""
    producer = group.producer
    if producer.relation == "v_to_o":
        return False
    if producer.norm is not None and any(ROTATED_NORM_KEY in node.metadata_props for node in producer.norm.nodes):
        return False
    if producer.relation in ("none", "up_to_down"):
        return True
    if mode == "activation":
        return False
    return not producer.foldable or (mode == "all" and producer.relation == "norm")


class OnlineHadamardPass(OutlierPass):
    """R4: insert ``x ← x H`` before linears with no foldable producer; fold ``Hᵀ`` into them."""

    name = "online-hadamard"
    claims_equivalence = True
    options_type = OnlineHadamardOptions

    needs_stats = True  # smooth_alpha, outlier_ratio, rotate_below_db

    def reads(self) -> frozenset[str]:
        options = self.options
        calibrated = (options.smooth_alpha, options.outlier_ratio, options.rotate_below_db)
        return frozenset({"stats"}) if any(o is not None for o in calibrated) else frozenset()

    def use_kernel(self) -> bool:
        return use_kernel(self.options.kernels)

    def calibration_targets(self, model: ir.Model) -> list:
        analysis = analyze_graph(model)
        return [g.input.name for g in analysis.groups if _online_candidate(g, self.options.groups)]

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        analysis = analyze_graph(model)
        kernel = self.use_kernel()
        rotated, skipped = [], []
        for index, group in enumerate(analysis.groups):
            if not _online_candidate(group, self.options.groups):
                continue
            label = group.linears[0].name
            dim = group.in_features
            if dim < self.options.min_features:
                skipped.append({"group": label, "skipped": f"{dim} input features < min_features"})
                continue
            if any(linear.op_type == "Conv" for linear in group.linears):
                skipped.append({"group": label, "skipped": "Conv layers are not rotated"})
                continue
            if group.input.dtype not in (None, ir.DataType.FLOAT):
                skipped.append({"group": label, "skipped": f"input dtype {group.input.dtype} is not float32"})
                continue
            stats = self.stats.get(group.input.name) if self.stats is not None else None
            if stats is None and "stats" in self.reads():
                skipped.append({"group": label, "skipped": "no calibration statistics for its input"})
                continue
            sqnr = None
            if self.options.rotate_below_db is not None:

                sqnr = estimated_static_sqnr_db(stats, [as_f64(linear.weight_array()) for linear in group.linears])
                if sqnr == float("-inf"):
                    skipped.append({"group": label, "skipped": "its input is zero on the calibration data"})
                    continue
                if sqnr >= self.options.rotate_below_db:
                    skipped.append({"group": label, "static_sqnr_db": _finite(sqnr),
                                    "skipped": f"estimated static int8 SQNR {sqnr:.1f} dB >= rotate_below_db "
                                               f"{self.options.rotate_below_db:g}: not rotated"})
                    continue
            smooth = None
            if self.options.smooth_alpha is not None:
                absmax = np.maximum(as_f64(stats.absmax), 1e-5)
                smooth = absmax ** float(self.options.smooth_alpha)
                smooth = smooth / np.exp(np.mean(np.log(smooth)))  # geometric mean 1
            outliers = np.zeros(0, np.int64)
            if self.options.outlier_ratio is not None:
                outliers = select_outlier_channels(stats.absmax, criterion="relative",
                                                   ratio=float(self.options.outlier_ratio))
            self._insert(model, group, dim, kernel, smooth, f"online_hadamard_{index}", outliers)

            block = hadamard_block(dim)
            entry = {"group": label, "features": dim, "relation": group.producer.relation,
                     "linears": [linear.name for linear in group.linears],
                     "block": 1 if block is None else int(block.shape[0])}
            if self.options.outlier_ratio is not None:
                entry["float_channels"] = int(outliers.size)
            if sqnr is not None:
                entry["static_sqnr_db"] = _finite(sqnr)
            if stats is not None:
                prescale = None if smooth is None else 1.0 / smooth
                if outliers.size:

                    stats = without_channels(stats, outliers)
                entry.update(_profile_entry(stats, hadamard_rotation(dim, block), prescale))
            rotated.append(entry)
        gated = sum(1 for entry in skipped if "static_sqnr_db" in entry)
        record = {
            "form": "custom_kernel" if kernel else "standard_ops",
            "rotated": rotated,
            "skipped": skipped,
            "inserted_ops": len(rotated),
            "smooth_alpha": self.options.smooth_alpha,
            "side_path_float_channels": sum(int(group.get("float_channels", 0)) for group in rotated),
            # its gate decides per group: say what it did
            "summary": [f"online Hadamard rotation on {len(rotated)} linear groups"
                        + (f" ({gated} left unrotated: estimated static SQNR at or above the gate)" if gated else "")],
        }
        logger.info("online-hadamard: %d online rotations inserted (%s), %d skipped", len(rotated),
                    record["form"], len(skipped))
        return bool(rotated), record

    @staticmethod
    def _insert(model: ir.Model, group: LinearGroup, dim: int, kernel: bool, smooth: np.ndarray | None,
                name: str, outliers: np.ndarray | None = None) -> None:

        graph = model.graph
        block = hadamard_block(dim)
        rotation = hadamard_rotation(dim, block)
        prescale = None if smooth is None else 1.0 / smooth
        split = outliers is not None and outliers.size > 0
        if split:  # the outlier channels leave through the side path: the rotation sees zeros
            keep = np.ones(dim) if prescale is None else prescale.copy()
            keep[outliers] = 0.0
            prescale = keep
        if kernel:
            nodes, out = hadamard_kernel_node(model, group.input, block, name, prescale)
        else:
            nodes, out = hadamard_left_form(model, group.input, dim, block, name, prescale)
        first = first_in_graph(graph, [linear.node for linear in group.linears])
        graph.insert_before(first, nodes)
        gathered = None
        if split:
            gather = ir.node("Gather", inputs=[group.input, add_initializer(graph, f"{name}_outlier_channels",
                                                                            outliers.astype(np.int64))],
                             attributes={"axis": -1}, name=f"{name}/Gather",
                             metadata_props={KEEP_FLOAT_KEY: "outlier side path"})
            gather.outputs[0].name = f"{name}/Gather_output"
            graph.insert_before(first, [gather])
            gathered = gather.outputs[0]
        for linear in group.linears:
            weight = as_f64(linear.weight_array())
            side = weight[outliers] if split else None
            if split:
                weight = weight.copy()
                weight[outliers] = 0.0
            if smooth is not None:
                weight = smooth[:, None] * weight
            write_linear_weight(graph, linear, rotation.T @ weight, f"{linear.name}_weight_rotated")
            for slot, value in enumerate(linear.node.inputs):
                if value is group.input:
                    linear.node.replace_input_with(slot, out)
            if split:
                add_float_side_path(model, gathered, linear, side, name)
