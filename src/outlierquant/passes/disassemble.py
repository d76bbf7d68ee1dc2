"""QLLM channel disassembly (exact) and channel assembly (approximate).

Liu et al. 2024, "QLLM: Accurate and Efficient Low-Bitwidth Quantization for Large
Language Models". For a group of linears ``y_i = x @ W_i`` reading one tensor ``x``
(``[..., K]``) whose channel ``j`` has a calibrated ``max|x_j| = a_j`` far above the
others, **disassembly** splits the channel into ``T_j = ceil(a_j / θ)`` sub-channels that
each carry ``x_j / T_j``, with the weight row duplicated ``T_j`` times::

    x_j W_i[j] = Σ_{t=1..T_j} (x_j / T_j) W_i[j]

so ``y_i`` is unchanged (exact up to float summation order) while no channel of the new
input ``x'`` (``K' = K + Σ_j (T_j − 1)`` channels) exceeds ``θ`` on the calibration data.
A per-token activation quantizer, whose step is set by the largest channel of each token,
gets a grid ``max_j a_j / θ`` times finer. In the graph::

    x' = Gather(x ⊙ (1/T), idx)      W_i' = W_i[idx]

with ``idx`` listing every channel ``T_j`` times (copies adjacent). ``x ⊙ (1/T)`` is folded
into the group's producer (norm γ/β, or the producing linear's columns and bias) when the
analysis finds a foldable one; otherwise an explicit ``Mul`` is inserted (recorded).

``θ`` per group: a fixed ``threshold``, or (``threshold: 0``) the smallest ``θ`` for which
the added channels stay within ``max_added_share · K`` — the tightest range the channel
budget buys. (QLLM searches ``θ`` per layer by reconstruction error; the budget form needs
no extra pass over the data and bounds the extra GEMM work by the same share.)

**Assembly** (``assemble: true``) keeps the channel count at ``K``: the ``K' − K`` pairs of
ordinary channels ``(a, b)`` whose merge costs least are replaced by one channel
``x_a + x_b`` with one weight row ``w``::

    x_a W[a] + x_b W[b]  ≈  (x_a + x_b) w,
    w = (E[x_a s] W[a] + E[x_b s] W[b]) / E[s²],  s = x_a + x_b   (least squares)

This is *not* exact. Its mean squared output error per pair, summed over the group's
linears, is ``Σ_i (E[x_a²] ||W_i[a]||² + E[x_b²] ||W_i[b]||² + 2 E[x_a x_b] W_i[a]·W_i[b])
− E[s²] ||w_i||²`` (second moments from the calibration covariance when collected, else
the diagonal with ``E[x_a x_b] ≈ mean_a mean_b``). Pairs are chosen greedily by that cost
among channels with ``T = 1`` whose merged range ``a_a + a_b`` stays ``≤ θ``; the record
carries the predicted relative output error of every group. The merged channel is written
``Gather(x̃, i₁) + Gather(x̃, i₂) ⊙ m`` (two Gathers, a Mul and an Add; ``m`` is 1 on merged
channels only).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from outlierquant.calibration.stats import ActivationStats, ChannelStats
from outlierquant.graph.analysis import analyze_graph
from outlierquant.graph.edit import (
    check_group,
    fold_into_producer,
    group_label,
    is_excluded,
    linear_label,
    producer_channels,
    replace_linear,
    splittable,
)
from outlierquant.graph.records import Linear, LinearGroup
from outlierquant.graph.values import add_initializer, constant_array, first_in_graph
from outlierquant.options import check_fields
from outlierquant.passes.base import OutlierPass

logger = logging.getLogger(__name__)

__all__ = [
    "DisassembleOptions",
    "DisassembleChannelsPass",
    "ChannelPlan",
    "choose_theta",
    "plan_channels",
]


@dataclasses.dataclass(frozen=True)
class DisassembleOptions:
    """Options of :class:`DisassembleChannelsPass` (see the module docstring).

    ``threshold``: fixed ``θ`` (0: chosen per group from ``max_added_share``).
    ``max_added_share``: at most this share of a group's ``K`` channels added by
    disassembly. ``min_ratio``: leave a group alone when ``max_j a_j / median_j a_j`` is
    below this (no outlier worth the extra work). ``assemble``: merge ordinary channel
    pairs back to ``K`` channels (approximate). ``fold``: fold ``1/T`` into a foldable
    producer (else a ``Mul`` is always inserted). ``exclude``: substrings of node names
    left untouched.
    """

    threshold: float = 0.0
    max_added_share: float = 0.05
    min_ratio: float = 4.0
    assemble: bool = False
    fold: bool = True
    exclude: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        if self.threshold < 0:
            raise ValueError(f"threshold={self.threshold}: must be >= 0 (0: from max_added_share)")
        if not 0.0 < self.max_added_share <= 1.0:
            raise ValueError(f"max_added_share={self.max_added_share}: allowed (0, 1]")
        if self.min_ratio < 1.0:
            raise ValueError(f"min_ratio={self.min_ratio}: must be >= 1")


# -- planning (pure numpy) -------------------------------------------------------------------------


def _added(absmax: np.ndarray, theta: float) -> int:
    return int(np.maximum(np.ceil(absmax / theta) - 1, 0).sum())


def choose_theta(absmax: np.ndarray, budget: int) -> float:
    """The smallest ``θ`` with ``Σ_j (ceil(a_j / θ) − 1) ≤ budget`` (bisection; cost falls with ``θ``)."""
    absmax = np.asarray(absmax, dtype=np.float64)
    high = float(absmax.max())
    if high <= 0 or budget <= 0:
        return high
    low = high / (budget + 1)  # below this even the largest channel alone needs > budget copies
    low = max(low, 1e-12)
    if _added(absmax, low) <= budget:
        return low
    for _ in range(60):
        mid = 0.5 * (low + high)
        if _added(absmax, mid) <= budget:
            high = mid
        else:
            low = mid
    return high


@dataclasses.dataclass
class ChannelPlan:
    """The new input channels of one group.

    ``first[c]`` / ``second[c]``: source channels of new channel ``c`` (``second = -1``
    unless merged); ``copies[j] = T_j``. ``merged``: list of ``(a, b)``.
    """

    theta: float
    copies: np.ndarray
    first: np.ndarray
    second: np.ndarray
    merged: list[tuple[int, int]]

    @property
    def added(self) -> int:
        return int(self.copies.sum() - self.copies.size)

    @property
    def channels(self) -> int:
        return int(self.first.size)


def _pair_costs(moment: np.ndarray, weights: list[np.ndarray], candidates: np.ndarray):
    """Merge cost and merged rows for all candidate pairs: ``cost [C, C]``, plus a row builder."""
    m = moment[np.ix_(candidates, candidates)]
    d = np.diag(m)
    s2 = d[:, None] + d[None, :] + 2 * m  # E[(x_a + x_b)²]
    s2 = np.maximum(s2, 1e-30)
    ea = d[:, None] + m  # E[x_a s]
    eb = d[None, :] + m  # E[x_b s]
    cost = np.zeros_like(m)
    for w in weights:
        rows = w[candidates]
        norms = (rows**2).sum(axis=1)
        gram = rows @ rows.T
        before = d[:, None] * norms[:, None] + d[None, :] * norms[None, :] + 2 * m * gram
        # ||w||² with w = (ea Wa + eb Wb) / s2
        merged_sq = (ea**2 * norms[:, None] + eb**2 * norms[None, :] + 2 * ea * eb * gram) / s2**2
        cost += before - s2 * merged_sq
    return np.maximum(cost, 0.0)


def plan_channels(absmax: np.ndarray, theta: float, *, assemble: bool = False, moment: np.ndarray | None = None,
                  weights: list[np.ndarray] | None = None) -> tuple[ChannelPlan, float]:
    """Disassembly (and optionally assembly) plan; returns ``(plan, predicted merge error)``.

    ``moment``: ``E[x xᵀ]`` (``[K, K]``) and ``weights``: the group's ``[K, N]`` weights,
    needed for assembly only. The error is the summed mean squared output error of the
    merges (0 without assembly).
    """
    absmax = np.asarray(absmax, dtype=np.float64)
    k = absmax.size
    copies = np.maximum(np.ceil(absmax / theta), 1).astype(np.int64)
    added = int(copies.sum() - k)
    merged: list[tuple[int, int]] = []
    error = 0.0
    if assemble and added:
        ordinary = np.flatnonzero(copies == 1)
        # the cheapest merges are among small channels: keep the search to a bounded candidate set
        order = ordinary[np.argsort(absmax[ordinary], kind="stable")]
        candidates = np.sort(order[: min(order.size, max(8 * added, 256))])
        cost = _pair_costs(moment, weights, candidates)
        allowed = (absmax[candidates][:, None] + absmax[candidates][None, :]) <= theta
        cost = np.where(allowed & ~np.eye(candidates.size, dtype=bool), cost, np.inf)
        cost = np.triu(cost, 1) + np.tril(np.full_like(cost, np.inf))
        flat = np.argsort(cost, axis=None, kind="stable")
        used = np.zeros(candidates.size, bool)
        for index in flat:
            if len(merged) == added:
                break
            i, j = divmod(int(index), candidates.size)
            if not np.isfinite(cost[i, j]):
                break
            if used[i] or used[j]:
                continue
            used[i] = used[j] = True
            merged.append((int(candidates[i]), int(candidates[j])))
            error += float(cost[i, j])
        if len(merged) < added:
            logger.info("qllm_disassemble: only %d of %d merges possible under θ=%.4g", len(merged), added, theta)
    partner = {a: b for a, b in merged}
    gone = {b for _, b in merged}
    first, second = [], []
    for j in range(k):
        if j in gone:
            continue
        first.extend([j] * int(copies[j]))
        second.extend([partner.get(j, -1)] * int(copies[j]))
    plan = ChannelPlan(theta, copies, np.asarray(first, np.int64), np.asarray(second, np.int64), merged)
    return plan, error


def _merged_weight(weight: np.ndarray, plan: ChannelPlan, moment: np.ndarray | None) -> np.ndarray:
    """``W'`` for the new channels: duplicated rows, least-squares rows for merged pairs."""
    new = weight[plan.first].copy()
    for c in np.flatnonzero(plan.second >= 0):
        a, b = int(plan.first[c]), int(plan.second[c])
        daa, dbb, dab = moment[a, a], moment[b, b], moment[a, b]
        s2 = max(daa + dbb + 2 * dab, 1e-30)
        new[c] = ((daa + dab) * weight[a] + (dbb + dab) * weight[b]) / s2
    return new


def _second_moment(stats: ChannelStats) -> tuple[np.ndarray, bool]:
    if stats.covariance is not None:
        return stats.covariance + np.outer(stats.mean, stats.mean), True
    moment = np.outer(stats.mean, stats.mean)
    np.fill_diagonal(moment, np.maximum(stats.mean_sq, 0.0))
    return moment, False


def _current_weight(linear: Linear) -> np.ndarray:
    """``[K, N]`` from the node's *current* weight input (an earlier fold may have replaced it)."""
    array = np.asarray(constant_array(linear.node.inputs[1]), dtype=np.float64)
    return array.T if linear.weight_layout == "out_in" else array


# -- the pass ------------------------------------------------------------------------------------------


class DisassembleChannelsPass(OutlierPass):
    """QLLM: outlier input channels split into sub-channels (exact); optional pair assembly."""

    name = "qllm-disassemble"
    needs_stats = True
    #: exact without assembly (tested to 1e-4); assembly is an approximation
    claims_equivalence = True
    options_type = DisassembleOptions

    def covariance_targets(self, model: ir.Model) -> list[str]:
        """Group inputs whose covariance the assembly's merge cost reads (none without assembly)."""
        if not self.options.assemble:
            return []
        return analyze_graph(model).input_names(groups=True)

    def _check(self, group: LinearGroup, stats: ActivationStats) -> str:
        for linear in group.linears:
            reason = splittable(linear)
            if reason:
                return f"{linear.name}: {reason}"
            if is_excluded(linear, self.options.exclude):
                return f"{linear.name}: excluded by option"
        return check_group(group, stats, allow_insert=True, relations=(group.producer.relation,))

    def run(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        stats = self.require_stats()
        options = self.options
        graph = model.graph
        analysis = analyze_graph(model)
        groups_record: list[dict[str, Any]] = []
        inserted = 0
        total_in = total_added = total_merged = 0
        # consumers first: a fold into a producing linear then happens before that linear is rewritten
        for group in reversed(analysis.groups):
            entry: dict[str, Any] = {"linears": [l.name for l in group.linears]}
            reason = self._check(group, stats)
            st = stats[group.input.name] if not reason else None
            if not reason:
                absmax = np.asarray(st.absmax, dtype=np.float64)
                median = float(np.median(absmax)) or 1e-12
                entry["max_median_before"] = float(absmax.max() / median)
                if absmax.max() / median < options.min_ratio:
                    reason = f"max/median range {absmax.max() / median:.2f} < min_ratio {options.min_ratio}"
            if reason:
                entry["skipped"] = reason
                logger.info("qllm_disassemble: skip [%s]: %s", group_label(group), reason)
                groups_record.insert(0, entry)
                continue
            k = group.in_features
            if options.threshold > 0:
                theta = float(options.threshold)
            else:
                theta = choose_theta(absmax, int(np.floor(options.max_added_share * k)))
            if _added(absmax, theta) == 0:
                entry["skipped"] = f"no channel above θ={theta:.4g}"
                groups_record.insert(0, entry)
                continue
            weights = [_current_weight(linear) for linear in group.linears]
            moment = full = None
            if options.assemble:
                moment, full = _second_moment(st)
            plan, merge_error = plan_channels(absmax, theta, assemble=options.assemble, moment=moment,
                                              weights=weights)
            inserted += self._rewrite(graph, group, plan, weights, moment)
            after = absmax / plan.copies
            if plan.merged:
                merged_range = absmax[[a for a, _ in plan.merged]] + absmax[[b for _, b in plan.merged]]
                after = np.concatenate([after, merged_range])
            signal = sum(float(np.einsum("kn,kn->", w, _moment_or_diag(st, moment) @ w)) for w in weights) or 1.0
            entry.update({
                "in_features": k,
                "theta": theta,
                "disassembled_channels": int(np.count_nonzero(plan.copies > 1)),
                "added_channels": plan.added,
                "merged_pairs": len(plan.merged),
                "out_channels": plan.channels,
                "max_before": float(absmax.max()),
                "max_after": float(after.max()),
                "max_median_after": float(after.max() / (np.median(absmax / plan.copies) or 1e-12)),
                "folded": self._folded,
            })
            if options.assemble:
                entry["predicted_merge_error"] = merge_error / signal
                entry["covariance"] = bool(full)
            total_in += k
            total_added += plan.added
            total_merged += len(plan.merged)
            groups_record.insert(0, entry)
        done = [g for g in groups_record if "skipped" not in g]
        errors = [g["predicted_merge_error"] for g in done if "predicted_merge_error" in g]
        logger.info("qllm_disassemble: %d of %d groups, %d channels added, %d merged back, %d ops inserted",
                    len(done), len(groups_record), total_added, total_merged, inserted)
        return bool(done), {
            "options": dataclasses.asdict(options),
            "groups": groups_record,
            "rewritten_groups": len(done),
            "input_channels": total_in,
            "added_channels": total_added,
            "merged_pairs": total_merged,
            "added_share": total_added / total_in if total_in else 0.0,
            "extra_gemm_share": (total_added - total_merged) / total_in if total_in else 0.0,
            "inserted_ops": inserted,
            "exact": not total_merged,
            "max_predicted_merge_error": max(errors) if errors else 0.0,
        }

    def _rewrite(self, graph: ir.Graph, group: LinearGroup, plan: ChannelPlan, weights: list[np.ndarray],
                 moment: np.ndarray | None) -> int:
        """Write ``x' = Gather(x / T, first) (+ Gather(x / T, second) ⊙ m)`` and ``W' = W[first]``."""
        x = group.input
        base = (x.name or "input").strip("/").replace("/", "_") + "_qllm"
        first_node = first_in_graph(graph, [linear.node for linear in group.linears])
        nodes: list[ir.Node] = []
        inverse = 1.0 / plan.copies.astype(np.float64)
        self._folded = False
        source = x
        if np.any(plan.copies > 1):
            if self.options.fold and group.producer.foldable:
                t_prod, cmap = producer_channels(group, plan.copies.astype(np.float64))
                fold_into_producer(graph, group, t_prod)
                self._folded = True
            else:
                mul = ir.node("Mul", inputs=[x, add_initializer(graph, f"{base}_inv_copies", inverse.astype(np.float32))],
                              name=f"{base}/Mul")
                nodes.append(mul)
                source = mul.outputs[0]

        def gather(indices: np.ndarray, tag: str) -> ir.Value:
            node = ir.node("Gather", inputs=[source, add_initializer(graph, f"{base}_{tag}", indices.astype(np.int64))],
                           attributes={"axis": -1}, name=f"{base}/Gather_{tag}")
            nodes.append(node)
            return node.outputs[0]

        out = gather(plan.first, "first")
        if plan.merged:
            second = np.where(plan.second >= 0, plan.second, plan.first)
            mask = (plan.second >= 0).astype(np.float32)
            partner = gather(second, "second")
            masked = ir.node("Mul", inputs=[partner, add_initializer(graph, f"{base}_merge_mask", mask)],
                             name=f"{base}/Mul_mask")
            add = ir.node("Add", inputs=[out, masked.outputs[0]], name=f"{base}/Add_merge")
            nodes.extend([masked, add])
            out = add.outputs[0]
        for node in nodes:
            node.outputs[0].name = f"{node.name}_output"
            node.outputs[0].type = x.type
        out.shape = _widened_shape(x.shape, plan.channels)
        graph.insert_before(first_node, nodes)
        for linear, weight in zip(group.linears, weights):
            new_weight = _merged_weight(weight, plan, moment).astype(np.float32)
            linear.node.replace_input_with(0, out)
            label = linear_label(linear, "qllm")

            def build(tape: ir.tape.Tape, value: ir.Value, w=new_weight, label=label) -> ir.Value:
                return tape.op("MatMul", [value, tape.initializer(ir.tensor(np.ascontiguousarray(w)),
                                                                   name=f"{label}_weight")])

            replace_linear(graph, linear, build, label)
        return len(nodes) - 1  # the Gather that remains is the disassembly itself


def _moment_or_diag(stats: ChannelStats, moment: np.ndarray | None) -> np.ndarray:
    return moment if moment is not None else np.diag(np.maximum(stats.mean_sq, 0.0))


def _widened_shape(shape: ir.Shape | None, channels: int) -> ir.Shape | None:
    if shape is None or not len(shape):
        return None
    dims = list(shape.dims)
    dims[-1] = channels
    return ir.Shape(dims)
